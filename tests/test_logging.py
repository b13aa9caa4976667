"""Channel logs reach main's handler once each, tagged with their process."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Runner, sha256, write_random


def test_channel_records_are_merged_once_with_their_channel(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 2 << 20)
    dest = tmp_path / "dest"
    send_log, recv_log = tmp_path / "send.log", tmp_path / "recv.log"
    m = runner.migrate(
        src, dest,
        send_args=("--channels", "3", "--log-level", "debug", "--log-file", str(send_log)),
        recv_args=("--log-level", "debug", "--log-file", str(recv_log)),
    )
    assert m.wait() == (0, 0)
    assert sha256(src) == sha256(dest)
    for path, side, what in ((send_log, "send", "connected to"), (recv_log, "recv", "receiving on")):
        lines = path.read_text().splitlines()
        tagged = [ln for ln in lines if what in ln]
        # Exactly one record per channel: none lost, none written twice.
        channels = sorted(re.search(rf" ({side}-ch\d) ", ln).group(1) for ln in tagged)  # type: ignore[union-attr]
        assert channels == [f"{side}-ch0", f"{side}-ch1", f"{side}-ch2"], lines
        # Main's own records are there too, and nothing went to stdout.
        assert any("MainProcess" in ln for ln in lines)
    assert all(e["event"] for e in m.send.events)  # stdout carried only JSON events
