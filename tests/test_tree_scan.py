"""Scanning a source tree and diffing two scans: what is recorded, what is refused
with which exit code, the stat shortcut, shared-writable mappings, and the memory
a snapshot holds per entry."""

from __future__ import annotations

import mmap
import os
import socket
import stat
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from multifd_cli.errors import EXIT_IO, EXIT_USAGE, IOFailure, UsageError
from multifd_cli.send.tree import (
    TreeTracker,
    parse_maps,
    scan_tree,
    shared_writable_mapped,
)
from multifd_cli.send.tree.diff import RACY_NS
from multifd_cli.send.tree.scan import Snapshot, open_scanned
from multifd_cli.wire.treeops import EntryType, Op, skipped_warning

ROOT = os.geteuid() == 0


def _paths(snap: Snapshot) -> dict[str, int]:
    return {os.fsdecode(snap.path(i)): i for i in range(len(snap))}


def _old(path: Path) -> None:
    """Wait until PATH's last change is older than the racy window, so that the
    stat shortcut, not the racy rule, decides what is read."""
    time.sleep(RACY_NS / 1e9 * 1.5)


def test_every_entry_type_and_field_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o750)
    (tmp_path / "d" / "f").write_bytes(b"12345")
    os.chmod(tmp_path / "d" / "f", 0o640)
    os.link(tmp_path / "d" / "f", tmp_path / "hard")
    os.symlink("d/f", tmp_path / "sym")
    os.symlink("nowhere", tmp_path / "dangling")
    os.mkfifo(tmp_path / "pipe")
    snap = scan_tree(tmp_path)
    at = _paths(snap)
    assert set(at) == {"", "d", "d/f", "hard", "sym", "dangling", "pipe"}
    f = at["d/f"]
    st = os.lstat(tmp_path / "d" / "f")
    assert snap.kind[f] == EntryType.FILE and snap.mode[f] == 0o640 and snap.size[f] == 5
    assert (snap.mtime[f], snap.ctime[f], snap.nlink[f]) == (st.st_mtime_ns, st.st_ctime_ns, 2)
    assert snap.key(f) == snap.key(at["hard"]) == (st.st_dev, st.st_ino)
    assert snap.kind[at["d"]] == EntryType.DIR and snap.mode[at["d"]] == 0o750
    assert snap.target[at["sym"]] == b"d/f" and snap.target[at["dangling"]] == b"nowhere"
    assert snap.kind[at["pipe"]] == EntryType.FIFO
    for i in range(1, len(snap)):
        assert snap.parent[i] < i  # parents first: the diff and dir_finish rely on it


@pytest.mark.skipif(not ROOT, reason="device nodes need root")
def test_devices_keep_their_rdev(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:
        pytest.skip("mknod not allowed here")
    snap = scan_tree(tmp_path)
    i = _paths(snap)["null"]
    assert snap.kind[i] == EntryType.CHR and snap.rdev[i] == os.makedev(1, 3)


def test_sockets_are_skipped_and_named(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    socks = []
    for name in ("s1", "sub/s2"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        socks.append(s)
    try:
        snap = scan_tree(tmp_path)
    finally:
        for s in socks:
            s.close()
    assert sorted(snap.sockets) == [b"s1", b"sub/s2"]
    assert set(_paths(snap)) == {"", "sub"}


def test_bad_roots_are_usage_errors(tmp_path: Path) -> None:
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="symlink loop") as e:
        scan_tree(tmp_path / "loop1")
    assert e.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match="not a directory"):
        scan_tree(tmp_path / "file")
    with pytest.raises(UsageError, match="no such directory"):
        scan_tree(tmp_path / "missing")


def test_a_root_that_is_a_symlink_to_a_directory_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x").write_bytes(b"x")
    os.symlink("real", tmp_path / "via")
    assert set(_paths(scan_tree(tmp_path / "via"))) == {"", "x"}


def _scan_as_nobody(root: Path) -> tuple[int, str]:
    """scan_tree run by an unprivileged user, in a forked child (root reads anything)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            scan_tree(root)
        except (IOFailure, UsageError) as e:
            os.write(w, str(e).encode())
            code = e.exit_code
        except BaseException as e:
            os.write(w, repr(e).encode())
            code = 99
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def test_an_unreadable_subdirectory_is_exit_7_naming_it() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        (root / "ok").mkdir()
        (root / "ok" / "secret").mkdir(mode=0o700)
        os.chmod(root / "ok" / "secret", 0o000)
        if ROOT:
            code, message = _scan_as_nobody(root)
        else:
            with pytest.raises(IOFailure) as e:
                scan_tree(root)
            code, message = e.value.exit_code, str(e.value)
        os.chmod(root / "ok" / "secret", 0o700)
    assert code == EXIT_IO
    assert message.endswith("ok/secret: cannot read directory: Permission denied")
    assert "\n" not in message


def test_one_file_system_stays_on_the_roots_device(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "here").write_bytes(b"h")
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "there").write_bytes(b"t")
        crossed = set(_paths(scan_tree(tmp_path)))
        stayed = set(_paths(scan_tree(tmp_path, one_file_system=True)))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
    assert crossed == {"", "here", "mnt", "mnt/there"}
    assert stayed == {"", "here", "mnt"}  # the mount point itself, empty, as rsync -x


def _tree(root: Path, files: int = 50) -> None:
    for d in range(5):
        (root / f"d{d}").mkdir()
        for f in range(files // 5):
            (root / f"d{d}" / f"f{f}").write_bytes(b"x" * f)


def test_an_unchanged_pass_reads_nothing_and_changes_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)
    _old(tmp_path)
    tracker = TreeTracker()
    first = tracker.advance(scan_tree(tmp_path))
    assert len({item.fid for item in first.scan()}) == 50
    again = tracker.advance(scan_tree(tmp_path))
    assert again.empty() and again.dropped == []
    assert not list(again.ops()) and not list(again.scan()) and not list(again.times())


def test_the_stat_shortcut_reads_what_changed(tmp_path: Path) -> None:
    _tree(tmp_path)
    _old(tmp_path)
    tracker = TreeTracker()
    tracker.advance(scan_tree(tmp_path))
    with (tmp_path / "d1" / "f3").open("r+b") as f:
        f.write(b"y")  # same size: only mtime and ctime tell
    os.chmod(tmp_path / "d2" / "f4", 0o600)  # ctime only: read again, harmless
    delta = tracker.advance(scan_tree(tmp_path))
    assert sorted(item.path for item in delta.scan()) == [b"d1/f3", b"d2/f4"]
    assert [(op.op, op.path, op.mode) for op in delta.ops()] == [(Op.META, b"d2/f4", 0o600)]


def test_a_racily_clean_file_is_read_again(tmp_path: Path) -> None:
    """A file changed just before a walk may change again within the same timestamp
    tick; it is read on the next pass even though its stat looks the same."""
    (tmp_path / "hot").write_bytes(b"a")
    tracker = TreeTracker()
    tracker.advance(scan_tree(tmp_path))
    assert [item.path for item in tracker.advance(scan_tree(tmp_path)).scan()] == [b"hot"]
    _old(tmp_path)
    tracker.advance(scan_tree(tmp_path))
    assert list(tracker.advance(scan_tree(tmp_path)).scan()) == []


def test_shared_writable_mappings_are_found_and_scanned(tmp_path: Path) -> None:
    shm = tmp_path / "db-shm"
    shm.write_bytes(b"\0" * 4096)
    _old(tmp_path)
    tracker = TreeTracker()
    tracker.advance(scan_tree(tmp_path))
    with shm.open("r+b") as f, mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED) as m:
        m[0:5] = b"hello"  # moves no mtime, now or ever
        st = os.stat(shm)
        mapped = shared_writable_mapped()
        assert (st.st_dev, st.st_ino) in mapped
        assert [(i.fid, i.path) for i in tracker.advance(scan_tree(tmp_path), mapped).scan()] == [
            (0, b"db-shm")
        ]


def test_parse_maps_keeps_only_shared_writable_file_mappings() -> None:
    text = (
        "7f00-7f01 rw-s 00000000 fd:01 1234   /var/db/x.db-shm\n"
        "7f01-7f02 rw-p 00000000 fd:01 1235   /var/db/private\n"
        "7f02-7f03 r--s 00000000 fd:01 1236   /var/db/readonly\n"
        "7f03-7f04 rw-s 00000000 00:01 0      /dev/zero (deleted)\n"
        "7f04-7f05 rwxs 00001000 103:02 77    /srv/lmdb/data.mdb\n"
    )
    assert parse_maps(text) == {(os.makedev(0xFD, 1), 1234), (os.makedev(0x103, 2), 77)}


def test_a_snapshot_stays_under_200_bytes_per_entry() -> None:
    """Issue 12 allows about 200 bytes per file besides page tables; the arrays and
    packed names are what grows with the tree."""
    n = 20_000
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        root = Path(tmp)
        for d in range(n // 1000):
            sub = root / f"dir{d:04d}"
            sub.mkdir()
            for f in range(999):
                (sub / f"{f:06d}.dat").touch()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        snap = scan_tree(root)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    assert len(snap) == 1 + n // 1000 * 1000
    assert held / len(snap) < 200, f"{held / len(snap):.0f} bytes per entry"


def test_open_scanned_refuses_a_path_that_no_longer_holds_the_inode(tmp_path: Path) -> None:
    (tmp_path / "seg").write_bytes(b"s")
    snap = scan_tree(tmp_path)
    i = _paths(snap)["seg"]
    root = bytes(tmp_path)
    fd = open_scanned(root, b"seg", snap.dev[i], snap.ino[i])
    assert fd is not None
    os.close(fd)
    (tmp_path / "seg.new").write_bytes(b"t")
    os.replace(tmp_path / "seg.new", tmp_path / "seg")  # an atomic save since the walk
    assert open_scanned(root, b"seg", snap.dev[i], snap.ino[i]) is None
    os.unlink(tmp_path / "seg")
    assert open_scanned(root, b"seg", snap.dev[i], snap.ino[i]) is None
    os.symlink("elsewhere", tmp_path / "seg")
    assert open_scanned(root, b"seg", snap.dev[i], snap.ino[i]) is None


def test_skipped_entries_make_one_warning() -> None:
    assert skipped_warning("sockets", []) is None
    line = skipped_warning("sockets", [b"run/s%d" % n for n in range(25)], limit=3)
    assert line == "skipped 25 sockets: run/s0, run/s1, run/s2 and 22 more"
