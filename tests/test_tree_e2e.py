"""Directory sources end to end, for what the shape and real-program tests do not
show: a rename keeps a file's page table (only changed pages travel), -x stays on the
source's filesystem, and several sources with a directory among them make one tree.

Between-pass changes come from MULTIFD_TEST_BETWEEN_PASSES, a command send runs
after each pass that did not end the migration, so each change lands in a known pass.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers.mfdkit import Done, Kit, MiB, sha256, write_random

ROOT = os.geteuid() == 0


def once(marker: Path, command: str) -> str:
    """A between-passes hook that runs COMMAND the first time only."""
    m = shlex.quote(str(marker))
    return f"sh -c {shlex.quote(f'test -e {m} || {{ {command} && touch {m}; }}')}"


def migrate(kit: Kit, sources: list[Path], dest: Path, *args: str,
            env: dict[str, str] | None = None) -> tuple[Done, Done]:
    r, uri = kit.recv(dest, timeout=60)
    s = kit.start(["send", "--json", "--timeout", "60", *map(str, sources), "--to", uri, *args],
                  env)
    return s.wait(120), r.wait(60)


def passes(done: Done) -> list[dict[str, Any]]:
    return [e for e in done.events if e["event"] == "pass"]


def same_files(a: Path, b: Path) -> None:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    for n in names:
        if (a / n).is_file() and not (a / n).is_symlink():
            assert sha256(a / n) == sha256(b / n), n


@pytest.mark.parametrize("rewrite", [False, True], ids=["rename", "rename-and-write"])
def test_a_renamed_file_keeps_its_pages(tmp_path: Path, kit: Kit, rewrite: bool) -> None:
    """PostgreSQL recycles 16 MiB WAL segments by rename: resending them whole would
    cost a segment per recycle. The move travels as a tree operation; with a page
    written after the rename, that page is all the content that travels."""
    src = tmp_path / "src"
    (src / "pg_wal").mkdir(parents=True)
    write_random(src / "pg_wal" / "000000010000000000000001", 16 * MiB)
    write_random(src / "other", 1 * MiB, seed=2)
    seg = src / "pg_wal" / "000000010000000000000001"
    new = src / "pg_wal" / "000000010000000000000007"
    cmd = f"mv {shlex.quote(str(seg))} {shlex.quote(str(new))}"
    if rewrite:
        cmd += (f" && dd if=/dev/urandom of={shlex.quote(str(new))} bs=4096 seek=100 count=1 "
                "conv=notrunc status=none")
    hook = once(tmp_path / "done", cmd)
    send, recv = migrate(kit, [src], tmp_path / "dest",
                         env={"MULTIFD_TEST_BETWEEN_PASSES": hook})
    send.ok()
    recv.ok()
    second = passes(send)[1]
    assert second["tree_ops"] >= 2  # the move: UNLINK of the old path, LINK of the new
    # A rename moves the inode's ctime: the stat rule reads it again; the kernel tracker
    # (auto, as root on ext4) knows no page changed and reads it only if one was written.
    assert second["files_read"] == (1 if rewrite or second["tracker"] != "kernel" else 0)
    assert second["normal_pages"] == (1 if rewrite else 0)
    assert second["sent_bytes"] < 64 << 10  # not 16 MiB again
    assert not seg.exists()
    same_files(src, tmp_path / "dest")


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("one_fs", [False, True], ids=["cross", "one-file-system"])
def test_mount_points_are_crossed_unless_x(tmp_path: Path, kit: Kit, one_fs: bool) -> None:
    src = tmp_path / "src"
    mnt = src / "mnt"
    mnt.mkdir(parents=True)
    (src / "top").write_bytes(b"on the source's filesystem")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "inside").write_bytes(b"on another filesystem")
        send, recv = migrate(kit, [src], tmp_path / "dest", *(["-x"] if one_fs else []))
        send.ok()
        recv.ok()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    dest = tmp_path / "dest"
    assert (dest / "top").read_bytes() == b"on the source's filesystem"
    assert (dest / "mnt").is_dir()  # the mount point itself is kept, as rsync -x does
    assert (dest / "mnt" / "inside").exists() == (not one_fs)


def test_files_and_a_directory_make_one_tree(tmp_path: Path, kit: Kit) -> None:
    """Each source is named by its path relative to the sources' common directory, as
    several files are; nothing else in that directory comes along."""
    base = tmp_path / "base"
    (base / "data" / "sub").mkdir(parents=True)
    write_random(base / "data" / "sub" / "f", 100_000)
    (base / "data" / "empty").mkdir()
    write_random(base / "conf.txt", 5000, seed=3)
    (base / "etc").mkdir()
    write_random(base / "etc" / "extra.cfg", 777, seed=4)
    write_random(base / "not-sent", 10, seed=5)
    send, recv = migrate(kit, [base / "data", base / "conf.txt", base / "etc" / "extra.cfg"],
                         tmp_path / "dest")
    send.ok()
    recv.ok()
    dest = tmp_path / "dest"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "conf.txt", "data", "data/empty", "data/sub", "data/sub/f", "etc", "etc/extra.cfg",
    ]
    assert sha256(dest / "data" / "sub" / "f") == sha256(base / "data" / "sub" / "f")
    assert sha256(dest / "etc" / "extra.cfg") == sha256(base / "etc" / "extra.cfg")


@pytest.mark.parametrize("which", ["named", "walked"])
def test_a_named_file_replaced_mid_run_is_exit_7_as_alone(tmp_path: Path, kit: Kit,
                                                         which: str) -> None:
    """Beside a directory, a file named on the command line keeps a lone file's rule:
    an atomic save over it is exit 7, with DEST untouched. The same save of a file the
    walk found inside the directory is followed (the control)."""
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    write_random(base / "data" / "inner", 50_000)
    write_random(base / "conf.txt", 5000, seed=3)
    target = base / "conf.txt" if which == "named" else base / "data" / "inner"
    new = tmp_path / "new"
    write_random(new, 6000, seed=9)
    hook = once(tmp_path / "done", f"mv {shlex.quote(str(new))} {shlex.quote(str(target))}")
    dest = tmp_path / "dest"
    send, recv = migrate(kit, [base / "data", base / "conf.txt"], dest,
                         env={"MULTIFD_TEST_BETWEEN_PASSES": hook})
    if which == "walked":
        send.ok()
        recv.ok()
        assert sha256(dest / "data" / "inner") == sha256(target)
        return
    assert "conf.txt was replaced during the migration" in send.error(7)
    recv.error(2, 3, 4, 7)  # recv lost its peer: no copy to keep
    assert not dest.exists()


def test_an_unchanged_tree_is_not_read_again(tmp_path: Path, kit: Kit) -> None:
    """Pass 2 over a tree nobody writes reads no file: size, mtime, ctime and inode
    decide, under a pause mechanism too (the final pass is pass 2 here)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        write_random(src / f"f{i}", 8192, seed=i)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        send, recv = migrate(kit, [src], tmp_path / "dest", "--pause-pid", str(sleeper.pid),
                             "--after-success", "resume")
        send.ok()
        recv.ok()
    finally:
        sleeper.kill()
        sleeper.wait()
    ps = passes(send)
    assert ps[0]["files_read"] == 200
    assert ps[-1]["final"] and ps[-1]["files_read"] == 0 and ps[-1]["normal_pages"] == 0
    assert all(p["entries"] == 201 for p in ps)
