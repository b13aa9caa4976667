"""The kernel dirty tracker: a pass costs what was written, not the source's size.

The kernel emits writeback_dirty_folio when a page-cache folio goes from clean
to dirty, for write(2), pwrite, writev and shared-mmap stores alike. A private
tracefs instance filtered on the sources' inodes collects those events, and
each pass reads only the folios dirtied since the previous pass's marker.

The order at each pass start is what makes this sound:

1. write a marker into the trace (it closes the window the pass will read);
2. write the sources back and wait (sync_file_range WAIT_BEFORE|WRITE|WAIT_AFTER;
   WRITE alone skips folios already under writeback), so every folio is clean
   and its next store emits an event again;
3. drain the trace; the caller then reads what the window reported.

Written back first and marked second, a folio stored to again between the two
is still dirty at the marker: its store emits nothing and no window ever
reports it. A folio whose event lands after the marker is carried into the
next window, so a store racing with this pass's read is read again next pass.

A lost buffer (ring-buffer overrun, an unreadable line, a missing marker)
makes the pass fall back to hashing every source, and the tracker re-marks
until the window after its marker is intact, so the pass after is exact again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, cast

from multifd_cli.send.ktrace import bio, parse, tracefs
from multifd_cli.send.ktrace.safety import SourceStat, grown_range, rescan_reason

WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4
DEFAULT_BUFFER_KB = 2048  # per CPU: about 30,000 folio events before an overrun
MAX_FOLIO_BYTES = 2 << 20  # the page cache's largest folio on x86-64 and arm64 (4 KiB pages)
# ext2 and ext3 are served by the ext4 driver, so ext4's no-page tracepoints cover
# them. xfs would need its own (zero-range and punch emit no ext4 event) and a test.
SUPPORTED_FS = ("ext4", "ext3", "ext2")
_STAT_COUNTERS = ("overrun:", "commit overrun:", "dropped events:")
_RESYNC_ATTEMPTS = 3
_MAX_INFLIGHT = 8192
FS_IOC_GETFLAGS = 0x80086601
FS_JOURNAL_DATA_FL = 0x00004000

_instances_made = 0


@dataclass
class _Window:
    """What the trace said about the sources since one marker."""

    folios: dict[int, set[int]] = field(default_factory=dict)  # ino -> folio indexes
    nopage: dict[int, str] = field(default_factory=dict)  # ino -> event name
    lost: list[str] = field(default_factory=list)  # why events may be missing
    bios: list[bio.Bio] = field(default_factory=list)  # writes that bypassed the page cache
    own: list[bio.Bio] = field(default_factory=list)  # our writeback's bios: narrow the folios
    events: int = 0

    def absorb(self, other: _Window) -> None:
        for ino, idx in other.folios.items():
            self.folios.setdefault(ino, set()).update(idx)
        self.bios.extend(other.bios)
        self.own.extend(other.own)
        self.nopage.update(other.nopage)
        self.lost.extend(other.lost)
        self.events += other.events


@dataclass
class PassWindow:
    """What one pass must read.

    `full` is set for the first pass and after a lost buffer: hash every
    source. Otherwise read `ranges` for each path, and hash every file in
    `rescan` whole (the reason says why: a no-page change or the stat net).
    """

    seq: int
    full: bool
    reason: str
    ranges: dict[str, list[tuple[int, int]]]
    rescan: dict[str, str]
    events: int
    cost_s: float

    def dirty_bytes(self) -> int:
        return sum(e - s for rs in self.ranges.values() for s, e in rs)


def _mount_of(st: os.stat_result) -> tuple[str | None, set[str]]:
    """The filesystem type and superblock options of the mount a file lives on."""
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if pre.split()[2:3] == [want]:
                    fields = post.split()
                    return fields[0], set(fields[2].split(",")) if len(fields) > 2 else set()
    except OSError:
        pass
    return None, set()


def _fstype_of(st: os.stat_result) -> str | None:
    return _mount_of(st)[0]


def _journals_data(fd: int, st: os.stat_result) -> bool:
    """Whether file data goes through the journal, so writeback bios miss its blocks."""
    if stat.S_ISBLK(st.st_mode):
        return False
    if "data=journal" in _mount_of(st)[1]:
        return True
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError:
        return True  # cannot tell: do not narrow
    return bool(int.from_bytes(buf[:4], sys.byteorder) & FS_JOURNAL_DATA_FL)


def _fs_reason(path: str) -> str | None:
    """Why the folio events cannot be trusted for this path; None if they can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if stat.S_ISBLK(st.st_mode):
        try:
            bio.disk_of(st.st_rdev)
        except (bio.DirectUnavailable, OSError) as e:
            return f"block device {path}: {e}"
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"{path} is not a regular file"
    fstype, options = _mount_of(st)
    if "dax" in options or "dax=always" in options:
        return "DAX mounts have no page cache, so no dirty events"
    if stat.S_ISREG(st.st_mode) and fstype in SUPPORTED_FS:
        try:
            bio.disk_of(st.st_dev)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                bio.fiemap(fd)
            finally:
                os.close(fd)
        except (bio.DirectUnavailable, OSError) as e:
            return f"O_DIRECT writes could not be mapped back to {path}: {e}"
    if fstype in ("tmpfs", "ramfs", "hugetlbfs"):
        return f"{fstype} has no writeback, so it emits no dirty events"
    if fstype == "overlay":
        return "overlayfs: st_ino is not the page cache's inode"
    if fstype == "btrfs":
        return "btrfs is copy-on-write and its inode numbers repeat across subvolumes"
    if fstype not in SUPPORTED_FS:
        return f"{fstype or 'unknown filesystem'}: dirty events not verified there"
    return None


def _page_cache_ino(st: os.stat_result) -> int:
    """The inode the folio event names: a device's page cache is keyed by its number."""
    if stat.S_ISBLK(st.st_mode):
        return bio.kernel_dev(st.st_rdev)
    return st.st_ino


def _stat(fd: int) -> SourceStat:
    """stat for the safety net; a device's size is where its end is, not st_size (0)."""
    st = os.fstat(fd)
    s = SourceStat.of(st)
    if stat.S_ISBLK(st.st_mode):
        s = dataclasses.replace(s, size=os.lseek(fd, 0, os.SEEK_END))
    return s


def _check_format(inst: tracefs.Instance) -> str | None:
    rel = f"events/{parse.FOLIO_EVENT}/format"
    if not inst.exists(rel):
        return "the kernel has no writeback_dirty_folio tracepoint"
    fmt = [ln for ln in inst.read(rel).splitlines() if ln.startswith("print fmt:")]
    if not fmt or not fmt[0].startswith(f"print fmt: {parse.FOLIO_FORMAT}"):
        return "writeback_dirty_folio prints a format this tracker does not know"
    return None


def available(path: str) -> tuple[bool, str]:
    """Whether the kernel tracker can watch `path`, and in one line why not."""
    if not sys.platform.startswith("linux"):
        return False, "the kernel tracker needs Linux tracefs"
    if os.geteuid() != 0:
        return False, "the kernel tracker needs root (CAP_SYS_ADMIN) for tracefs"
    why = _fs_reason(path)
    if why:
        return False, why
    try:
        root, how = tracefs.open_root()
    except tracefs.TracefsUnavailable as e:
        return False, str(e)
    try:
        os.stat(f"events/{parse.FOLIO_EVENT}/format", dir_fd=root)
    except FileNotFoundError:
        return False, "the kernel has no writeback_dirty_folio tracepoint"
    finally:
        os.close(root)
    return True, f"tracefs ({how})"


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except AttributeError:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


class KernelTracker:
    """Dirty folios of a set of source files, one window per pass.

    Use as a context manager, or call close() on every exit path: the instance
    must be removed, and it cannot be while our own reader holds it open.
    `order="unsound"` and `edge_hook` exist only for tests: the hook runs between
    the two steps of a pass start ("between") and before the drain ("before
    drain"), where a racing store shows the unsound order missing a write and
    the carried tail of a window being needed.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        buffer_kb: int = DEFAULT_BUFFER_KB,
        tag: str | None = None,
        root_method: str = "auto",
        order: str = "sound",
        direct: bool = True,
        guardian: bool = True,
        edge_hook: Callable[[str], None] | None = None,
    ) -> None:
        global _instances_made
        if order not in ("sound", "unsound"):
            raise ValueError(f"order {order!r}: sound or unsound")
        self.order = order
        self._edge_hook = edge_hook
        self.paths = list(paths)
        self._fds: dict[str, int] = {}
        self._inodes: dict[int, list[str]] = {}
        self._stats: dict[str, SourceStat] = {}
        self._window = _Window()
        self._next = _Window()
        self._split = parse.LineSplitter()
        self._seq = 0
        self._overruns = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._max_folio_pages = max(MAX_FOLIO_BYTES // self._page, 1)
        self._sfr = _sync_file_range()
        self._inst: tracefs.Instance | None = None
        self._extents: dict[str, bio.ExtentMap | bio.DeviceMap] = {}
        self._inflight: list[bio.Bio] = []  # queued by others, not yet seen completing
        self._tid = -1
        self._narrow: set[str] = set()  # sources whose folio extents writeback may narrow
        self._guardian: tracefs.Guardian | None = None
        self.direct_off: dict[str, str] = {}  # sources whose O_DIRECT writes go unseen, and why
        self._root, self.method = tracefs.open_root(root_method)
        if tag is None:
            _instances_made += 1
            tag = None if _instances_made == 1 else str(_instances_made)
        name = f"{tracefs.INSTANCE_PREFIX}{os.getpid()}" + (f"-{tag}" if tag else "")
        try:
            self.swept = tracefs.sweep_stale(self._root)
            for p in self.paths:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                self._fds[p] = fd
                st = os.fstat(fd)
                self._inodes.setdefault(_page_cache_ino(st), []).append(p)
                self._stats[p] = _stat(fd)
                if direct:
                    self._map_direct(p, fd, st)
            if guardian:
                # Before the instance exists, so no moment is left unguarded.
                self._guardian = tracefs.Guardian(self._root, name)
            self._inst = tracefs.Instance(self._root, name)
            self._configure(self._inst, buffer_kb)
            self._pipe = self._inst.open_fd("trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
            self._marker = self._inst.open_fd("trace_marker", os.O_WRONLY)
            self._overruns = self._read_overruns()
        except BaseException:
            self.close()
            raise

    def _map_direct(self, path: str, fd: int, st: os.stat_result) -> None:
        m: bio.ExtentMap | bio.DeviceMap
        try:
            if stat.S_ISBLK(st.st_mode):
                m = bio.DeviceMap(fd, bio.disk_of(st.st_rdev))
            else:
                m = bio.ExtentMap(fd, bio.disk_of(st.st_dev))
            m.refresh()
        except (bio.DirectUnavailable, OSError) as e:
            self.direct_off[path] = str(e)
            return
        self._extents[path] = m
        if not _journals_data(fd, st):
            self._narrow.add(path)

    @property
    def instance_name(self) -> str:
        assert self._inst is not None
        return self._inst.name

    def _configure(self, inst: tracefs.Instance, buffer_kb: int) -> None:
        bad = _check_format(inst)
        if bad:
            raise tracefs.TracefsUnavailable(bad)
        for clock in ("mono", "global"):
            try:
                inst.write("trace_clock", clock)
                break
            except OSError:
                continue
        else:
            # The default, local, is not ordered across CPUs: the marker would not split.
            raise tracefs.TracefsUnavailable(
                "the trace instance takes neither mono nor global clock"
            )
        inst.write("buffer_size_kb", str(buffer_kb))
        filt = parse.inode_filter(list(self._inodes))
        events = [parse.FOLIO_EVENT] + [
            e for e in parse.NOPAGE_EVENTS if inst.exists(f"events/{e}/enable")
        ]
        for ev in events:
            inst.write(f"events/{ev}/filter", filt)
            inst.write(f"events/{ev}/enable", "1")
        if self._extents:
            self._set_bio_filters(inst)
            for ev in (bio.QUEUE_EVENT, bio.COMPLETE_EVENT):
                inst.write(f"events/{ev}/enable", "1")
        inst.write("tracing_on", "1")

    def _set_bio_filters(self, inst: tracefs.Instance) -> None:
        """Block events of the sources' disks; our own writeback's are told apart by thread."""
        disks = sorted({m.disk.disk_dev for m in self._extents.values()})
        # No sector filter: a new extent allocated after it was set would be missed.
        dev_filt = " || ".join(f"dev == {bio.kernel_dev(d)}" for d in disks)
        for ev in (bio.QUEUE_EVENT, bio.COMPLETE_EVENT):
            inst.write(f"events/{ev}/filter", dev_filt)

    # -- passes ----------------------------------------------------------

    def begin_pass(self) -> PassWindow:
        """Close the current window: stat, marker, writeback, drain. Then the caller reads."""
        t0 = time.perf_counter()
        now = {p: _stat(fd) for p, fd in self._fds.items()}
        before = self._stats
        first = self._seq == 0
        for _attempt in range(_RESYNC_ATTEMPTS):
            self._seq += 1
            # The next marker's window starts empty; a retry folds the old tail in.
            self._window.absorb(self._next)
            self._next = _Window()
            if self.order == "unsound":
                self._writeback()
                self._edge("between")
                self._mark()
            else:
                self._mark()
                self._edge("between")
                self._writeback()
            self._edge("before drain")
            tail_lost = self._drain(until=self._seq)
            if not tail_lost:
                break
        window, self._window, self._next = self._window, self._next, _Window()
        if tail_lost:
            # Even the last marker's tail is incomplete: the next pass is blind too.
            self._window.lost.append("the trace kept overrunning while re-marking")
        self._stats = now
        return self._report(window, before, now, first, time.perf_counter() - t0)

    def poll(self) -> None:
        """Drain mid-pass so a long pass does not overrun the buffer."""
        self._drain(until=None)

    def dirty_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Byte ranges dirtied since the last marker so far (a peek; begin_pass closes it)."""
        self.poll()
        w = _Window()
        w.absorb(self._window)
        w.absorb(self._next)
        return self._ranges(w, narrow=False)

    def _edge(self, stage: str) -> None:
        if self._edge_hook is not None:
            self._edge_hook(stage)

    def _mark(self) -> None:
        os.write(self._marker, f"multifd {os.getpid()} {self._seq}".encode())

    def _writeback(self) -> None:
        self._tid = threading.get_native_id()  # the writeback's bios carry this thread's id
        for fd in self._fds.values():
            if self._sfr is not None and self._sfr(fd, 0, 0, WAIT_BEFORE | WRITE | WAIT_AFTER) == 0:
                continue
            os.fdatasync(fd)

    def _drain(self, until: int | None) -> bool:
        """Read the pipe dry. Returns True if events after marker `until` may be lost."""
        target = None if until is None else f"multifd {os.getpid()} {until}"
        seen = target is None
        lost_after = False
        for tries in range(200):
            got = self._read_pipe()
            for line in got:
                ev = parse.parse_line(line)
                if ev is None:
                    continue
                if isinstance(ev, parse.Marker):
                    if ev.text == target:
                        seen = True
                    continue
                win = self._next if seen and target is not None else self._window
                lost = self._ingest(win, ev)
                if lost and seen:
                    lost_after = True
            if seen and not got and not self._split.pending:
                break
            if not got:
                if not seen and self._read_overruns() != self._overruns:
                    break  # the marker was overwritten: waiting cannot bring it back
                time.sleep(0.001 * min(tries + 1, 10))
        if not seen:
            self._window.lost.append("the pass marker never came back from the trace")
            self._overruns = self._read_overruns()
            return True
        over = self._read_overruns()
        if over != self._overruns:
            # The counters cannot say where the loss fell, so assume after the marker too.
            self._window.lost.append(f"the trace buffer overran ({over - self._overruns} events)")
            self._overruns = over
            lost_after = True
        return lost_after

    def _read_pipe(self) -> list[str]:
        lines: list[str] = []
        while True:
            try:
                data = os.read(self._pipe, 1 << 16)
            except BlockingIOError:
                return lines
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not data:
                return lines
            lines.extend(self._split.feed(data))

    def _ingest(self, win: _Window, ev: parse.Event) -> bool:
        """Add one event to a window; True if it says events were lost."""
        if isinstance(ev, parse.Folio):
            if ev.ino in self._inodes:
                win.folios.setdefault(ev.ino, set()).add(ev.index)
                win.events += 1
            return False
        if isinstance(ev, bio.Bio):
            if not ev.completion and ev.pid == self._tid:
                # Our own writeback, queued after the marker: it narrows the window
                # being closed, and is no write of anyone's.
                self._window.own.append(ev)
                return False
            if not ev.completion:
                self._inflight.append(ev)
                if len(self._inflight) > _MAX_INFLIGHT:
                    # A bio-based disk never completes a request; keep the newest.
                    del self._inflight[: _MAX_INFLIGHT // 2]
                win.bios.append(ev)
                win.events += 1
            elif any(q.overlaps(ev) for q in self._inflight):
                self._inflight = [q for q in self._inflight if not q.overlaps(ev)]
                win.bios.append(ev)
                win.events += 1
            return False
        if isinstance(ev, parse.NoPage):
            if ev.ino in self._inodes:
                win.nopage[ev.ino] = ev.event
            return False
        if isinstance(ev, parse.Lost):
            win.lost.append(f"the trace lost {ev.count} events on CPU {ev.cpu}")
            return True
        if isinstance(ev, parse.Unknown):
            win.lost.append(f"unreadable trace line: {ev.line[:80]!r}")
            return True
        return False

    def _read_overruns(self) -> int:
        assert self._inst is not None
        total = 0
        for cpu in self._inst.cpus():
            for line in self._inst.read(f"per_cpu/cpu{cpu}/stats").splitlines():
                for key in _STAT_COUNTERS:
                    if line.startswith(key):
                        total += int(line[len(key) :].split()[0])
        return total

    def _ranges(
        self, w: _Window, later: _Window | None = None, narrow: bool = True
    ) -> dict[str, list[tuple[int, int]]]:
        """Per source: folio extents, narrowed to what writeback wrote, and O_DIRECT writes.

        `later` is the tail after the marker: a flusher may have written a block of
        this window's folio there, before our writeback reached it. Narrowing is
        only sound after a writeback, so a mid-pass peek keeps whole extents.
        """
        folios: dict[str, list[tuple[int, int]]] = {}
        for ino, idx in w.folios.items():
            spans = [parse.folio_extent(i, self._page, self._max_folio_pages) for i in idx]
            for p in self._inodes.get(ino, []):
                folios[p] = spans
        direct: dict[str, list[tuple[int, int]]] = {}
        written: dict[str, list[tuple[int, int]]] = {}
        every = w.bios + w.own + (later.bios if later is not None else [])
        for p, m in self._extents.items() if every else ():
            # After the drain: a write into a hole allocated its extent before its bio.
            try:
                m.refresh()
            except (bio.DirectUnavailable, OSError) as e:
                w.nopage[os.fstat(m.fd).st_ino] = f"FIEMAP ({e})"
                continue
            disk = m.disk.disk_dev
            direct[p] = [r for b in w.bios if b.dev == disk for r in m.map(b)]
            if narrow and p in self._narrow and p in folios:
                written[p] = parse.merge_ranges(
                    [r for b in every if b.dev == disk for r in m.map(b)]
                )
        out: dict[str, list[tuple[int, int]]] = {}
        for p in set(folios) | set(direct):
            spans = folios.get(p, [])
            if p in written:
                spans = bio.refine(spans, written[p])
            spans = spans + direct.get(p, [])
            if spans:
                out[p] = parse.merge_ranges(spans)
        return out

    def _report(
        self,
        w: _Window,
        before: dict[str, SourceStat],
        now: dict[str, SourceStat],
        first: bool,
        cost: float,
    ) -> PassWindow:
        ranges = self._ranges(w, later=self._window)
        rescan: dict[str, str] = {}
        for ino, ev in w.nopage.items():
            for p in self._inodes.get(ino, []):
                rescan[p] = f"{ev} changed it without dirtying a page"
        for p, st in now.items():
            why = rescan_reason(before[p], st, p in ranges)
            if why and p not in rescan:
                rescan[p] = why
            grown = grown_range(before[p], st)
            if grown:
                ranges[p] = parse.merge_ranges(ranges.get(p, []) + [grown])
        full = first or bool(w.lost)
        reason = "first pass" if first else "; ".join(dict.fromkeys(w.lost))
        return PassWindow(self._seq, full, reason, ranges, rescan, w.events, cost)

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Remove the instance and drop every fd; safe to call twice."""
        try:
            if self._inst is not None:
                inst, self._inst = self._inst, None
                inst.close()
        finally:
            if self._guardian is not None:
                self._guardian.release()
                self._guardian = None
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._root >= 0:
                os.close(self._root)
                self._root = -1

    def __enter__(self) -> KernelTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
