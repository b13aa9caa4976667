"""The file: image under bad input and faults: `send --to file:IMG` must not destroy an
existing image before it has a complete new one, and `recv --from file:IMG` answers a
damaged image or an I/O error with one `multifd: error:` line and a documented exit code,
never exit 1 ("internal error", which means a bug). Found in the same review as
test_recv_invariants.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.mfdkit import MULTIFD, sha256, spawn, write_random

from multifd_cli.image.layout import IMAGE_ALIGN, IMAGE_BLOCK, IMAGE_HEADER, read_layout

MiB = 1 << 20
EXIT_USAGE, EXIT_PROTOCOL, EXIT_VERIFY, EXIT_IO, EXIT_PAUSE = 2, 4, 6, 7, 8


def test_recv_from_an_empty_file_uri_is_a_usage_error(tmp_path: Path) -> None:
    """cli.recv checks only that --from starts with "file:"; with nothing after it,
    cfg.source is "" and `if cfg.source:` (cli.py:233) silently runs a network recv.
    (send checks the same case: "--to file:PATH needs a path".)

    FAILS at the time of writing: recv listens on tcp:127.0.0.1:0 and exits 3 at
    --timeout."""
    recv = spawn(["recv", "--json", "--from", "file:", "--timeout", "2", str(tmp_path / "out")])
    code = recv.wait(30)
    assert not recv.of("listening"), f"--from file: started a network recv: {recv.stderr}"
    assert code == EXIT_USAGE, recv.stderr
    assert not (tmp_path / "out").exists()


# -- the file: image: the destination of `send --to file:` and the input of `recv --from` ----------


def test_a_failed_send_into_an_existing_image_keeps_the_old_image(tmp_path: Path) -> None:
    """create_image() opens IMAGE with O_CREAT|O_TRUNC (image.py:195) as soon as send
    starts, without --force and whatever the file is. A send that then fails (here its
    --pause-cmd fails at the switchover, exit 8) has already destroyed the previous,
    complete image: a snapshot that was restorable before is "incomplete" now.

    FAILS at the time of writing: the old image is truncated and rewritten; restoring it
    gives exit 6 "image ... is incomplete"."""
    src = write_random(tmp_path / "src", 3 * MiB, seed=69)
    image = tmp_path / "x.mfd"
    first = subprocess.run([*MULTIFD, "send", "--quiet", str(src), "--to", f"file:{image}"],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    old = sha256(image)
    src2 = write_random(tmp_path / "src2", 3 * MiB, seed=70)
    second = subprocess.run([*MULTIFD, "send", "--quiet", str(src2), "--to", f"file:{image}",
                             "--pause-cmd", "false", "--resume-cmd", "true"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0, "the second send was meant to fail"
    assert second.returncode in (EXIT_USAGE, EXIT_PAUSE), second.stderr
    assert sha256(image) == old, "a failed send destroyed the existing complete image"
    restore = subprocess.run([*MULTIFD, "recv", "--quiet", "--from", f"file:{image}",
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert restore.returncode == 0, restore.stderr
    assert sha256(tmp_path / "out") == sha256(src)


def _image(tmp_path: Path) -> tuple[Path, Path]:
    src = write_random(tmp_path / "src", 3 * MiB, seed=71)
    image = tmp_path / "x.mfd"
    proc = subprocess.run([*MULTIFD, "send", "--quiet", str(src), "--to", f"file:{image}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return src, image


@pytest.mark.parametrize("damage", ["cut-before-bitmap", "bad-utf8-name", "block-count"])
def test_a_damaged_image_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    """A damaged image is bad input: it needs one error line and exit 4 (as for bad
    offsets), 6 or 7 (as for a short data region), never exit 1 "internal error".
    - cut-before-bitmap: the file ends at the header's 1 MiB: the channel's bitmap
      pread() returns b"" and bitmap[...] raises IndexError (restore.py:42-46);
    - bad-utf8-name: a 0xff in a block name: UnicodeDecodeError (image.py:111);
    - block-count: the header claims one block more than the file holds: struct.error
      from unpack_from (image.py:109), `used` does not guard it.

    FAILS at the time of writing: exit 1 "internal error: IndexError: index out of
    range" / "internal error: UnicodeDecodeError ..." / "internal error: error:
    unpack_from requires a buffer ..."."""
    _, image = _image(tmp_path)
    data = bytearray(image.read_bytes())
    if damage == "cut-before-bitmap":
        assert read_layout(str(image)).blocks[0].bitmap_offset == IMAGE_ALIGN
        data = data[:IMAGE_ALIGN]
    elif damage == "bad-utf8-name":
        data[IMAGE_HEADER.size + IMAGE_BLOCK.size] = 0xFF
    else:
        magic, version, flags, ps, n, used, digest = IMAGE_HEADER.unpack_from(data)
        IMAGE_HEADER.pack_into(data, 0, magic, version, flags, ps, n + 1, used, digest)
        data = data[:used]
    image.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = subprocess.run([*MULTIFD, "recv", "--from", f"file:{image}", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode in (EXIT_PROTOCOL, EXIT_VERIFY, EXIT_IO), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("multifd: error:")
    assert not out.exists()


@pytest.mark.parametrize(("call", "err"), [("pwrite64", "ENOSPC"), ("pread64", "EIO")],
                         ids=["disk-full", "image-read-error"])
def test_restore_io_errors_are_exit_7(tmp_path: Path, strace_ok: None, call: str,
                                      err: str) -> None:
    """A restore channel pwrite()s DEST and pread()s the image with bare os calls
    (restore.py:42-54); an OSError there is reported as a crash. Injected with strace
    into every process of the restore (only the channels make these calls): ENOSPC on
    the writes (a full disk; the up-front space check cannot see space that others take
    meanwhile) and EIO on the image reads. README: exit 7 is "source or destination I/O
    error, such as a full disk".

    FAILS at the time of writing: exit 1 "channel 0: internal error: OSError: [Errno 28]
    No space left on device" (or [Errno 5] Input/output error)."""
    _, image = _image(tmp_path)
    out = tmp_path / "out"
    # The image's reads only (-P): the dynamic loader preads too.
    only = ["-P", str(image)] if call == "pread64" else []
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", os.devnull, *only, "-e", f"trace={call}",
         "-e", f"inject={call}:error={err}",
         *MULTIFD, "recv", "--from", f"file:{image}", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode == EXIT_IO, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("multifd: error:")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".multifd-" in n]
