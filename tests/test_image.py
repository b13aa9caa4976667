"""The file: transport: a golden image pins the format; restores verify the digest."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.mfdkit import MULTIFD, sha256

from multifd_cli.errors import EXIT_PROTOCOL, EXIT_USAGE, EXIT_VERIFY
from multifd_cli.image.layout import IMAGE_ALIGN, IMAGE_COMPLETE, ImageLayout, read_layout

GOLDEN = Path(__file__).parent / "golden" / "image" / "header.bin"
GOLDEN_SHA = Path(__file__).parent / "golden" / "image" / "image.sha256"
PS = 4096


def golden_source(tmp: Path) -> Path:
    """Pages 0-9 carry their own index, page 3 is zero, and a 100-byte tail."""
    data = bytearray()
    for i in range(10):
        data += bytes([i + 1]) * PS if i != 3 else bytes(PS)
    data += b"tail" * 25
    path = tmp / "disk.img"
    path.write_bytes(bytes(data))
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*MULTIFD, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def image_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_golden_image(tmp_path: Path) -> None:
    src = golden_source(tmp_path)
    image = tmp_path / "x.mfd"
    run("send", str(src), "--to", f"file:{image}", "--quiet")
    layout = read_layout(str(image))
    assert layout.flags & IMAGE_COMPLETE
    header = image.read_bytes()[:IMAGE_ALIGN].rstrip(b"\0")
    if os.environ.get("MULTIFD_WRITE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_bytes(header)
        GOLDEN_SHA.write_text(image_sha(image) + "\n")
        pytest.skip("golden image files written; commit them")
    assert header == GOLDEN.read_bytes()
    assert image_sha(image) == GOLDEN_SHA.read_text().strip()
    # The zero page is absent from the bitmap and never written.
    b = layout.blocks[0]
    bitmap = image.read_bytes()[b.bitmap_offset : b.bitmap_offset + 2]
    assert bitmap == bytes([0b11110111, 0b00000111])


def test_restore_round_trip_with_several_blocks(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    a = tmp_path / "vm" / "a.img"
    a.write_bytes(os.urandom(3 * PS + 17))
    b = golden_source(tmp_path)
    image = tmp_path / "x.mfd"
    run("send", str(a), str(b), "--to", f"file:{image}", "--channels", "4", "--quiet")
    dest = tmp_path / "restored"
    run("recv", "--from", f"file:{image}", str(dest), "--quiet")
    assert sha256(dest / "vm" / "a.img") == sha256(a)
    assert sha256(dest / "disk.img") == sha256(b)


def test_compression_is_refused_for_file_targets(tmp_path: Path) -> None:
    proc = run("send", str(golden_source(tmp_path)), "--to", f"file:{tmp_path / 'x'}",
               "--compress", "zstd", check=False)
    assert proc.returncode == EXIT_USAGE
    assert "fixed offset" in proc.stderr


def test_an_incomplete_image_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "x.mfd"
    run("send", str(golden_source(tmp_path)), "--to", f"file:{image}", "--quiet")
    layout = read_layout(str(image))
    layout.flags = 0
    with open(image, "r+b") as f:
        f.write(layout.encode())
    proc = run("recv", "--from", f"file:{image}", str(tmp_path / "out"), check=False)
    assert proc.returncode == EXIT_VERIFY
    assert "incomplete" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_damaged_page_fails_the_digest(tmp_path: Path) -> None:
    image = tmp_path / "x.mfd"
    run("send", str(golden_source(tmp_path)), "--to", f"file:{image}", "--quiet")
    b = read_layout(str(image)).blocks[0]
    with open(image, "r+b") as f:
        f.seek(b.data_offset + 5 * PS + 7)
        f.write(b"X")
    proc = run("recv", "--from", f"file:{image}", str(tmp_path / "out"), check=False)
    assert proc.returncode == EXIT_VERIFY
    assert "digest" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_offsets_that_do_not_follow_the_format_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "x.mfd"
    run("send", str(golden_source(tmp_path)), "--to", f"file:{image}", "--quiet")
    layout = read_layout(str(image))
    layout.blocks[0].data_offset += PS  # would read someone else's bytes
    with open(image, "r+b") as f:
        f.write(layout.encode())
    proc = run("recv", "--from", f"file:{image}", str(tmp_path / "out"), check=False)
    assert proc.returncode == EXIT_PROTOCOL


@pytest.mark.parametrize("name", ["../evil", "/abs"])
def test_image_block_names_cannot_leave_dest(tmp_path: Path, name: str) -> None:
    layout = ImageLayout.plan(PS, [("x", PS, 0)])
    layout.blocks[0].name = name
    with pytest.raises(Exception) as info:
        ImageLayout.decode(layout.encode())
    assert getattr(info.value, "exit_code", None) == EXIT_PROTOCOL


def test_a_live_source_is_rewritten_in_place(tmp_path: Path) -> None:
    """Pages that change between passes are rewritten at their fixed offsets."""
    src = tmp_path / "live.img"
    src.write_bytes(os.urandom(64 * PS))
    helper = Path(__file__).parent / "helpers" / "rewrite_once.py"
    marker = tmp_path / "rewritten"
    env = {**os.environ,
           "MULTIFD_TEST_BETWEEN_PASSES": f"{sys.executable} {helper} {src} {marker} 7"}
    image = tmp_path / "x.mfd"
    proc = subprocess.run([*MULTIFD, "send", str(src), "--to", f"file:{image}", "--quiet",
                           "--no-mtime-shortcut"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    run("recv", "--from", f"file:{image}", str(tmp_path / "out"), "--quiet")
    assert sha256(tmp_path / "out") == sha256(src)
