"""Start-up cost: what a plain session must not import.

Every `multifd` run pays for its imports before it moves a byte (see
docs/performance.md). These modules are only needed by some sessions, so the
common path must not pull them in; each line here was measured as worth it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# module: why a plain tcp: session without TLS does not need it
LAZY = {
    "ssl": "only --tls-* sessions (~10 ms)",
    "importlib.metadata": "only a codec name that is not built in (~17 ms)",
    "multifd_cli.net.ssh": "only --to ssh: targets",
    "multifd_cli.image.layout": "only file: images",
    "ctypes.util": "find_library() runs ldconfig (~13 ms); libc is in the process already",
    "rich": "only when a progress bar is drawn on a terminal",
    "rich.progress": "only when a progress bar is drawn (45-115 ms)",
    "multifd_cli.send.ktrace": "only when the kernel tracker is chosen, after parsing",
    "matplotlib": "only `multifd report`, an optional extra (~700 ms with pyplot)",
}


@pytest.mark.parametrize("entry", ["multifd_cli.cli", "multifd_cli.send.orchestrator", "multifd_cli.recv.receiver"])
def test_a_plain_session_does_not_import_what_it_does_not_use(entry: str) -> None:
    code = (
        f"import sys, {entry}\n"
        "from multifd_cli.compression import by_wire_id, get_compressor\n"
        "get_compressor('zstd:1'); by_wire_id(2)\n"
        f"print(' '.join(m for m in {sorted(LAZY)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert not loaded, {m: LAZY[m] for m in loaded}
