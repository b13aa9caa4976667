"""The kernel tracker for directory trees, inside real migrations and in its pure parts.

A live tree (small files whose shape a tree writer changes, plus two 64 MiB files
rewritten a page at a time by pwrite and through a shared mapping) is migrated
with `--tracker kernel --pause-pid`: the copy must equal the tree at the pause,
and the later passes must read only about what was written (`read_bytes` of the
pass event), not the big files whole. The negative controls use
MULTIFD_TEST_KTRACE: `blind` drops every write event, so only the stat net can
save the copy (it does, for writers that move mtime); `blind,no-net` trusts the
empty windows and the copy must go wrong.

recv writes DEST on the same disk, and its writes pass the tracker's device
filter. test_recv_writes_do_not_overrun_later_windows measures that: pass 1's
window may overflow (whole-copy writes: pass 2 then reads by stat, as without
the tracker), later windows must not.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers.mfdkit import Kit, release
from helpers.treekit import TreeWriter, assert_replica, populate
from test_kernel_tracker import kdir, make_source  # noqa: F401 (fixtures)

from multifd_cli.send.ktrace.treeplan import FilePlan, FileState, PlanStats, plan_delta, plan_file
from multifd_cli.send.ktrace.treewatch import TreeKernelTracker, TreeWindow
from multifd_cli.send.tree.diff import ScanItem, TreeTracker
from multifd_cli.send.tree.files import read_spans
from multifd_cli.send.tree.scan import scan_tree

MiB = 1 << 20
PAGE = 4096
BIG = 64 * MiB
RUNS = range(3)

# A gentle writer: one 4 KiB store every 20 ms, by pwrite or through a shared mapping,
# each a new counter, so a missed page differs from the copy.
SLOW_WRITER = r"""
import mmap, os, random, struct, sys, time
path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED) if mode == "mmap" else None
print("ready", flush=True)
n = 0
while True:
    n += 1
    page = rng.randrange(size // 4096)
    data = struct.pack("<QQ", n, page) * 256
    if m is not None:
        m[page * 4096 : page * 4096 + 4096] = data
    else:
        os.pwrite(fd, data, page * 4096)
    time.sleep(0.02)
"""


class SlowWriter:
    def __init__(self, path: Path, mode: str, seed: int) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", SLOW_WRITER, str(path), mode, str(seed)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        assert self.popen.stdout is not None
        assert self.popen.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        release(self.pid)
        self.popen.kill()
        self.popen.wait(10)


@pytest.fixture
def writers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for w in started:
        w.kill()


def passes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "pass"]


def live_tree(kit: Kit, base: Path, writers: list[Any], seed: int, *args: str,
              env: dict[str, str] | None = None, shape: bool = True,
              modes: tuple[str, ...] = ("pwrite", "mmap"), tracker: str = "kernel"
              ) -> tuple[Path, Path, Any]:
    """Migrate a live tree with --tracker kernel; returns (src, dest, send's Done)."""
    src, dest = base / "src", base / "dest"
    # The tree writer changes the shape of shape/ only: the big files stay where they are.
    populate(src / "shape", 150, seed)
    (src / "big").mkdir()
    for mode in modes:
        make_source(src / "big" / f"{mode}.dat", BIG, seed=seed)
    pids = []
    if shape:
        tw = TreeWriter(src / "shape", base / "counts", rate=100, seed=seed, files=150)
        writers.append(tw)
        pids.append(tw.pid)
    for mode in modes:
        w = SlowWriter(src / "big" / f"{mode}.dat", mode, seed)
        writers.append(w)
        pids.append(w.pid)
    time.sleep(0.3)
    recv, uri = kit.recv(dest, "--force")
    pause = [a for p in pids for a in ("--pause-pid", str(p))]
    send = kit.send(src, uri, "--tracker", tracker, *pause, "--downtime-limit", "1",
                    "--max-passes", "5", *args, env=env, timeout=60)
    done = send.wait(240)
    done.ok()
    recv.wait(60).ok()
    return src, dest, done


@pytest.mark.parametrize("run", RUNS)
def test_live_tree_reads_what_was_written(kdir: Path, kit: Kit,  # noqa: F811
                                          writers: list[Any], run: int) -> None:
    src, dest, done = live_tree(kit, kdir, writers, seed=run + 1)
    assert_replica(src, dest, owners=True)  # the writers are still paused (keep-paused)
    ps = passes(done.events)
    assert len(ps) >= 4, ps
    assert all(p["tracker"] == "kernel" for p in ps), ps
    assert ps[0]["read_bytes"] >= 2 * BIG, ps[0]
    # Pass 3 on: each big file had some 25 stores per pass, a folio (at most 2 MiB) each.
    # The stat rule reads both whole every pass (128 MiB): the tracker reads a fraction.
    later = [p for p in ps[2:] if not p["tracker_fallback"].startswith("every tree file")]
    assert later, ps
    assert all(p["read_bytes"] < BIG for p in later), later
    # A short window may hold no store at all; over the later passes some must.
    assert sum(p["tracker_ranged_files"] for p in later) >= 1, later
    # The final pass (writers paused) read at most what its short window reported.
    assert ps[-1]["final"] and ps[-1]["read_bytes"] < BIG, ps[-1]


@pytest.mark.parametrize("run", RUNS)
def test_blind_tree_tracker_is_caught_by_the_safety_net(kdir: Path, kit: Kit,  # noqa: F811
                                                        writers: list[Any], run: int) -> None:
    """Negative control, half one: no event reaches the tracker. pwrite moves mtime, so
    the stat net reads the written files whole and the copy is right."""
    src, dest, done = live_tree(kit, kdir, writers, 10 + run, modes=("pwrite",),
                                env={"MULTIFD_TEST_KTRACE": "blind"})
    assert_replica(src, dest, owners=True)
    later = passes(done.events)[1:]
    assert any("saw no write" in p["tracker_fallback"] for p in later), later


@pytest.mark.parametrize("run", RUNS)
def test_blind_tree_tracker_without_the_net_loses_writes(kdir: Path, kit: Kit,  # noqa: F811
                                                         writers: list[Any], run: int) -> None:
    """Negative control, half two: blind and without the net, the big file's stores after
    pass 1 are never read, and the copy differs. The comparison above can fail."""
    src, dest, done = live_tree(kit, kdir, writers, 20 + run, modes=("pwrite",), shape=False,
                                env={"MULTIFD_TEST_KTRACE": "blind,no-net"})
    big = Path("big") / "pwrite.dat"
    assert (src / big).read_bytes() != (dest / big).read_bytes()
    ps = passes(done.events)
    trusted = [p for p in ps[1:] if not p["tracker_fallback"].startswith("every tree file")]
    assert trusted and all(p["read_bytes"] < BIG for p in trusted), ps


@pytest.mark.parametrize("run", RUNS)
def test_overrun_windows_fall_back_to_the_stat_rule(kdir: Path, kit: Kit,  # noqa: F811
                                                    writers: list[Any], run: int) -> None:
    """A 4 KiB buffer overruns in most windows: those passes read by stat, the files the
    last trusted plan left to the lost window included, and the copy is still right."""
    src, dest, done = live_tree(kit, kdir, writers, 40 + run,
                                env={"MULTIFD_TEST_KTRACE": "buffer=4"})
    assert_replica(src, dest, owners=True)
    ps = passes(done.events)
    assert any(p["tracker_fallback"].startswith("every tree file") for p in ps[1:]), ps


def test_recv_writes_do_not_overrun_later_windows(kdir: Path, kit: Kit,  # noqa: F811
                                                  writers: list[Any]) -> None:
    """recv's whole-copy writes land on the same disk and pass the device filter. Only
    pass 2 (the window of pass 1's copy) may fall back; later windows stay whole."""
    src, dest, done = live_tree(kit, kdir, writers, 31, shape=False)
    assert_replica(src, dest, owners=True)
    ps = passes(done.events)
    lost = [p["pass"] for p in ps[2:] if p["tracker_fallback"].startswith("every tree file")]
    assert not lost, ps


def test_tracker_kernel_on_a_tmpfs_tree(kit: Kit) -> None:
    """--tracker kernel: exit 2 in one line; auto: one WARNING, the stat rule, the reason
    in every pass event, and a correct copy."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm tmpfs")
    src = shm / f"mfd-ktree-{os.getpid()}"
    populate(src, 20, 3)
    try:
        recv, uri = kit.recv(kit.tmp / "dst")
        msg = kit.send(src, uri, "--tracker", "kernel").wait(30).error(2)
        assert "tmpfs has no writeback" in msg and "\n" not in msg.strip(), msg
        recv.kill()
        recv2, uri2 = kit.recv(kit.tmp / "dst2")
        done = kit.send(src, uri2).wait(60)
        done.ok()
        recv2.wait(60).ok()
        warn = [ln for ln in done.err.splitlines() if "WARNING" in ln and "tracker" in ln]
        assert len(warn) == 1 and "tmpfs" in warn[0], done.err
        for p in passes(done.events):
            assert p["tracker"] == "hash" and "tmpfs" in p["tracker_reason"], p
        assert_replica(src, kit.tmp / "dst2", owners=True)
    finally:
        subprocess.run(["rm", "-rf", str(src)], check=False)


# -- the tracker itself, in process ---------------------------------------------------------------


def _odirect_write(path: Path, offset: int) -> None:
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    buf.write(b"d" * PAGE)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


def test_tree_tracker_sees_every_kind_of_write(kdir: Path) -> None:  # noqa: F811
    """pwrite, a shared mapping's store, O_DIRECT, a punched hole, a truncate, and a file
    created after the tracker started: each reaches the next window under its inode."""
    names = ("pw", "mm", "direct", "punch", "trunc")
    for n in names:
        make_source(kdir / n, 1 * MiB, seed=3)
    ino = {n: os.stat(kdir / n).st_ino for n in names}
    with TreeKernelTracker({os.stat(kdir).st_dev: str(kdir)}) as t:
        assert t.begin_pass().full  # the first pass reads everything
        with open(kdir / "pw", "r+b") as f:
            f.seek(5 * PAGE)
            f.write(b"x")
        with open(kdir / "mm", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[9 * PAGE] = 1
        _odirect_write(kdir / "direct", 2 * PAGE)
        fd = os.open(kdir / "punch", os.O_RDWR)
        try:
            fallocate = ctypes.CDLL(None, use_errno=True).fallocate
            fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            assert fallocate(fd, 3, 0, PAGE) == 0  # PUNCH_HOLE | KEEP_SIZE
        finally:
            os.close(fd)
        os.truncate(kdir / "trunc", PAGE)
        (kdir / "new").write_bytes(b"n" * 100)
        w = t.begin_pass()
    assert not w.full, w.reason
    assert any(i * PAGE <= 5 * PAGE < t.extent(i)[1] for i in w.folios.get(ino["pw"], ())), w
    assert any(i * PAGE <= 9 * PAGE < t.extent(i)[1] for i in w.folios.get(ino["mm"], ())), w
    assert w.nopage.get(ino["direct"], "").startswith("iomap_dio"), w.nopage
    assert w.nopage.get(ino["punch"]) == "ext4_punch_hole", w.nopage
    assert w.nopage.get(ino["trunc"]) == "ext4_truncate_enter", w.nopage
    assert os.stat(kdir / "new").st_ino in w.folios, w


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "no-writeback"])
def test_syncfs_makes_a_dirty_folio_report_again(kdir: Path, syncfs: bool) -> None:  # noqa: F811
    """The pass start's syncfs cleans every folio, so a store to a folio dirtied before the
    marker is reported again. The control: a pass start without writeback (as the final
    one is) leaves it dirty, and the second store emits nothing; that is the write a
    tracker without the writeback would miss."""
    src = make_source(kdir / "f", 1 * MiB, seed=4)
    ino = os.stat(src).st_ino
    with TreeKernelTracker({os.stat(kdir).st_dev: str(kdir)}) as t:
        t.begin_pass()
        with open(src, "r+b") as f:
            f.write(b"a")
            f.flush()
            t.begin_pass(final=not syncfs)  # final: no syncfs
            f.seek(0)
            f.write(b"b")
        w = t.begin_pass()
    assert (0 in w.folios.get(ino, ())) == syncfs, w.folios


# -- the pure parts ----------------------------------------------------------------------------

EXT = 1 << 16  # a stand-in folio: 16 pages


def extent(i: int) -> tuple[int, int]:
    return i * PAGE, i * PAGE + EXT


OLD = FileState(size=BIG, mtime_ns=100, ctime_ns=100)


@pytest.mark.parametrize("old, new, folios, nopage, want", [
    # New to the walk: read whole.
    (None, OLD, (), None, "whole"),
    # Nothing moved, no event (a mapped file, a racily clean one): nothing to read.
    (OLD, OLD, (), None, []),
    # ctime alone (rename, chmod, link) with no event: no data changed.
    (OLD, FileState(BIG, 100, 200), (), None, []),
    # mtime moved with no event (an unseen write): the net reads it whole.
    (OLD, FileState(BIG, 200, 200), (), None, "whole"),
    # size moved with no event (an extending ftruncate): whole too.
    (OLD, FileState(BIG + 1, 100, 200), (), None, "whole"),
    # Events: their folio extents, merged.
    (OLD, FileState(BIG, 200, 200), (3, 4), None, [(3 * PAGE, 4 * PAGE + EXT)]),
    # Events with no stat change (stores through a mapping in the same tick).
    (OLD, OLD, (7,), None, [(7 * PAGE, 7 * PAGE + EXT)]),
    # Events and growth: the grown tail too.
    (OLD, FileState(BIG + 10, 200, 200), (0,), None, [(0, EXT), (BIG, BIG + 10)]),
    # A no-page event (fallocate, punch, direct I/O) or a shrink: whole.
    (OLD, FileState(BIG, 200, 200), (3,), "iomap_dio_complete", "whole"),
    (OLD, OLD, (), "ext4_punch_hole", "whole"),
    (OLD, FileState(BIG - 1, 200, 200), (3,), None, "whole"),
])
def test_plan_file(old: FileState | None, new: FileState, folios: tuple[int, ...],
                   nopage: str | None, want: Any) -> None:
    plan = plan_file(old, new, folios, nopage, extent)
    if want == "whole":
        assert plan.whole and plan.reason, plan
    else:
        assert plan == FilePlan(want), plan


def test_plan_file_a_write_after_the_marker_waits_for_its_window() -> None:
    """mtime moved, no event in this window, but one after its marker (the write fell
    between the marker and the walk): the next window reads it; none later: whole."""
    moved = FileState(BIG, 200, 200)
    assert plan_file(OLD, moved, (), None, extent, later=True) == FilePlan([])
    assert plan_file(OLD, moved, (), None, extent, later=False).whole
    grown = FileState(BIG + PAGE, 200, 200)
    assert plan_file(OLD, grown, (), None, extent, later=True) == FilePlan([(BIG, BIG + PAGE)])


def test_plan_file_without_the_net_trusts_the_empty_window() -> None:
    plan = plan_file(OLD, FileState(BIG + PAGE, 200, 200), (), None, extent, safety_net=False)
    assert plan == FilePlan([(BIG, BIG + PAGE)])
    assert plan_file(OLD, FileState(BIG, 200, 200), (), None, extent, safety_net=True).whole


def test_read_spans_round_to_pages_and_cut_at_the_size() -> None:
    size = 10 * PAGE + 5
    item = ScanItem(1, b"f", 1, 2, size, ((PAGE + 1, PAGE + 2), (5 * PAGE, 20 * PAGE),
                                          (2 * PAGE - 1, 2 * PAGE + 1), (30 * PAGE, 31 * PAGE)))
    assert read_spans(item, PAGE) == [(PAGE, 3 * PAGE), (5 * PAGE, size)]
    assert read_spans(item._replace(ranges=None), PAGE) == [(0, size)]
    assert read_spans(item._replace(size=0, ranges=None), PAGE) == []
    assert read_spans(item._replace(ranges=()), PAGE) == []


def test_plan_delta_on_a_real_walk(tmp_path: Path) -> None:
    """Two real walks and a made-up window: the file with events is read where they point
    (though its stat did not move), the renamed one is skipped, the new one read whole,
    an untraced device's file and an unread one whole."""
    root = tmp_path / "t"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(os.urandom(8 * PAGE))
    old_ns = time.time_ns() - 10**9
    for name in ("a", "b", "c"):
        os.utime(root / name, ns=(old_ns, old_ns))
    tracker = TreeTracker()
    tracker.advance(scan_tree(os.fsencode(root)))
    time.sleep(0.05)
    os.rename(root / "b", root / "b2")  # ctime only
    (root / "d").write_bytes(b"new")
    os.utime(root / "c", ns=(old_ns + 1, old_ns + 1))  # mtime, no event
    snap = scan_tree(os.fsencode(root))
    delta = tracker.advance(snap)
    ino = {n: os.stat(root / n).st_ino for n in ("a", "b2", "c", "d")}
    dev = os.stat(root).st_dev
    window = TreeWindow(2, False, "", {ino["a"]: {1}}, {}, 1, 0.0)
    stats = PlanStats()
    got = {os.fsdecode(i.path): i.ranges
           for i in plan_delta(delta, window, {dev}, set(), extent, stats)}
    assert got == {"a": ((PAGE, 8 * PAGE),), "c": None, "d": None}, got
    assert stats.ranged == 1 and stats.whole["new to the walk"] == 1, stats
    # a's pages go with no stat change: its mtime must be set again after them.
    assert "a" in {os.fsdecode(op.path) for op in delta.times()}
    # Not traced: the delta's files, whole (a and b2 too: their ctime is racily close
    # to the first walk, which only the kernel window can vouch for).
    got = {os.fsdecode(i.path): i.ranges
           for i in plan_delta(delta, window, {dev + 1}, set(), extent, PlanStats())}
    assert set(got) == {"a", "b2", "c", "d"} and all(r is None for r in got.values()), got
    # c's mtime moved with no event in the window but one after its marker: left to the
    # next window, and owed to a pass whose window is lost.
    stats = PlanStats()
    got = {os.fsdecode(i.path): i.ranges for i in plan_delta(
        delta, window, {dev}, set(), extent, stats, later={ino["c"]})}
    assert "c" not in got and stats.owed == {(dev, ino["c"])}, (got, stats)
    # A file the last pass could not read is read whole whatever the window says.
    got = {os.fsdecode(i.path): i.ranges
           for i in plan_delta(delta, window, {dev}, {(dev, ino["a"])}, extent, PlanStats())}
    assert got["a"] is None, got



def test_a_tmpfs_inside_the_tree_keeps_the_stat_rule(kdir: Path, kit: Kit,  # noqa: F811
                                                      writers: list[Any]) -> None:
    """The tree is on ext4 with a tmpfs mounted inside: the kernel tracker takes the ext4
    part, the tmpfs part keeps the stat rule (its mapped file is read every pass), one
    WARNING line and every pass event say so, and the copy is right."""
    src, dest = kdir / "src", kdir / "dest"
    (src / "mnt").mkdir(parents=True)
    make_source(src / "disk.dat", 8 * MiB, seed=5)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                       str(src / "mnt")]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_source(src / "mnt" / "shm.dat", 4 * MiB, seed=6)
        pids = []
        for path, mode in ((src / "disk.dat", "pwrite"), (src / "mnt" / "shm.dat", "mmap")):
            w = SlowWriter(path, mode, 7)
            writers.append(w)
            pids.append(w.pid)
        recv, uri = kit.recv(dest, "--force")
        pause = [a for p in pids for a in ("--pause-pid", str(p))]
        done = kit.send(src, uri, "--tracker", "kernel", *pause, "--downtime-limit", "1",
                        "--max-passes", "4", timeout=60).wait(180)
        done.ok()
        recv.wait(60).ok()
        assert_replica(src, dest, owners=True)
        warn = [ln for ln in done.err.splitlines() if "WARNING" in ln and "tmpfs" in ln]
        assert len(warn) == 1, done.err
        ps = passes(done.events)
        assert all(p["tracker"] == "kernel" and "tmpfs" in p["tracker_reason"] for p in ps), ps
        # The mapped tmpfs file moves no stat: only the mapping rule reads it, every pass.
        assert all(p["files_read"] >= 1 and p["read_bytes"] >= 4 * MiB for p in ps[1:]), ps
    finally:
        for w in writers:
            w.kill()
        writers.clear()
        subprocess.run(["umount", "-l", str(src / "mnt")], check=False)
