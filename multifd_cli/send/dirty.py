"""Which dirty tracker the passes use, and the kernel tracker's window as work.

Three trackers find what a pass must read:

- the API tracker (the embedding API's DirtyLog): the application marks writes;
- the kernel tracker (send/ktrace): tracefs events say which folios and blocks
  were written, so a pass reads only those, and page hashes decide inside;
- the hash tracker: every pass reads and hashes the whole source.

`--tracker auto` (the default) takes the kernel tracker where it can and says
in one WARNING line why not where it cannot; `--tracker kernel` fails instead
(exit 2). The kernel tracker is imported only when it is chosen: tracefs is
set up at start, and `multifd --version` must stay fast.

Per pass, begin() runs before the pass stats its sources: the tracker's own
pass start (marker, writeback, drain) must come first, so that a source grown
after it is still seen by the next window. A window that cannot be trusted
(the first pass, a lost trace buffer, the stat safety net) makes the pass hash
that source, or all of them, whole, and the log and the pass event say why.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

from multifd_cli.common.tables import chunk_pages
from multifd_cli.errors import UsageError
from multifd_cli.send.convergence import Estimator
from multifd_cli.send.sources import Source

if TYPE_CHECKING:
    from multifd_cli.send.ktrace import KernelTracker, PassWindow
    from multifd_cli.send.ktrace.treeplan import PlanStats
    from multifd_cli.send.ktrace.treewatch import TreeKernelTracker, TreeWindow
    from multifd_cli.send.tree.diff import ScanItem, TreeDelta
    from multifd_cli.send.tree.source import TreeSource

log = logging.getLogger("multifd")

TRACKERS = ("auto", "hash", "kernel")
POLL_S = 0.1  # how often a long pass drains the trace, so its buffer does not overrun
#: Test-only: comma-separated `blind`, `no-net`, `buffer=KB` (see ktrace.KernelTracker).
TEST_ENV = "MULTIFD_TEST_KTRACE"

Spans = list[tuple[int, int]]


class Tracking:
    """The hash tracker's answer for every pass: scan each source whole."""

    kind = "hash"

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason  # why not the kernel tracker; None where that was not asked
        self.fallback: str | None = None  # why this pass hashed some source whole

    def begin(self, epoch: int, full: bool, final: bool = False) -> None:
        """At a pass start, before the sources are stat'ed; `final`: the writer is paused."""

    def spans(self, block: int, pages: int, step: int, full: bool) -> Spans:
        """Page ranges of `block` this pass reads, each at most `step` pages."""
        return [(s, min(pages, s + step)) for s in range(0, pages, step)]

    def tick(self) -> None:
        """Called often while a pass hands out work."""

    def settle(self) -> None:
        """Just before the pause: take in what the tracker has queued, so the final
        pass start, which is downtime, handles only what arrives after."""

    def vouched(self) -> Collection[int]:
        """Filesystems (st_dev) whose tree files this pass's window accounts for: their
        mapped files need not be read for being mapped."""
        return frozenset()

    def owed(self) -> Collection[tuple[int, int]]:
        """(dev, ino) of tree files this pass must read whole whatever their stat says."""
        return ()

    def tree_items(self, delta: TreeDelta, unread: Collection[tuple[int, int]]
                   ) -> Iterator[ScanItem]:
        """The tree files this pass reads: every file the delta lists, whole."""
        return delta.scan()

    def fields(self) -> dict[str, Any]:
        """For the pass event: which tracker, why not the kernel's, and any fallback."""
        return {"tracker": self.kind, "tracker_reason": self.reason or "",
                "tracker_fallback": self.fallback or ""}

    def close(self) -> None:
        """Release what the tracker holds (the tracefs instance)."""


class ApiTracking(Tracking):
    """The embedding API marks writes itself; passes.py reads its DirtyLog."""

    kind = "api"


class _Polled(Tracking):
    """Drains a kernel tracker's trace every POLL_S while a pass runs, and once more
    just before the pause (settle), so the buffer never overruns mid-pass and the
    final pass start parses only what came after."""

    tracker: KernelTracker | TreeKernelTracker
    _polled: float = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._polled >= POLL_S:
            self._polled = now
            self.tracker.poll()

    def settle(self) -> None:
        self._polled = time.monotonic()
        self.tracker.poll()


class KernelTracking(_Polled):
    """Each pass reads what the kernel window since the previous pass start reported."""

    kind = "kernel"
    tracker: KernelTracker

    def __init__(self, tracker: KernelTracker, sources: Sequence[Source], page_size: int,
                 estimator: Estimator) -> None:
        super().__init__(None)
        self.tracker = tracker
        self.paths = [s.path for s in sources]
        self.page_size = page_size
        self.estimator = estimator
        self.window: PassWindow | None = None
        self._polled = 0.0
        estimator.tracker_cost = 0.0  # no scan of the whole source, even before pass 2

    def begin(self, epoch: int, full: bool, final: bool = False) -> None:
        w = self.tracker.begin_pass(final=final)
        self.window = w
        self._polled = time.monotonic()
        self.fallback = None
        if w.full:
            if not full:
                self.fallback = f"all sources hashed whole: {w.reason}"
                log.warning("pass %d: the kernel tracker lost events (%s); hashing every source "
                            "whole this pass", epoch, w.reason)
        elif w.rescan:
            self.fallback = "; ".join(f"{p} hashed whole: {why}" for p, why in w.rescan.items())
            for p, why in w.rescan.items():
                log.warning("pass %d: hashing %s whole: %s", epoch, p, why)
        if not w.full:
            # What the final pass would cost the tracker: its own pass start, then reading
            # what the window reports (a source hashed whole costs its size).
            # A final pass start that will not narrow skips the writeback, and reads
            # the widened extents instead (narrowing kept `kept` of them).
            est = self.estimator
            narrows, kept = self.tracker.final_narrows(), self.tracker.narrow_kept
            est.tracker_cost = w.cost_s - (0.0 if narrows else w.writeback_s)
            read = w.dirty_bytes() if narrows or not kept else int(w.dirty_bytes() / kept)
            est.scan_bytes = read + sum(
                os.stat(p).st_size for p in w.rescan if os.path.isfile(p))

    def spans(self, block: int, pages: int, step: int, full: bool) -> Spans:
        w = self.window
        path = self.paths[block] if block < len(self.paths) else None
        if full or w is None or w.full or path is None or path in w.rescan:
            return super().spans(block, pages, step, full)
        return page_spans(w.ranges.get(path, []), self.page_size, pages, step)


    def close(self) -> None:
        self.tracker.close()


class TreeKernelTracking(_Polled):
    """A directory tree's passes read what the kernel window says was written.

    Files on filesystems the tracker cannot watch keep the stat rule (send/tree);
    `reason` names them, and the pass event's fallback says which files a pass
    read whole and why.
    """

    kind = "kernel"
    tracker: TreeKernelTracker

    def __init__(self, tracker: TreeKernelTracker, untraced: str | None) -> None:
        super().__init__(untraced)
        self.tracker = tracker
        self.window: TreeWindow | None = None
        self.stats: PlanStats | None = None
        self._owed: Collection[tuple[int, int]] = ()
        self._polled = 0.0
        self._final = False

    def begin(self, epoch: int, full: bool, final: bool = False) -> None:
        w = self.tracker.begin_pass(final=final)
        # No window follows the final pass to carry a write that lands between its
        # marker and the walk: such a write (a process no pause covers) is read now.
        self._final = final
        # A lost window cannot vouch for the writes after the last marker: the files the
        # last plan left to it (PlanStats.owed) are read whole.
        self._owed = self.stats.owed if self.stats is not None and w.full else ()
        self.window = w
        self.stats = None
        self._polled = time.monotonic()
        self.fallback = None
        if w.full and not full and epoch > 1:
            self.fallback = f"every tree file by its stat: {w.reason}"
            log.warning("pass %d: the kernel tracker lost events (%s); reading the tree's "
                        "changed and mapped files whole this pass", epoch, w.reason)

    def vouched(self) -> Collection[int]:
        w = self.window
        return frozenset() if w is None or w.full else self.tracker.devs

    def owed(self) -> Collection[tuple[int, int]]:
        return self._owed

    def tree_items(self, delta: TreeDelta, unread: Collection[tuple[int, int]]
                   ) -> Iterator[ScanItem]:
        w = self.window
        if w is None or w.full:
            return delta.scan()
        from multifd_cli.send.ktrace.treeplan import PlanStats, plan_delta

        self.stats = PlanStats()
        return plan_delta(delta, w, self.tracker.devs, unread, self.tracker.extent,
                          self.stats, self.tracker.safety_net,
                          () if self._final else self.tracker.since_marker())


    def fields(self) -> dict[str, Any]:
        out = super().fields()
        if self.stats is not None:
            st = self.stats
            out.update(tracker_fallback=st.summary(), tracker_ranged_files=st.ranged,
                       tracker_ranged_bytes=st.ranged_bytes, tracker_skipped_files=st.skipped)
        return out

    def close(self) -> None:
        self.tracker.close()


def page_spans(ranges: Spans, page_size: int, pages: int, step: int) -> Spans:
    """Byte ranges as page ranges rounded out to whole hash chunks, merged, cut at `step`.

    Whole chunks, because a chunk's hash in the tables covers all of it; the
    page hashes inside decide what is sent.
    """
    cp = chunk_pages(page_size)
    cbytes = cp * page_size
    step = max(cp, step // cp * cp)
    out: Spans = []
    for s, e in sorted(ranges):
        first = s // cbytes * cp
        end = min(pages, -(-e // cbytes) * cp)
        if first >= end:
            continue
        if out and first <= out[-1][1]:
            first = out[-1][0]
            end = max(end, out.pop()[1])
        out.append((first, end))
    cut: Spans = []
    for s, e in out:
        cut.extend((x, min(e, x + step)) for x in range(s, e, step))
    return cut


def test_switches() -> dict[str, Any]:
    """The test-only switches of MULTIFD_TEST_KTRACE, as KernelTracker arguments."""
    kw: dict[str, Any] = {}
    for word in filter(None, os.environ.get(TEST_ENV, "").split(",")):
        key, _, value = word.strip().partition("=")
        if key == "blind":
            kw["blind"] = True
        elif key == "no-net":
            kw["safety_net"] = False
        elif key == "buffer":
            kw["buffer_kb"] = int(value)
    return kw


def open_tracking(setting: str, sources: Sequence[Source], page_size: int, api: bool,
                  estimator: Estimator, tree: TreeSource | None = None) -> Tracking:
    """The tracker for this migration; UsageError when `kernel` was asked and cannot be had."""
    if api:
        return ApiTracking("the embedding API marks writes")
    if setting == "hash":
        return Tracking("--tracker hash")
    if tree is not None:
        return _open_tree_tracking(setting, tree)
    if not sources:
        return Tracking("nothing to track: no file source")
    why = _unavailable(sources)
    tracker = None
    if why is None:
        from multifd_cli.send.ktrace import KernelTracker
        from multifd_cli.send.ktrace.bio import DirectUnavailable
        from multifd_cli.send.ktrace.tracefs import TracefsUnavailable

        try:
            tracker = KernelTracker([s.path for s in sources], **test_switches())
        except (TracefsUnavailable, DirectUnavailable, OSError) as e:
            why = f"tracefs could not be set up: {e}"
    if tracker is None:
        if setting == "kernel":
            raise UsageError(f"--tracker kernel: {why}")
        log.warning("hash tracker (every pass reads the whole source): %s", why)
        return Tracking(why)
    for p, off in tracker.direct_off.items():
        log.info("%s: O_DIRECT writes are not traced (%s); the stat safety net covers them",
                 p, off)
    log.info("kernel tracker: tracefs instance %s (%s)", tracker.instance_name, tracker.method)
    return KernelTracking(tracker, sources, page_size, estimator)


def _unavailable(sources: Sequence[Source]) -> str | None:
    """Why the kernel tracker cannot watch these sources, or None."""
    from multifd_cli.send.ktrace import available

    for s in sources:
        ok, why = available(s.path)
        if not ok:
            return why
    return None


def _open_tree_tracking(setting: str, tree: TreeSource) -> Tracking:
    """The tree tracker over every filesystem of the tree it can watch; the root's must be
    one of them, or `kernel` is a usage error and `auto` falls back to the stat rule."""
    fs = tree.filesystems()
    reasons = {dev: _tree_unavailable(path) for dev, path in fs.items()}
    root_dev = os.stat(tree.root).st_dev
    why = reasons.get(root_dev)
    tracker = None
    if why is None:
        from multifd_cli.send.ktrace.bio import DirectUnavailable
        from multifd_cli.send.ktrace.tracefs import TracefsUnavailable
        from multifd_cli.send.ktrace.treewatch import TreeKernelTracker

        kw = test_switches()
        try:
            tracker = TreeKernelTracker({d: os.fsdecode(p) for d, p in fs.items()
                                         if reasons[d] is None},
                                        **kw)
        except (TracefsUnavailable, DirectUnavailable, OSError) as e:
            why = f"tracefs could not be set up: {e}"
    if tracker is None:
        why = f"{os.fsdecode(tree.root)}: {why}"
        if setting == "kernel":
            raise UsageError(f"--tracker kernel: {why}")
        log.warning("no kernel tracker for the tree (changed and mapped files are read "
                    "whole): %s", why)
        return Tracking(why)
    off = {os.fsdecode(fs[d]): r for d, r in reasons.items() if r is not None}
    untraced = "; ".join(f"{p}: {r}" for p, r in off.items()) or None
    if untraced:
        log.warning("the kernel tracker cannot watch part of the tree (its changed and mapped "
                    "files are read whole): %s", untraced)
    log.info("kernel tracker for the tree: tracefs instance %s (%s)", tracker.instance_name,
             tracker.method)
    return TreeKernelTracking(tracker, untraced)


def _tree_unavailable(path: bytes) -> str | None:
    if not sys.platform.startswith("linux"):
        return "the kernel tracker needs Linux tracefs"
    if os.geteuid() != 0:
        return "the kernel tracker needs root (CAP_SYS_ADMIN) for tracefs"
    from multifd_cli.send.ktrace.treewatch import tree_fs_reason

    return tree_fs_reason(os.fsdecode(path))
