"""Directory sources at their limits and with bad input (issue 12).

- 3000 files with send and recv both under a 256-descriptor limit (this machine's
  default of 20,000 would hide a descriptor kept per file);
- refused before anything moves (exit 2): a directory with `--to file:`, with recv's
  --resume or --keep-partial, a SOURCE that is a symlink loop, DEST inside SOURCE and
  SOURCE inside DEST on one host;
- an unreadable subdirectory, found by send running as a user who cannot read it
  (root reads everything): exit 7 with one line, nothing at DEST;
- a failure at DEST in the final pass (its filesystem fills up under the pause):
  exit 7, the writer resumed, nothing at DEST;
- a tree whose paths under DEST are longer than PATH_MAX although they fit under
  SOURCE: recv works relative to directory descriptors, so the copy is made whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers.mfdkit import Done, Kit, Mfd, writer_runs
from helpers.treekit import (
    TreeWriter,
    assert_replica,
    fd_limit,
    nofile_limit,
    populate,
    python_for,
)

ROOT = os.geteuid() == 0
PATH_MAX = 4096


def leftovers(parent: Path, dest: Path) -> list[str]:
    """Anything named after DEST in its parent (DEST itself, a staging directory, a
    partial copy)."""
    return sorted(n for n in os.listdir(parent) if dest.name in n)


def refused(done: Done, *words: str) -> str:
    msg = done.error(2)
    assert all(w in msg for w in words), msg
    return msg


# -- descriptors -------------------------------------------------------------------------------------


def test_three_thousand_files_under_a_256_descriptor_limit(tmp_path: Path, kit: Kit) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for d in range(30):
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02}" / f"f{f:03}").write_bytes(os.urandom(64 + (d * 100 + f) % 5000))
    with fd_limit(256):
        r, uri = kit.recv(dest, timeout=60)
        s = kit.send(src, uri, timeout=60)
    assert nofile_limit(r.pid) == 256
    with contextlib.suppress(FileNotFoundError):  # send may be done already
        assert nofile_limit(s.pid) == 256
    s.wait(180).ok()
    r.wait(60).ok()
    assert_replica(src, dest, owners=ROOT)


# -- refused before anything moves -----------------------------------------------------------------


def test_directory_to_a_file_image_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    image = tmp_path / "image"
    p = Mfd(["send", "--json", str(src), "--to", f"file:{image}"])
    refused(p.wait(30), "file:")
    assert not image.exists()


@pytest.mark.parametrize("flag", ["--resume", "--keep-partial"])
def test_directory_with_resume_or_keep_partial_is_refused(tmp_path: Path, kit: Kit,
                                                          flag: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    r, uri = kit.recv(dest, flag)
    s = kit.send(src, uri)
    refused(s.wait(60), flag)
    assert leftovers(tmp_path, dest) == []


def test_a_source_that_is_a_symlink_loop_is_refused(tmp_path: Path, kit: Kit) -> None:
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    dest = tmp_path / "dest"
    r, uri = kit.recv(dest)
    s = kit.send(tmp_path / "loop-a", uri)
    refused(s.wait(60), "loop-a")
    assert leftovers(tmp_path, dest) == []


def test_dest_inside_source_is_refused(tmp_path: Path, kit: Kit) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "data").write_bytes(b"x" * 10000)
    r, uri = kit.recv(src / "sub" / "dest")
    s = kit.send(src, uri)
    refused(s.wait(60))
    assert sorted(os.listdir(src / "sub")) == [], "something was left inside SOURCE"


def test_source_inside_dest_is_refused(tmp_path: Path, kit: Kit) -> None:
    outer = tmp_path / "outer"
    src = outer / "app" / "src"
    src.mkdir(parents=True)
    (src / "data").write_bytes(b"x" * 10000)
    ref = tmp_path / "ref"
    shutil.copytree(outer, ref, symlinks=True)
    r, uri = kit.recv(outer, "--force")
    s = kit.send(src, uri)
    refused(s.wait(60))
    r.kill()
    assert_replica(ref, outer, owners=ROOT)  # --force did not swap the source away


# -- an unreadable subdirectory ----------------------------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root's and 0700)."""
    d = Path(tempfile.mkdtemp(prefix="mfd-lim-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for top, dirs, _ in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(top, x), 0o755)
    shutil.rmtree(d, ignore_errors=True)


def run_as(user_argv: list[str], args: list[str], timeout: float = 60) -> Done:
    t0 = time.monotonic()
    res = subprocess.run([*user_argv, *args], capture_output=True, text=True, timeout=timeout,
                         cwd="/")
    events = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    return Done(res.returncode, events, res.stderr, time.monotonic() - t0, args)


@pytest.mark.skipif(not ROOT, reason="needs root to run send as another user")
def test_an_unreadable_subdirectory_fails_with_exit_7(public_dir: Path, tmp_path: Path,
                                                       kit: Kit) -> None:
    nobody = python_for("nobody")
    if nobody is None:
        pytest.skip("the user nobody cannot run this checkout's Python")
    src = public_dir / "src"
    (src / "open" / "deeper").mkdir(parents=True)
    (src / "open" / "deeper" / "f").write_bytes(b"readable")
    (src / "locked").mkdir()
    (src / "locked" / "hidden").write_bytes(b"not for nobody")
    os.chmod(src / "locked", 0o000)
    dest = tmp_path / "dest"
    r, uri = kit.recv(dest)
    done = run_as(nobody, ["send", "--json", "--timeout", "20", str(src), "--to", uri])
    msg = done.error(7)
    assert "locked" in msg, msg
    assert leftovers(tmp_path, dest) == []


# -- failures at DEST ----------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own, to fill up."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_dest_filling_up_in_the_final_pass_fails_with_exit_7_and_resumes_the_writer(
        tmp_path: Path, small_fs: Path, kit: Kit) -> None:
    """The pause command stops the writer and then drops 3 MiB more into the tree, so
    the final pass, under the pause, overflows DEST's 4 MiB filesystem."""
    src = tmp_path / "src"
    populate(src, 150, seed=5)  # about 1.2 MiB: the first passes fit
    w = TreeWriter(src, tmp_path / "counts", rate=100, seed=5, files=150)
    try:
        dest = small_fs / "dest"
        r, uri = kit.recv(dest, timeout=60)
        pause = f"kill -STOP {w.pid}; head -c 3145728 /dev/urandom > {src}/late.bin"
        s = kit.send(src, uri, "--pause-cmd", pause, "--resume-cmd", f"kill -CONT {w.pid}",
                     timeout=60)
        done = s.wait(180)
        msg = done.error(7)
        assert "space" in msg.lower(), msg
        assert (src / "late.bin").stat().st_size == 3 << 20, "the pause never happened"
        writer_runs(w.pid)
        r.wait(60)
        assert leftovers(small_fs, dest) == []
    finally:
        w.kill()


def deep_tree(root: Path, rel_len: int) -> bytes:
    """Under ROOT, a chain of directories whose relative path is about REL_LEN bytes,
    with a file at the bottom; made through directory descriptors (a full path this long
    could not be passed to mkdir). Returns the relative path of the file."""
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    try:
        while len(rel) + 250 < rel_len:
            name = b"p" * 240
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel += name + b"/"
        wfd = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"at the bottom")
        os.close(wfd)
    finally:
        os.close(fd)
    return rel + b"leaf"


def test_paths_longer_than_path_max_under_dest_are_still_copied(tmp_path: Path,
                                                                  kit: Kit) -> None:
    src = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        tree = src / "t"
        rel = deep_tree(tree, PATH_MAX - len(bytes(tree)) - 40)
        assert len(bytes(tree)) + 1 + len(rel) < PATH_MAX
        deep_parent = tmp_path / ("q" * 200) / ("q" * 200)
        deep_parent.mkdir(parents=True)
        dest = deep_parent / "dest"
        assert len(bytes(dest)) + 1 + len(rel) > PATH_MAX
        r, uri = kit.recv(dest, timeout=60)
        s = kit.send(tree, uri, timeout=60)
        s.wait(120).ok()
        r.wait(60).ok()
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in rel.split(b"/")[:-1]:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            leaf = os.open(b"leaf", os.O_RDONLY, dir_fd=fd)
            assert os.read(leaf, 100) == b"at the bottom"
            os.close(leaf)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(src, ignore_errors=True)
