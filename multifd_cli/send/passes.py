"""One pass (epoch) of the pre-copy: announce, hand out work, flush, sync, report.

Main touches no page bytes. Each pass it announces the epoch and the source
sizes, hands chunk-aligned ranges to whichever channel is free, then closes the
epoch in two separate steps:

1. flush(): every client pushes what it still holds (the paged client's
   partial batch; a blob client has nothing to flush);
2. sync(): every channel sends its SYNC packet, and main sends EPOCH_END.

The pass runner owns that one sync per epoch; no client ever syncs.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from multifd_cli import wire as P
from multifd_cli.common.tables import chunk_pages, pages_of
from multifd_cli.errors import ProtocolError, expect
from multifd_cli.events import Events
from multifd_cli.send.convergence import Estimator, PassSample
from multifd_cli.send.dirty import Tracking
from multifd_cli.send.messages import Done, Forget, TreeWork, Work
from multifd_cli.send.pool import ChannelPool, expect_report
from multifd_cli.send.sources import Blob, Source
from multifd_cli.send.state import MigrationState
from multifd_cli.send.tracker import DirtyLog, SourceTables
from multifd_cli.send.transports import Transport
from multifd_cli.send.tree.diff import TreeDelta
from multifd_cli.send.tree.source import Batcher, TreeSource

log = logging.getLogger("multifd")

ITEM_BYTES = 8 << 20  # one work description covers this much of a block
IN_FLIGHT = 2  # work items queued per channel, so none idles between items


@dataclass
class PassResult:
    dirty_pages: int = 0
    zero_pages: int = 0
    read_bytes: int = 0
    wire_bytes: int = 0
    short_read: bool = False
    counts: P.Counts = field(default_factory=P.Counts)
    tree_ops: int = 0  # a directory source: operations sent, files read, files not found
    files_read: int = 0
    unread: list[tuple[int, int]] = field(default_factory=list)

    @property
    def vanished(self) -> int:
        return len(self.unread)


@dataclass
class Blocks:
    """What is migrated: the sources, then the blobs, each with its tables."""

    sources: list[Source]
    blobs: list[Blob]
    page_size: int
    packet_size: int
    tables: list[SourceTables] = field(default_factory=list)
    tree: TreeSource | None = None  # a directory source: the only block, no tables here

    @property
    def page_sizes(self) -> list[int]:
        """Per block: the page size, or the packet size for a blob's chunks."""
        return [self.page_size] * len(self.sources) + [self.packet_size] * len(self.blobs)


class OldCopy:
    """--resume: the hashes of what the destination already holds, as they arrive.

    Pass 1 then compares page by page against them and sends only what differs,
    range by range as each range's hashes are in.
    """

    def __init__(self, blocks: Blocks, state: MigrationState) -> None:
        self.blocks = blocks
        self.state = state
        self.enabled = False  # set once the destination accepted with an old copy
        self.covered: list[int] = []  # pages per block whose old-copy hashes arrived
        # The destination hashes its old copy up to the sizes LAYOUT announced; a
        # source that grew since has nothing old past them, a shrunk one less.
        self.layout_pages: list[int] = []

    def begin(self, sizes: list[int]) -> None:
        """Before setup: the sizes LAYOUT will announce."""
        ps = self.blocks.page_size
        self.covered = [0] * len(sizes)
        self.layout_pages = [pages_of(size, ps) for size in sizes]

    def on_main_message(self, msg: P.Message) -> None:
        """Mid-migration, recv only streams the old copy's hashes."""
        if not isinstance(msg, P.ResumeHashes) or not self.enabled:
            raise ProtocolError(f"main connection: unexpected {P.event_name(msg)} mid-pass")
        tables = self.blocks.tables
        b = msg.block
        if b >= len(tables):
            raise ProtocolError(f"RESUME_HASHES block: got {b}, expected < {len(tables)}")
        expect(f"RESUME_HASHES first page of block {b}", msg.first, self.covered[b])
        n = len(msg.hashes)
        total = self.layout_pages[b]
        if msg.first + n > total:
            raise ProtocolError(f"RESUME_HASHES: pages up to {msg.first + n}, expected at most {total}")
        # What the destination holds stands in for "last sent"; past a source
        # that shrank meanwhile there is no table left to seed.
        view = tables[b].page_hash.view
        keep = max(0, min(n, len(view) - msg.first))
        view[msg.first : msg.first + keep] = array("Q", msg.hashes[:keep])
        self.covered[b] += n

    def covers(self, block: int, end: int) -> bool:
        """True once the old copy's hashes up to page `end` are in (or none will come)."""
        return min(end, self.layout_pages[block]) <= self.covered[block]


class PassRunner:
    """Runs epochs over the channel pool and reports each as a "pass" event."""

    def __init__(self, blocks: Blocks, pool: ChannelPool, transport: Transport,
                 state: MigrationState, estimator: Estimator, events: Events,
                 dirty_log: DirtyLog | None, old_copy: OldCopy,
                 throttle_pct: Callable[[], int], tracking: Tracking | None = None,
                 await_ack: Callable[[int], None] | None = None) -> None:
        self.blocks = blocks
        self.pool = pool
        self.transport = transport
        self.state = state
        self.estimator = estimator
        self.events = events
        self.dirty_log = dirty_log
        self.old_copy = old_copy
        self.next_channel = 0  # the round-robin start carries over between passes
        self.throttle_pct = throttle_pct  # what the writer is throttled to, for the event
        self.tracking = tracking or Tracking()  # which ranges a pass reads (send/dirty.py)
        self.await_ack = await_ack  # recv's ack of the epoch, before the estimate (switchover.py)
        self.unread: list[tuple[int, int]] = []  # tree files the last pass could not read

    def run(self, epoch: int, full: bool, final: bool = False, paused_at: float = 0.0) -> PassResult:
        """One epoch: announce it, scan and send, flush, sync, report."""
        state, blocks = self.state, self.blocks
        # Before the sizes: the kernel tracker's pass start (send/dirty.py says why).
        self.tracking.begin(epoch, full, final)
        pass_start = time.monotonic()
        tree, delta, ops = blocks.tree, None, 0
        if tree is not None:
            # The tree's shape changes go first: recv applies them before any page of
            # this epoch, once every page of the last one is in.
            delta = tree.advance(final, [*self.unread, *self.tracking.owed()],
                                 self.tracking.vouched())
            ops = self.transport.send_tree(epoch, delta.ops())
            sizes = [tree.total_bytes()]
            # The final pass walks the tree, and recv walks its copy to verify it
            # before it completes: about two walks of the downtime.
            self.estimator.walk_seconds = 2 * tree.walk_seconds
        else:
            for src in blocks.sources:
                src.check_identity()
            sizes = [s.current_size() for s in blocks.sources] + [b.size for b in blocks.blobs]
        state.pass_no = epoch
        if not final:
            state.phase = "pass"
        # Downtime is the writer's pause (QEMU's meaning): a run that never paused has none.
        state.stats.final_pass_started = paused_at if final else 0.0
        self._begin_epoch(epoch, sizes)
        wire_before = sum(self.pool.wire)
        res = self._hand_out(epoch, full) if delta is None else self._hand_out_tree(epoch, delta)
        self.unread = res.unread  # read again next pass, wherever the walk finds them
        res.tree_ops = ops
        sync_start = time.monotonic()
        # The one order that closes an epoch: pages.flush(), then blob.send(), then
        # sync(). The blob client never flushes and never syncs on its own.
        self.pool.flush()
        if final:
            self.pool.send_blobs(epoch, blocks.blobs, len(blocks.sources), blocks.packet_size)
        res.counts = self._sync(epoch)
        if delta is not None:
            # Writing a page moves a file's mtime: the times go once the pages are in.
            res.tree_ops += self.transport.send_tree(epoch, delta.times())
        now = time.monotonic()
        if self.await_ack is not None and not final:
            self.await_ack(epoch)
        res.wire_bytes = sum(self.pool.wire) - wire_before
        self._report(epoch, res, pass_start, sync_start, now, final)
        return res

    def _begin_epoch(self, epoch: int, sizes: list[int]) -> None:
        blocks = self.blocks
        for i, (old, new) in enumerate(zip(self.state.sizes, sizes)):
            if blocks.tree is not None:
                break  # a tree's size is its files' total, for progress: nothing to resize
            if old != new:
                if i < len(blocks.sources):
                    log.info("%s changed size: %d -> %d bytes", blocks.sources[i].path, old, new)
                blocks.tables[i].resize(old, new, blocks.page_sizes[i])
                if self.dirty_log is not None and new > old:
                    self.dirty_log.mark_dirty(old, new - old, block=i)
        self.state.sizes = sizes
        self.transport.begin_epoch(epoch, sizes)

    def _sync(self, epoch: int) -> P.Counts:
        """Close the epoch: a SYNC packet on every channel, then EPOCH_END on main."""
        total = self.pool.sync(epoch)
        stats = self.state.stats
        stats.payload_bytes = sum(self.pool.payload)
        stats.transferred_bytes = self.state.live_wire = sum(self.pool.wire)
        self.transport.end_epoch(epoch, total)
        return total

    def work_items(self, full: bool) -> deque[tuple[int, int, int]]:
        """Chunk-aligned ranges: at most ITEM_BYTES, and small enough that every
        channel gets several per pass, so a slow channel cannot hold up the pass."""
        ps = self.blocks.page_size
        cp = chunk_pages(ps)
        sizes = self.state.sizes[: len(self.blocks.sources)]
        total_pages = sum(pages_of(size, ps) for size in sizes)
        per_item = min(ITEM_BYTES // ps, total_pages // (8 * self.pool.count))
        step = max(cp, per_item // cp * cp)
        items: deque[tuple[int, int, int]] = deque()
        if self.dirty_log is not None and not full:
            # The API tracker: only chunks the application marked, merged into runs.
            for b, chunks in sorted(self.dirty_log.take().items()):
                n = pages_of(self.state.sizes[b], ps)
                run_start = run_end = -1
                for c in chunks + [-2]:
                    if c == run_end and run_end - run_start < step // cp:
                        run_end += 1
                        continue
                    if run_start >= 0 and run_start * cp < n:
                        items.append((b, run_start * cp, min(n, run_end * cp)))
                    run_start, run_end = c, c + 1
            return items
        for b, size in enumerate(sizes):
            for start, end in self.tracking.spans(b, pages_of(size, ps), step, full):
                items.append((b, start, end))
        return items

    def _hand_out(self, epoch: int, full: bool) -> PassResult:
        """Hand every range to whichever channel is free; gather what they found.

        The round-robin start carries over between passes, as QEMU's does, so
        a range need not travel on the same channel twice: only the barrier
        keeps an older copy from landing last.
        """
        if self.dirty_log is not None and full:
            self.dirty_log.take()  # the full pass covers everything marked so far
        items = self.work_items(full)
        res = PassResult()
        n = self.pool.count
        outstanding = [0] * n
        next_id = 0
        # With --resume, pass 1 compares against the old copy, range by range
        # as its hashes arrive, instead of sending everything.
        seeded = full and self.old_copy.enabled
        if seeded:
            full = False
        sizes = self.state.sizes
        while items or any(outstanding):
            self.tracking.tick()
            for _ in range(n):
                c = self.next_channel
                self.next_channel = (c + 1) % n
                ready = items and (not seeded or self.old_copy.covers(items[0][0], items[0][2]))
                if ready and outstanding[c] < IN_FLIGHT:
                    b, start, end = items.popleft()
                    self.pool.send(c, Work(next_id, epoch, b, start, end, sizes[b], full, seeded))
                    next_id += 1
                    outstanding[c] += 1
            for w, msg in self.pool.poll():
                done = expect_report(msg, Done)
                outstanding[w.index] -= 1
                self._count(res, done)
        return res

    def _hand_out_tree(self, epoch: int, delta: TreeDelta) -> PassResult:
        """Hand each file to the channel that owns its id, in batches; the channel
        keeps the file's page table, so a file always travels on the same channel."""
        pool = self.pool
        n = pool.count
        forget: list[list[int]] = [[] for _ in range(n)]
        for fid in delta.dropped:
            forget[fid % n].append(fid)
        for c, fids in enumerate(forget):
            if fids:
                pool.send(c, Forget(tuple(fids)))
        res = PassResult()
        outstanding = [0] * n
        batcher = Batcher(self.tracking.tree_items(delta, set(self.unread)), n)
        next_id = 0
        while True:
            self.tracking.tick()
            batcher.pull(lambda c: outstanding[c] < IN_FLIGHT)
            for c in range(n):
                while outstanding[c] < IN_FLIGHT and (files := batcher.take(c)) is not None:
                    pool.send(c, TreeWork(next_id, epoch, 0, files))
                    next_id += 1
                    outstanding[c] += 1
                    res.files_read += len(files)
            if not any(outstanding):
                if batcher.done():
                    return res
                continue
            for w, msg in pool.poll():
                done = expect_report(msg, Done)
                outstanding[w.index] -= 1
                self._count(res, done)

    def _count(self, res: PassResult, done: Done) -> None:
        res.dirty_pages += done.dirty_pages
        res.zero_pages += done.zero_pages
        res.read_bytes += done.read_bytes
        res.short_read |= done.short_read
        res.unread.extend(done.unread)
        self.state.live_wire += done.wire_bytes
        self.estimator.on_sent(time.monotonic(), done.wire_bytes)

    def _report(self, epoch: int, res: PassResult, pass_start: float, sync_start: float,
                now: float, final: bool) -> None:
        ps = self.blocks.page_size
        stats = self.state.stats
        stats.passes = epoch
        stats.normal_pages += res.counts.normal
        stats.zero_pages += res.counts.zero
        est = self.estimator
        est.end_pass(
            PassSample(epoch, pass_start, now - pass_start,
                       (res.dirty_pages + res.zero_pages) * ps, res.wire_bytes,
                       res.read_bytes, now - sync_start)
        )
        if self.dirty_log is not None:
            est.pending_bytes = self.dirty_log.pending_bytes()
        expected = est.expected_downtime(sum(self.state.sizes))
        tree = self.blocks.tree
        extra = {} if tree is None else {
            "entries": tree.entries, "tree_ops": res.tree_ops, "files_read": res.files_read,
        }
        self.events.emit(
            "pass", **{"pass": epoch}, **extra,
            dirty_bytes=res.dirty_pages * ps,
            sent_bytes=res.wire_bytes,
            normal_pages=res.counts.normal,
            zero_pages=res.counts.zero,
            duration_ms=round((now - pass_start) * 1000, 1),
            bandwidth_bytes_per_s=round(est.bandwidth),
            dirty_rate_bytes_per_s=round(est.dirty_rate),
            remaining_bytes=est.remaining,
            expected_downtime_ms=round(expected * 1000, 1) if expected != float("inf") else None,
            throttle_pct=self.throttle_pct(),
            final=final,
            read_bytes=res.read_bytes,
            **self.tracking.fields(),
        )
        log.info(
            "pass %d: %d dirty pages, %d zero pages, %d bytes sent in %.0f ms",
            epoch, res.dirty_pages, res.zero_pages, res.wire_bytes, (now - pass_start) * 1000,
        )

