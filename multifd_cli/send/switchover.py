"""When to stop iterating, and the switchover itself.

ConvergencePolicy looks at each finished pass and says whether the copy may
switch over: with a pause mechanism, once the expected downtime fits
--downtime-limit; without one, once a pass finds nothing (or size, mtime and
ctime prove nothing changed). Switchover then pauses the writer, runs the final
pass with the blobs, and checks that nothing else wrote meanwhile.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence

from multifd_cli.config import Convergence
from multifd_cli.errors import ConvergeError, IOFailure, ProtocolError
from multifd_cli.events import Events
from multifd_cli.send.convergence import Estimator, StallWatch
from multifd_cli.send.passes import Blocks, PassResult, PassRunner
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.state import MigrationState
from multifd_cli.send.tracker import DirtyLog
from multifd_cli.writer.guard import WriterGuard

log = logging.getLogger("multifd")

#: The longest send waits after a pass for recv to acknowledge it (the data drains).
ACK_WAIT_S = 30.0
#: Test only: "1" makes the estimates ignore recv's acks, as they did before them,
#: to show that a buffering relay then breaks the downtime limit.
IGNORE_ACKS_ENV = "MULTIFD_TEST_IGNORE_ACKS"
# mtime/ctime granularity can be a clock tick or more; a change within this
# window of the pass start might not move them, so the shortcut is not trusted.
MTIME_MARGIN_NS = 2_000_000_000


class ConvergencePolicy:
    """After each pass: another one, or switch over now (or give up)."""

    def __init__(self, conv: Convergence, state: MigrationState, estimator: Estimator,
                 writer: WriterGuard, blocks: Blocks, dirty_log: DirtyLog | None,
                 pump: Callable[[], Sequence[Any]] | None = None) -> None:
        self.conv = conv
        self.state = state
        self.estimator = estimator
        self.writer = writer
        self.blocks = blocks
        self.dirty_log = dirty_log
        self.saw_changes = False  # a later pass found dirty pages: someone writes
        self.stall = StallWatch()
        self.pump = pump  # serves the main connection (and the channels) for a moment
        if os.environ.get(IGNORE_ACKS_ENV) == "1":
            self.pump = None
            estimator.delivery.ignored = True
        self._keys: list[tuple[int, int, int]] = []
        self._wall_start = 0

    def warn_if_scan_exceeds_limit(self) -> None:
        size = sum(self.state.sizes)
        scan = self.estimator.scan_seconds(size)
        limit_ms = self.conv.downtime_limit_ms
        if self.writer.can_pause and scan > limit_ms / 1000:
            log.warning(
                "scanning %d bytes alone may take about %.0f ms, more than --downtime-limit %g ms: "
                "raise the limit, or track writes with the API tracker",
                size, scan * 1000, limit_ms,
            )

    def pass_starts(self) -> None:
        """Remember what the sources looked like before the pass (the mtime shortcut)."""
        self._keys = [s.stat_key() for s in self.blocks.sources]
        self._wall_start = time.time_ns()

    def converged(self, epoch: int, res: PassResult) -> bool:
        """True once the copy may switch over; ConvergeError if it never will."""
        conv = self.conv
        found = res.dirty_pages + res.zero_pages
        self.saw_changes |= epoch > 1 and found > 0
        if self.dirty_log is not None:
            self.estimator.pending_bytes = self.dirty_log.pending_bytes()
        expected = self.estimator.expected_downtime(sum(self.state.sizes))
        if not self.writer.can_pause:
            if epoch > 1 and found == 0 and not res.short_read and not res.tree_ops:
                return True  # a pass that found nothing to send confirms the copy
            # A device node's mtime does not move when its blocks are written; a tree
            # has no one mtime to go by.
            if (conv.mtime_shortcut and self.dirty_log is None and not res.short_read
                    and self.blocks.tree is None
                    and not any(s.is_block_device for s in self.blocks.sources)
                    and self._unchanged()):
                return True
            if epoch >= conv.max_passes:
                raise ConvergeError(
                    f"still changing after {epoch} passes (--max-passes); "
                    "pause the writer (--pause-pid, --pause-cgroup, --pause-cmd) "
                    "or raise --max-passes"
                )
            return False
        limit_ms = self.state.downtime_limit_ms
        if expected <= limit_ms / 1000:
            return True
        # While --auto-converge is about to slow a writer that outruns the link, more
        # passes may help; a stall it cannot touch (the scan, the sync) still counts.
        throttle = self.writer.throttle
        may_throttle = (conv.auto_converge and not self.estimator.converging()
                        and throttle.pct < throttle.MAX)
        if self.stall.observe(expected) and not may_throttle:
            bound = self.estimator.bound(sum(self.state.sizes))
            if conv.strict_downtime:
                raise ConvergeError(
                    f"expected downtime {expected * 1000:.0f} ms stopped improving over "
                    f"--downtime-limit {limit_ms:g} ms after {epoch} passes: {bound} "
                    "(--strict-downtime)"
                )
            log.warning(
                "the expected downtime stopped improving (%.0f ms, over --downtime-limit %g ms, "
                "after %d passes): switching over now; %s",
                expected * 1000, limit_ms, epoch, bound,
            )
            return True
        if epoch >= conv.max_passes:
            if conv.strict_downtime:
                raise ConvergeError(
                    f"expected downtime {expected * 1000:.0f} ms is over --downtime-limit "
                    f"{limit_ms:g} ms after {epoch} passes (--strict-downtime)"
                )
            log.warning(
                "reached --max-passes %d: switching over now; the downtime may exceed "
                "%g ms (expected %.0f ms)", epoch, limit_ms, expected * 1000,
            )
            return True
        if conv.auto_converge and not self.estimator.converging():
            pct = self.writer.throttle.step()
            log.info("auto-converge: throttling the writer to %d%%", 100 - pct)
        return False

    def await_ack(self, epoch: int) -> None:
        """Wait for recv's ack of this epoch before the estimate.

        The decision then sees what was delivered, not what still sits in socket
        buffers and relays; and the next pass starts once the last one has drained,
        as sending faster than the destination applies only fills buffers that the
        downtime would have to wait for. Bounded by ACK_WAIT_S: an ack that takes
        longer counts as the least the delivery takes (Delivery.overdue).
        """
        d = self.estimator.delivery
        if self.pump is None or not self.writer.can_pause:
            return
        d.expected = True
        start = time.monotonic()
        deadline = start + ACK_WAIT_S
        while d.epoch < epoch and time.monotonic() < deadline:
            for _w, msg in self.pump():
                raise ProtocolError(f"channel: unexpected {type(msg).__name__} between passes")
        d.overdue = 0.0 if d.epoch >= epoch else time.monotonic() - start

    def _unchanged(self) -> bool:
        """Size, mtime and ctime unchanged since the pass began, and old enough to trust.

        Writes through a shared mmap need not update mtime, which is why
        --no-mtime-shortcut exists.
        """
        for src, before in zip(self.blocks.sources, self._keys):
            if src.stat_key() != before:
                return False
            if self._wall_start - max(before[1], before[2]) < MTIME_MARGIN_NS:
                return False
        return True


class Switchover:
    """Pause, run the final pass, and check nothing else wrote meanwhile."""

    def __init__(self, runner: PassRunner, writer: WriterGuard, limit: SharedRateLimit,
                 estimator: Estimator, state: MigrationState, events: Events) -> None:
        self.runner = runner
        self.writer = writer
        self.limit = limit
        self.estimator = estimator
        self.state = state
        self.events = events

    def run(self, epoch: int) -> int:
        """Return the final pass's epoch."""
        self.writer.throttle.stop()
        self.state.phase = "switchover"
        self.limit.set_rate(0)  # the downtime runs at full speed
        expected = self.estimator.expected_downtime(sum(self.state.sizes))
        self.state.stats.expected_downtime = expected if math.isfinite(expected) else None
        self.events.emit(
            "switchover", **{"pass": epoch + 1},
            expected_downtime_ms=round(expected * 1000, 1) if math.isfinite(expected) else None,
            remaining_bytes=self.estimator.remaining,
        )
        self.runner.tracking.settle()
        self.writer.pause()
        self.state.stats.paused = True
        self.state.stats.final_pass_started = self.writer.paused_at  # downtime runs from here
        log.info("writer paused; final pass")
        blocks = self.runner.blocks
        for b in blocks.blobs:
            b.produce()
        keys = [s.stat_key() for s in blocks.sources]
        epoch += 1
        res = self.runner.run(epoch, full=False, final=True, paused_at=self.writer.paused_at)
        if [s.stat_key() for s in blocks.sources] != keys or res.short_read or res.vanished:
            raise IOFailure(
                "the source changed during the final pass although the writer was paused: "
                "another process writes to it (pause it too)"
            )
        return epoch
