"""Applying tree deltas: a replica driven only by deltas (plus the content of the files
each delta says to scan, standing in for the channels) must equal the source tree
path by path after every pass, whatever the tree did in between."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import shutil
import stat
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd_cli.common.manifest import ManifestOptions, walk_manifest
from multifd_cli.errors import IOFailure, ProtocolError
from multifd_cli.recv.tree import TreeApplier
from multifd_cli.send.tree import (
    Snapshot,
    TreeDelta,
    TreeTracker,
    dir_finish,
    open_scanned,
    scan_tree,
    snapshot_manifest,
)
from multifd_cli.wire.treeops import Op, TreeOp

ROOT = os.geteuid() == 0
OPTS = ManifestOptions(mtimes=True, owners=ROOT, devices=ROOT)


class Replica:
    """A staging tree and its id directory, side by side as recv would keep them."""

    def __init__(self, base: Path, *, fd_cache: int = 4, dir_cache: int = 2) -> None:
        self.tree = base / "staging"
        self.ids = base / ".ids"
        self.tree.mkdir()
        self.ids.mkdir()
        self.root_fd = os.open(self.tree, os.O_RDONLY | os.O_DIRECTORY)
        self.ids_fd = os.open(self.ids, os.O_RDONLY | os.O_DIRECTORY)
        self.applier = TreeApplier(self.root_fd, self.ids_fd, fd_cache=fd_cache, dir_cache=dir_cache)

    def close(self) -> None:
        self.applier.close()
        os.close(self.root_fd)
        os.close(self.ids_fd)


def play_pass(
    src: Path,
    tracker: TreeTracker,
    rep: Replica,
    order: Callable[[list[TreeOp]], list[TreeOp]] | None = None,
    snap: Snapshot | None = None,
) -> TreeDelta:
    """One pass: scan (or take SNAP), diff, apply, copy the scanned files' content, set times."""
    snap = scan_tree(src) if snap is None else snap
    delta = tracker.advance(snap)
    rep.applier.begin_epoch()
    ops = list(delta.ops())
    if order is not None:
        ops = order(ops)
    rep.applier.apply(ops)
    for item in delta.scan():
        rfd = open_scanned(bytes(src), item.path, item.dev, item.ino)
        assert rfd is not None, f"{item.path!r} no longer holds the inode the walk saw"
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        fd = rep.applier.file_fd(item.fid)
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    rep.applier.apply(delta.times())
    rep.applier.apply(dir_finish(snap))
    return delta


def tree_state(root: Path) -> tuple[dict[str, tuple[object, ...]], list[list[str]]]:
    """Every path's type, mode, size, mtime, owner, target and content; and the
    hard-link groups, as sorted path lists."""
    state: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for rel in _walk(root, ""):
        full = root / rel if rel else root
        s = os.lstat(full)
        fmt = stat.S_IFMT(s.st_mode)
        content: object = None
        if fmt == stat.S_IFREG:
            content = hashlib.sha256(full.read_bytes()).hexdigest()
            inodes[(s.st_dev, s.st_ino)].append(rel)
        elif fmt == stat.S_IFLNK:
            content = os.readlink(full)
        mode = 0 if fmt == stat.S_IFLNK else stat.S_IMODE(s.st_mode)
        size = s.st_size if fmt in (stat.S_IFREG, stat.S_IFLNK) else 0
        state[rel] = (fmt, mode, size, s.st_mtime_ns, s.st_uid, s.st_gid, content)
    groups = sorted(sorted(p) for p in inodes.values() if len(p) > 1)
    return state, groups


def _walk(root: Path, rel: str) -> Iterator[str]:
    yield rel
    full = root / rel if rel else root
    if full.is_symlink() or not full.is_dir():
        return
    for name in sorted(os.listdir(full)):
        yield from _walk(root, f"{rel}/{name}" if rel else name)


def assert_replica_equals(src: Path, rep: Replica) -> None:
    assert tree_state(rep.tree) == tree_state(src)
    want = snapshot_manifest(scan_tree(src), OPTS).digest()
    assert walk_manifest(rep.tree, OPTS).digest() == want
    assert walk_manifest(src, OPTS).digest() == want


# -- the random tree writer ------------------------------------------------------------

NAMES = ["a", "b", "c", "d1", "d2"]
FILE_MODES = [0o600, 0o644, 0o640, 0o400, 0o755]
DIR_MODES = [0o700, 0o755, 0o750]
MUTATIONS = [
    "create", "append", "truncate", "overwrite", "atomic_save", "rename_file", "rename_dir",
    "swap", "hardlink", "unlink", "symlink", "retarget", "mkdir", "rmdir", "rmtree", "chmod",
    "fifo", "file_to_dir", "chown",
]


def _entries(src: Path) -> tuple[list[Path], list[Path], list[Path]]:
    files, dirs, others = [], [src], []
    for rel in _walk(src, ""):
        if not rel:
            continue
        p = src / rel
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            others.append(p)
        elif p.is_dir():
            dirs.append(p)
        else:
            files.append(p)
    return files, dirs, others


def mutate(src: Path, what: str, a: int, b: int, data: bytes) -> None:
    """Apply one mutation, picking its targets by index; impossible ones do nothing."""
    files, dirs, others = _entries(src)
    new = dirs[a % len(dirs)] / NAMES[b % len(NAMES)]
    free = not os.path.lexists(new)
    f = files[a % len(files)] if files else None
    with contextlib.suppress(FileNotFoundError, FileExistsError, IsADirectoryError,
                             NotADirectoryError, OSError):
        if what == "create" and free:
            new.write_bytes(data)
        elif what == "append" and f:
            with f.open("ab") as fh:
                fh.write(data or b"x")
        elif what == "truncate" and f:
            os.truncate(f, b % (f.stat().st_size + 1))
        elif what == "overwrite" and f:
            size = f.stat().st_size
            with f.open("r+b") as fh:
                fh.write(bytes((x + 1) % 256 for x in f.read_bytes()[:size]))
        elif what == "atomic_save" and f:
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_bytes(data + b"saved")
            os.chmod(tmp, FILE_MODES[b % len(FILE_MODES)])
            os.replace(tmp, f)
        elif what == "rename_file" and f and (free or (new.is_file() and not new.is_symlink())):
            os.replace(f, new)
        elif what == "rename_dir" and len(dirs) > 1 and free:
            d = dirs[1 + a % (len(dirs) - 1)]
            if not str(new).startswith(str(d) + "/"):
                os.rename(d, new)
        elif what == "swap" and len(files) > 1:
            x, y = files[a % len(files)], files[b % len(files)]
            if x != y and not os.path.samefile(x, y):
                tmp = x.with_name(x.name + ".swp")
                os.rename(x, tmp)
                os.rename(y, x)
                os.rename(tmp, y)
        elif what == "hardlink" and f and free:
            os.link(f, new)
        elif what == "unlink" and (files or others):
            victims = files + others
            os.unlink(victims[a % len(victims)])
        elif what == "symlink" and free:
            os.symlink(f"../t{b}" if b % 2 else f"t{b}", new)
        elif what == "retarget" and others:
            link = others[a % len(others)]
            if link.is_symlink():
                link.unlink()
                os.symlink(f"r{b}", link)
        elif what == "mkdir" and free:
            new.mkdir()
        elif what in ("rmdir", "rmtree") and len(dirs) > 1:
            d = dirs[1 + a % (len(dirs) - 1)]
            if what == "rmtree":
                shutil.rmtree(d)
            else:
                d.rmdir()
        elif what == "chmod":
            every = files + dirs[1:]
            if every:
                p = every[a % len(every)]
                modes = DIR_MODES if p.is_dir() else FILE_MODES
                os.chmod(p, modes[b % len(modes)])
        elif what == "fifo" and free:
            os.mkfifo(new)
        elif what == "file_to_dir" and f:
            f.unlink()
            f.mkdir()
        elif what == "chown" and ROOT and f:
            os.chown(f, 1000 + b % 3, 1000 + a % 3)


# Files are what most mutations need, so the tree writer makes and moves them often.
WEIGHTED = MUTATIONS + ["create"] * 4 + ["rename_file", "swap", "hardlink", "atomic_save"] * 2

mutation = st.tuples(
    st.sampled_from(WEIGHTED), st.integers(0, 50), st.integers(0, 50), st.binary(max_size=300)
)


@contextlib.contextmanager
def fd_limit(n: int) -> Iterator[None]:
    """Lower the soft RLIMIT_NOFILE in-process: the machine's 20,000 would hide a leak."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(passes=st.lists(st.lists(mutation, max_size=15), min_size=2, max_size=5))
def test_replica_follows_a_changing_tree(passes: list[list[tuple[str, int, int, bytes]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp, fd_limit(256):
        src = Path(tmp) / "src"
        src.mkdir()
        rep = Replica(Path(tmp))
        tracker = TreeTracker()
        try:
            for mutations in passes:
                for what, a, b, data in mutations:
                    mutate(src, what, a, b, data)
                play_pass(src, tracker, rep)
                assert_replica_equals(src, rep)
                assert len(rep.applier.files) <= 4
        finally:
            rep.close()


# -- moves, swaps and cycles, and the negative control ---------------------------------


def _moved_first(ops: list[TreeOp]) -> list[TreeOp]:
    """A broken order: moved files land on their new paths before their old paths
    are given up, i.e. the temp-name (out) step is skipped."""
    outs = {op.fid for op in ops if op.op == Op.UNLINK and any(
        o.op == Op.LINK and o.fid == op.fid for o in ops)}
    links = [op for op in ops if op.op == Op.LINK and op.fid in outs]
    return links + [op for op in ops if op not in links]


def _cycle(src: Path, names: list[str]) -> None:
    """a->b, b->c, ..., last->a through one temporary name."""
    os.rename(src / names[-1], src / "cycle.tmp")
    for x, y in zip(reversed(names[:-1]), reversed(names[1:])):
        os.rename(src / x, src / y)
    os.rename(src / "cycle.tmp", src / names[0])


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"]])
def test_swap_and_cycle_are_moves_not_resends(tmp_path: Path, names: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(n.encode() * 1000)
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    snap = tracker.snapshot
    assert snap is not None
    fids = {n: snap.fid[i] for i, n in _by_name(tracker)}
    _cycle(src, names)
    delta = play_pass(src, tracker, rep)
    assert delta.dropped == []
    assert not [op for op in delta.ops() if op.op == Op.CREATE]
    moved = {os.fsdecode(op.path): op.fid for op in delta.ops() if op.op == Op.LINK}
    assert moved == {names[(i + 1) % len(names)]: fids[n] for i, n in enumerate(names)}
    assert_replica_equals(src, rep)
    rep.close()


def _by_name(tracker: TreeTracker) -> list[tuple[int, str]]:
    snap = tracker.snapshot
    assert snap is not None
    return [(i, os.fsdecode(snap.name(i))) for i in range(1, len(snap))]


def test_negative_control_skipping_the_out_step_breaks_a_swap(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 100)
    (src / "b").write_bytes(b"B" * 100)
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    _cycle(src, ["a", "b"])
    broken = _moved_first(list(tracker.advance(scan_tree(src)).ops()))
    assert sorted(op.path for op in broken[:2]) == [b"a", b"b"]  # the control's premise
    rep.applier.begin_epoch()
    with pytest.raises(ProtocolError, match="LINK of [ab] does not fit the replica: File exists"):
        rep.applier.apply(broken)
    rep.close()


def test_an_op_out_of_phase_order_is_refused(tmp_path: Path) -> None:
    """A move applied link-first would work here (no other file holds the new path),
    but the order is what makes swaps sound, so the receiver enforces it."""
    rep = Replica(tmp_path)
    rep.applier.apply([TreeOp(Op.CREATE, b"a", 0, mode=0o644, size=0)])
    rep.applier.begin_epoch()
    with pytest.raises(ProtocolError, match="UNLINK out of order"):
        rep.applier.apply([TreeOp(Op.LINK, b"c", 0), TreeOp(Op.UNLINK, b"a", 0)])
    rep.applier.begin_epoch()
    rep.applier.apply([TreeOp(Op.CREATE, b"n", 1, mode=0o644, size=0), TreeOp(Op.LINK, b"m", 1)])
    with pytest.raises(ProtocolError, match="MKDIR out of order"):
        rep.applier.apply([TreeOp(Op.MKDIR, b"late", mode=0o755)])
    rep.close()


def test_atomic_save_is_a_new_id_and_rename_keeps_the_id(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "wal1").write_bytes(b"w" * 4096)
    (src / "db").write_bytes(b"old")
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    os.rename(src / "wal1", src / "wal2")
    (src / "db.tmp").write_bytes(b"new content")
    os.replace(src / "db.tmp", src / "db")
    delta = play_pass(src, tracker, rep)
    kinds = [(op.op, os.fsdecode(op.path)) for op in delta.ops()]
    assert (Op.LINK, "wal2") in kinds and (Op.UNLINK, "wal1") in kinds
    assert (Op.CREATE, "db") in kinds and len(delta.dropped) == 1
    assert_replica_equals(src, rep)
    rep.close()


def test_a_renamed_directory_moves_its_files_ids(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pg_wal").mkdir(parents=True)
    for n in range(3):
        (src / "pg_wal" / f"seg{n}").write_bytes(b"%d" % n * 4096)
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    os.rename(src / "pg_wal", src / "pg_xlog")
    delta = play_pass(src, tracker, rep)
    assert delta.dropped == [] and not [op for op in delta.ops() if op.op == Op.CREATE]
    assert [(op.op, op.path) for op in delta.ops() if op.op in (Op.RMDIR, Op.MKDIR)] == [
        (Op.RMDIR, b"pg_wal"), (Op.MKDIR, b"pg_xlog")
    ]
    assert sorted(op.path for op in delta.ops() if op.op == Op.LINK) == [
        b"pg_xlog/seg0", b"pg_xlog/seg1", b"pg_xlog/seg2"
    ]
    assert_replica_equals(src, rep)
    rep.close()


def test_hard_links_gain_and_lose_single_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"data")
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    os.link(src / "x", src / "y")
    delta = play_pass(src, tracker, rep)
    assert [(op.op, op.path, op.fid) for op in delta.ops()] == [(Op.LINK, b"y", 0)]
    assert_replica_equals(src, rep)
    os.unlink(src / "x")
    delta = play_pass(src, tracker, rep)
    assert [(op.op, op.path, op.fid) for op in delta.ops()] == [(Op.UNLINK, b"x", 0)]
    assert delta.dropped == []
    assert_replica_equals(src, rep)
    rep.close()


def _racy_walk(src: Path, seen_alone: str) -> Snapshot:
    """A walk that lstat'd SEEN_ALONE before a link() to it: it says one link there."""
    snap = scan_tree(src)
    i = next(i for i, p in snap.walk() if p == seen_alone.encode())
    snap.nlink[i] = 1
    return snap


def test_a_link_the_walk_missed_does_not_drop_the_file(tmp_path: Path) -> None:
    """Pass 1's walk saw x with one link and its new link y with two; when y goes, x
    keeps the file: it is not dropped (as it was, leaving recv without the file's id
    while send still sent its pages)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"data")
    os.link(src / "x", src / "y")
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep, snap=_racy_walk(src, "x"))
    assert_replica_equals(src, rep)
    os.unlink(src / "y")
    delta = play_pass(src, tracker, rep)
    assert [(op.op, op.path, op.fid) for op in delta.ops()] == [(Op.UNLINK, b"y", 0)]
    assert delta.dropped == []
    assert_replica_equals(src, rep)
    rep.close()


def test_one_inode_under_two_ids_is_merged_once_the_walk_agrees(tmp_path: Path) -> None:
    """A walk that raced with link() gave the new path its own id; the next walk sees
    both paths with two links, and the path moves onto the first id."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"data")
    rep = Replica(tmp_path)
    tracker = TreeTracker()
    play_pass(src, tracker, rep)
    os.link(src / "x", src / "y")
    delta = play_pass(src, tracker, rep, snap=_racy_walk(src, "x"))
    assert [(op.op, op.path) for op in delta.ops()] == [(Op.CREATE, b"y")]  # the race
    delta = play_pass(src, tracker, rep)
    assert [(op.op, op.path, op.fid) for op in delta.ops()] == [
        (Op.UNLINK, b"y", 1), (Op.DROP, b"", 1), (Op.LINK, b"y", 0),
    ]
    assert delta.dropped == [1]
    assert_replica_equals(src, rep)
    rep.close()


# -- bounded descriptors, hostile paths, names too long --------------------------------


def test_a_thousand_files_under_a_256_fd_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(60):
            (src / f"d{d}" / f"f{f}").write_bytes(b"%d/%d" % (d, f))
    rep = Replica(tmp_path, fd_cache=64, dir_cache=16)
    tracker = TreeTracker()
    open_before = len(os.listdir("/proc/self/fd"))
    with fd_limit(256):
        play_pass(src, tracker, rep)
        for d in range(20):
            with (src / f"d{d}" / "f0").open("ab") as fh:
                fh.write(b"more")
        play_pass(src, tracker, rep)
    assert len(rep.applier.files) <= 64
    assert len(os.listdir("/proc/self/fd")) - open_before <= 64 + 16
    assert_replica_equals(src, rep)
    rep.close()


@pytest.mark.parametrize("path", [b"../x", b"/etc/x", b"a/../../x", b"a//b", b"./x", b"a\0b"])
def test_paths_leaving_the_staging_directory_are_refused(tmp_path: Path, path: bytes) -> None:
    rep = Replica(tmp_path)
    (rep.tree / "a").mkdir()
    with pytest.raises(ProtocolError):
        rep.applier.apply([TreeOp(Op.MKDIR, path, mode=0o755)])
    assert sorted(os.listdir(tmp_path)) == [".ids", "staging"]
    rep.close()


def test_a_symlink_in_the_replica_is_never_followed(tmp_path: Path) -> None:
    rep = Replica(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    rep.applier.apply([TreeOp(Op.SYMLINK, b"link", target=str(outside).encode())])
    with pytest.raises(ProtocolError):
        rep.applier.apply([TreeOp(Op.MKDIR, b"link/evil", mode=0o755)])
    with pytest.raises(ProtocolError):
        rep.applier.apply([TreeOp(Op.CREATE, b"link/evil", 7, mode=0o644, size=0)])
    assert os.listdir(outside) == []
    rep.close()


def test_pages_for_an_unknown_file_id_are_a_protocol_error(tmp_path: Path) -> None:
    rep = Replica(tmp_path)
    with pytest.raises(ProtocolError, match="file id 42"):
        rep.applier.file_fd(42)
    rep.close()


def test_a_name_too_long_for_dest_is_an_io_failure_naming_it(tmp_path: Path) -> None:
    rep = Replica(tmp_path)
    name = b"n" * 300
    with pytest.raises(IOFailure, match="n{300}: name too long"):
        rep.applier.apply([TreeOp(Op.MKDIR, name, mode=0o755)])
    rep.close()


def test_devices_are_skipped_with_one_list_without_mknod(tmp_path: Path) -> None:
    rep = Replica(tmp_path)
    rep.applier.can_mknod = False
    ops = [
        TreeOp(Op.MKNOD, b"null", mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        TreeOp(Op.MKNOD, b"sock", mode=stat.S_IFSOCK | 0o755),
        TreeOp(Op.MKNOD, b"pipe", mode=stat.S_IFIFO | 0o640),
    ]
    rep.applier.apply(ops)
    rep.applier.apply([TreeOp(Op.TIMES, b"null", mtime_ns=10**18)])
    assert rep.applier.skipped == [b"null", b"sock"]
    rep.applier.begin_epoch()
    rep.applier.apply([TreeOp(Op.REMOVE, b"null"), TreeOp(Op.MKDIR, b"null", mode=0o755)])
    assert os.path.isdir(rep.tree / "null")
    assert stat.S_ISFIFO(os.lstat(rep.tree / "pipe").st_mode)
    assert stat.S_IMODE(os.lstat(rep.tree / "pipe").st_mode) == 0o640
    rep.close()


@pytest.mark.skipif(not ROOT, reason="device nodes need root")
def test_devices_are_created_as_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    try:
        os.mknod(src / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError as e:
        pytest.skip(f"mknod not allowed here: {errno.errorcode[e.errno or 0]}")
    rep = Replica(tmp_path)
    play_pass(src, TreeTracker(), rep)
    assert os.lstat(rep.tree / "null").st_rdev == os.makedev(1, 3)
    assert_replica_equals(src, rep)
    rep.close()


def test_release_ids_leaves_the_tree_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"x" * 10)
    os.link(src / "x", src / "y")
    rep = Replica(tmp_path)
    play_pass(src, TreeTracker(), rep)
    rep.applier.release_ids()
    assert os.listdir(rep.ids) == []
    assert os.lstat(rep.tree / "x").st_nlink == 2
    assert_replica_equals(src, rep)
    rep.close()


def _as_nobody_if_root(body: Callable[[], None]) -> None:
    """Run BODY as an unprivileged user: in a forked child when we are root."""
    if not ROOT:
        body()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            body()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_root_a_read_only_file_still_takes_pages() -> None:
    """A 0400 source file: recv as a user opens its id file for writing by lifting
    the mode for the open only, even after the descriptor was evicted."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chown(tmp, 65534, 65534)

        def body() -> None:
            rep = Replica(Path(tmp), fd_cache=1)
            assert not rep.applier.keep_owner and not rep.applier.can_mknod
            rep.applier.apply([
                TreeOp(Op.CREATE, b"ro", 0, mode=0o400, size=3),
                TreeOp(Op.CREATE, b"other", 1, mode=0o644, size=0),  # evicts fid 0
                TreeOp(Op.MKNOD, b"null", mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
            ])
            os.pwrite(rep.applier.file_fd(0), b"abc", 0)
            rep.applier.apply([TreeOp(Op.META, b"ro", 0, mode=0o440, size=3)])
            rep.close()
            assert (rep.tree / "ro").read_bytes() == b"abc"
            assert stat.S_IMODE(os.lstat(rep.tree / "ro").st_mode) == 0o440
            assert rep.applier.skipped == [b"null"]

        _as_nobody_if_root(body)


def test_replica_follows_a_changing_tree_without_root() -> None:
    """The property test's loop, run as a user: no owners kept, 0400 files reopened
    for pages, devices never created. Seeded, so that a failure replays."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chown(tmp, 65534, 65534)

        def body() -> None:
            import random

            for seed in range(12):
                rng = random.Random(seed)
                base = Path(tmp) / str(seed)
                src = base / "src"
                src.mkdir(parents=True)
                rep = Replica(base)
                tracker = TreeTracker()
                for _ in range(4):
                    for _ in range(15):
                        mutate(src, rng.choice(WEIGHTED), rng.randrange(50), rng.randrange(50),
                               rng.randbytes(rng.randrange(300)))
                    play_pass(src, tracker, rep)
                    assert_replica_equals(src, rep)
                rep.close()

        _as_nobody_if_root(body)
