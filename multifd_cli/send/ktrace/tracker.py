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

The folio event names only a folio's first page, and folios reach 2 MiB. The
block events of the writeback at each pass start say which blocks were dirty,
so each folio extent is narrowed to them (bio.refine): a 4 KiB store costs a
4 KiB read, not 2 MiB. The same block events carry O_DIRECT writes (bio.py).

Per pass the cost is a stat and a writeback call per source, plus a line per
event: nothing here reads or walks the sources' data.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from multifd_cli.send.ktrace import bio, parse, tracefs
from multifd_cli.send.ktrace.inflight import Inflight
from multifd_cli.send.ktrace.safety import SourceStat, grown_range, rescan_reason
from multifd_cli.send.ktrace.session import TraceSession
from multifd_cli.send.ktrace.watched import WatchedSources, fs_reason
from multifd_cli.send.ktrace.window import MarkedTrace, Window, instance_tag

DEFAULT_BUFFER_KB = 2048  # per CPU: about 30,000 folio events before an overrun
MAX_FOLIO_BYTES = 2 << 20  # the page cache's largest folio on x86-64 and arm64 (4 KiB pages)
# The final pass narrows large folios (by writing back their extents) only where the
# last narrowing kept less than this share of the widened bytes: writing dirty pages
# to disk under the pause costs more than reading them again from the page cache.
NARROW_PAYS_BELOW = 0.5
_MAX_INFLIGHT = 8192


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
    writeback_s: float = 0.0  # of cost_s, the writeback (which a final pass may skip)

    def dirty_bytes(self) -> int:
        return sum(e - s for rs in self.ranges.values() for s, e in rs)


def writeback_batches(spans: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Sorted spans as covering ranges of at most `limit` dirty bytes each; long spans split."""
    out: list[tuple[int, int]] = []
    lo, hi, size = -1, -1, 0
    for s, e in spans:
        while e - s > limit:
            if lo >= 0:
                out.append((lo, hi))
                lo = -1
            out.append((s, s + limit))
            s += limit
        if lo >= 0 and size + (e - s) > limit:
            out.append((lo, hi))
            lo = -1
        if lo < 0:
            lo, size = s, 0
        hi, size = e, size + (e - s)
    if lo >= 0:
        out.append((lo, hi))
    return out


def overlap_bytes(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Bytes two sorted lists of disjoint ranges have in common, in one sweep."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            total += hi - lo
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return total


def available(path: str) -> tuple[bool, str]:
    """Whether the kernel tracker can watch `path`, and in one line why not."""
    if not sys.platform.startswith("linux"):
        return False, "the kernel tracker needs Linux tracefs"
    if os.geteuid() != 0:
        return False, "the kernel tracker needs root (CAP_SYS_ADMIN) for tracefs"
    why = fs_reason(path)
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


class KernelTracker(MarkedTrace):
    """Dirty folios and direct writes of a set of sources, one window per pass.

    Use as a context manager, or call close() on every exit path: the instance
    must be removed, and it cannot be while our own reader holds it open.
    `direct` adds the block-layer events (O_DIRECT writers, device sources);
    `narrow` lets writeback's bios narrow large folios to their written blocks
    (off: every dirtied folio is read whole, up to 2 MiB per event).
    `blind` (drop every write event) and `safety_net=False` (trust the events
    even when stat disagrees) exist only for the negative controls, which show
    that the stat net catches a blind tracker and that the copy goes wrong
    without it. `order` and `edge_hook`: see window.MarkedTrace; a racing
    store there shows the unsound order missing a write and the carried tail
    of a window being needed.
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
        narrow: bool = True,
        guardian: bool = True,
        edge_hook: Callable[[str], None] | None = None,
        blind: bool = False,
        safety_net: bool = True,
    ) -> None:
        super().__init__(order, edge_hook)
        self._blind = blind
        self._safety_net = safety_net
        self._inflight = Inflight(_MAX_INFLIGHT)  # queued by others, not yet seen completing
        self._tid = -1  # the thread whose bios are our own writeback
        # Of the bytes the last non-final window's folio extents spanned, the share
        # that narrowing kept; None until a pass start has narrowed something.
        self.narrow_kept: float | None = None
        self.final_narrowed: bool | None = None  # what the final pass start chose
        # Bytes of dirty extents written back between drains: about 4 events per
        # 4 KiB block (queue and completion) must fit in a quarter of the buffer.
        self._flush_bytes = max(buffer_kb * 1024 // 4 // 200 * 4096, 64 << 10)
        page = os.sysconf("SC_PAGE_SIZE")
        max_pages = max(MAX_FOLIO_BYTES // page, 1)
        self._extent: Callable[[int], tuple[int, int]] = lambda i: parse.folio_extent(
            i, page, max_pages
        )
        name = instance_tag(tag)
        self._src = WatchedSources(paths, direct)
        if not narrow:
            self._src.narrow.clear()
        try:
            self._trace = TraceSession(name, root_method=root_method, guardian=guardian)
        except BaseException:
            self._src.close()
            raise
        try:
            self._trace.configure(buffer_kb, list(self._src.inodes), self._src.disks())
        except BaseException:
            self.close()
            raise

    @property
    def direct_off(self) -> dict[str, str]:
        """Sources whose O_DIRECT writes go unseen, and why (the stat net still applies)."""
        return self._src.direct_off

    # -- passes ----------------------------------------------------------

    def begin_pass(self, final: bool = False) -> PassWindow:
        """Close the current window: stat, marker, writeback, drain. Then the caller reads.

        `final` (the writers are paused, and no window follows): nothing needs to be
        clean afterwards, so the only reason to write back is narrowing. The window's
        own dirty extents are written back (their bios narrow the folios) only where
        narrowing last paid (NARROW_PAYS_BELOW); otherwise the pass reads the widened
        extents from the page cache, which is sound because every folio was clean at
        the previous pass start and so each one stored to since has an event.
        """
        t0 = time.perf_counter()
        now = self._src.stat_all()
        before = self._src.stats
        first = self._seq == 0
        narrow = not final or self.final_narrows()
        if final:
            self.final_narrowed = narrow
        wb = 0.0

        def writeback() -> None:
            nonlocal wb
            if narrow:
                t1 = time.perf_counter()
                self._writeback(clean_all=not final)
                wb += time.perf_counter() - t1

        window = self._close_window(writeback)
        self._src.stats = now
        pw = self._report(window, before, now, first, time.perf_counter() - t0, narrow)
        pw.writeback_s = wb
        return pw

    def final_narrows(self) -> bool:
        """Whether a final pass start would write back to narrow: unknown (no
        narrowing seen yet) keeps the writeback, which is safe for sparse writers."""
        return self.narrow_kept is None or self.narrow_kept < NARROW_PAYS_BELOW

    def dirty_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Byte ranges dirtied since the last marker so far (a peek; begin_pass closes it).

        Whole folio extents: narrowing them is only sound after a writeback.
        """
        self.poll()
        w = Window()
        w.absorb(self._window)
        w.absorb(self._next)
        return self._src.ranges(w.folios, w.bios, None, self._extent, w.nopage)

    def _writeback(self, clean_all: bool = True) -> None:
        """Write back in pieces the buffer can hold, draining between them.

        Our own writeback's block events are what narrow large folios; written in
        one go, a big dirty set would overrun the buffer and cost a full pass.
        The known dirty extents go first, a batch at a time, then the whole file,
        which is what makes every folio clean whatever the events said.
        """
        self._tid = threading.get_native_id()  # the writeback's bios carry this thread's id
        self._drain(wait_marker=False)  # room for the writeback's events, and every folio known
        folios: dict[int, set[int]] = {}
        for w in (self._window, self._next):
            for ino, idx in w.folios.items():
                folios.setdefault(ino, set()).update(idx)
        for ino, idx in folios.items():
            spans = parse.merge_ranges([self._extent(i) for i in idx])
            for lo, hi in writeback_batches(spans, self._flush_bytes):
                self._src.writeback(self._src.inodes.get(ino, []), lo, hi - lo)
                self._drain(wait_marker=False)
        if clean_all:
            self._src.writeback()

    def _ingest(self, win: Window, ev: parse.Event) -> bool:
        """Add one event to a window; True if it says events were lost."""
        if self._blind and isinstance(ev, (parse.Folio, parse.NoPage)):
            return False
        if isinstance(ev, parse.Folio):
            if ev.ino in self._src.inodes:
                win.folios.setdefault(ev.ino, set()).add(ev.index)
                win.events += 1
            return False
        if isinstance(ev, bio.Bio):
            self._ingest_bio(win, ev)
            return False
        if isinstance(ev, parse.NoPage):
            if ev.ino in self._src.inodes:
                win.nopage[ev.ino] = ev.event
            return False
        return super()._ingest(win, ev)  # losses and unreadable lines

    def _ingest_bio(self, win: Window, ev: bio.Bio) -> None:
        if not ev.completion and ev.pid == self._tid:
            # Our own writeback: no write of anyone's, but it narrows folio extents,
            # those of the window being closed and those carried past the marker,
            # whose blocks this very writeback may have written.
            self._window.own.append(ev)
            if self._target is not None:
                self._next.own.append(ev)
        elif self._blind:
            return
        elif not ev.completion:
            self._inflight.add(ev)
            win.bios.append(ev)
            win.events += 1
        elif self._inflight.complete(ev):
            win.bios.append(ev)
            win.events += 1

    def _report(
        self,
        w: Window,
        before: dict[str, SourceStat],
        now: dict[str, SourceStat],
        first: bool,
        cost: float,
        narrow: bool = True,
    ) -> PassWindow:
        # The carried tail (now self._window) holds writeback a flusher did after the marker.
        written = w.own + self._window.bios if narrow else None
        ranges = self._src.ranges(w.folios, w.bios, written, self._extent, w.nopage)
        if written is not None and not first:
            self._note_narrowing(w, ranges)
        rescan: dict[str, str] = {}
        for ino, ev in w.nopage.items():
            for p in self._src.inodes.get(ino, []):
                rescan[p] = f"{ev} changed it without dirtying a page"
        for p, st in now.items():
            why = rescan_reason(before[p], st, p in ranges) if self._safety_net else None
            if why and p not in rescan:
                rescan[p] = why
            grown = grown_range(before[p], st)
            if grown:
                ranges[p] = parse.merge_ranges(ranges.get(p, []) + [grown])
        full = first or bool(w.lost)
        reason = "first pass" if first else "; ".join(dict.fromkeys(w.lost))
        return PassWindow(self._seq, full, reason, ranges, rescan, w.events, cost)

    def _note_narrowing(self, w: Window, ranges: dict[str, list[tuple[int, int]]]) -> None:
        """Remember how much of the window's widened folio extents narrowing kept."""
        wide = kept = 0
        for ino, idx in w.folios.items():
            paths = self._src.inodes.get(ino, [])
            if not paths or paths[0] not in self._src.narrow:
                continue
            extents = parse.merge_ranges([self._extent(i) for i in idx])
            wide += sum(e - s for s, e in extents)
            kept += overlap_bytes(extents, ranges.get(paths[0], []))
        if wide:
            self.narrow_kept = kept / wide

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Remove the instance and drop every fd; safe to call twice."""
        try:
            self._trace.close()
        finally:
            self._src.close()

    def __enter__(self) -> KernelTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
