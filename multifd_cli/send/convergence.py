"""Convergence maths: bandwidth, dirty rate, and the expected downtime.

Pure and clock-free (callers pass times in), so the policy is unit-tested
without processes. The switchover rule is QEMU's: stop the writer once what is
left can be sent within the downtime limit at the measured bandwidth.

    expected downtime = final scan time + (remaining + in flight) / bandwidth
                        + sync latency

where the final scan time is the tracker's measured scan rate times the size
(about zero for the API tracker, which reads only what was marked; the
kernel tracker's own pass start plus its window's bytes), remaining is what
the last pass found dirty, and the sync latency is measured from the flush +
sync of the last pass plus one round trip for completion.

Bandwidth is what the destination acknowledged, not what went into local
socket buffers: recv sends EPOCH_ACK as it closes each epoch (Delivery). A
relay that buffers a lot makes a pass look sent long before it is applied; the
ack's lag after the pass's sync, the bytes still unacknowledged, and recv's
flush of DEST are then counted too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Before anything is measured, assume a scan this fast per channel. It only
# feeds the setup-time warning; every pass replaces it with a measurement.
ASSUMED_SCAN_BYTES_PER_S = 2e9
WINDOW_S = 1.0  # bandwidth is averaged over this much recent sending
# A pass is worth its cost only while it improves the expected downtime: an
# estimate must beat the best so far by STALL_GAIN within STALL_PASSES passes
# (much as QEMU counts dirty-sync iterations that do not converge).
STALL_GAIN = 0.10
STALL_PASSES = 3


@dataclass
class PassSample:
    number: int
    started: float
    duration: float
    dirty_bytes: int
    wire_bytes: int
    scanned_bytes: int
    sync_seconds: float


@dataclass
class Delivery:
    """What recv acknowledged having applied (EPOCH_ACK), against what send sent.

    An epoch's ack may arrive before send has recorded the epoch's end (it is
    awaited right after the sync); the two are matched by epoch either way.
    """

    expected: bool = False  # recv acknowledges epochs (a peer; not a file: image)
    ignored: bool = False  # test only: estimate as if no ack ever came (the old estimate)
    epoch: int = 0  # the latest epoch recv acknowledged
    acked: int = 0  # wire bytes recv had read from its channels when it closed it
    sent: int = 0  # wire bytes send had put into its sockets, as of its last sync
    lag: float = 0.0  # seconds from send's sync of an epoch to recv's ack of it
    flush: float = 0.0  # seconds recv's last flush of DEST took
    overdue: float = 0.0  # how long the last awaited ack kept us waiting in vain
    rate: float = 0.0  # bytes/s delivered while the destination was busy
    # epoch -> (start of the pass, its sync, send's wire total then); epoch -> (ack, acked)
    synced: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    acks: dict[int, tuple[float, int]] = field(default_factory=dict)
    base: tuple[float, int] = (0.0, 0)  # the previous matched ack: when, and bytes acked

    def on_synced(self, epoch: int, started: float, now: float, sent: int) -> None:
        """Send closed `epoch` at `now` with `sent` wire bytes in total so far."""
        self.synced[epoch] = (started, now, sent)
        self.sent = sent
        self._match(epoch)

    def on_ack(self, now: float, epoch: int, wire_bytes: int, flush_us: int) -> None:
        """recv closed `epoch`, having read `wire_bytes` in all."""
        if self.ignored:
            return
        self.flush = flush_us / 1e6
        self.epoch, self.acked = max(self.epoch, epoch), max(self.acked, wire_bytes)
        self.acks[epoch] = (now, wire_bytes)
        self._match(epoch)

    def _match(self, epoch: int) -> None:
        if epoch not in self.synced or epoch not in self.acks:
            return
        started, synced, _ = self.synced.pop(epoch)
        now, wire_bytes = self.acks.pop(epoch)
        self.lag = max(0.0, now - synced)
        # Delivered during this epoch: from when it started (or the previous ack, if
        # later) to this ack. A hash pass that scans more than it sends under-reports
        # the link, so the best recent sample is kept, decaying as _best_bandwidth does.
        span = now - max(started, self.base[0])
        got = wire_bytes - self.base[1]
        if span > 0 and got >= 1 << 20:
            self.rate = max(self.rate * 0.9, got / span)
        self.base = (now, wire_bytes)

    @property
    def seen(self) -> bool:
        return self.epoch > 0

    @property
    def in_flight(self) -> int:
        """Bytes send counted as sent that recv has not acknowledged yet."""
        return max(0, self.sent - self.acked) if self.expected else 0

    def latency(self) -> float:
        """From a pass's sync until recv has applied it: measured, or at least as long
        as the last ack kept us waiting."""
        return max(self.lag, self.overdue)


@dataclass
class Estimator:
    """Running estimates for one migration."""

    channels: int = 1
    scan_is_free: bool = False  # the API tracker reads only what was marked
    bandwidth_cap: float = 0.0  # --max-bandwidth, bytes/s; 0 means none
    _window: deque[tuple[float, int]] = field(default_factory=deque)
    _best_bandwidth: float = 0.0
    _pass_peak: float = 0.0  # the best window of sending seen in the current pass
    passes: list[PassSample] = field(default_factory=list)
    scan_rate: float = 0.0  # bytes/s of a pass that sends little
    # The API tracker knows exactly what is dirty now; the hash tracker only
    # learns it by scanning, so after the first pass (which sent everything)
    # it knows nothing yet about the writer.
    pending_bytes: int | None = None
    # The kernel tracker: what its own pass start (marker, writeback, drain) last
    # cost, and how many bytes its last window made the pass read. The final pass
    # pays both instead of a scan of the whole source.
    tracker_cost: float | None = None
    scan_bytes: int = 0
    delivery: Delivery = field(default_factory=Delivery)
    # A directory source reads only files whose stat changed: its final scan costs
    # about one walk of the tree (measured each pass), not a read of every byte.
    walk_seconds: float | None = None

    # -- inputs ------------------------------------------------------------------------
    def on_sent(self, now: float, nbytes: int) -> None:
        """Bytes put on the wire at `now` (from channel reports, often)."""
        self._window.append((now, nbytes))
        while self._window and now - self._window[0][0] > WINDOW_S:
            self._window.popleft()
        span = now - self._window[0][0]
        # A report comes after its bytes were sent: the first one's went before the span.
        total = sum(n for _, n in self._window) - self._window[0][1]
        # Only a window that is mostly sending says anything about the link. The best
        # one is kept through the pass and decays only from pass to pass (end_pass):
        # a hash pass sends no faster than the writer dirties, and decaying on every
        # report dragged the link's estimate down to the writer's rate (29 MiB/s on a
        # loopback link good for 250 MiB/s, doubling the expected downtime).
        if span >= 0.1 and total >= 1 << 20:
            self._pass_peak = max(self._pass_peak, total / span)
            self._best_bandwidth = max(self._best_bandwidth, total / span)

    def on_ack(self, now: float, epoch: int, wire_bytes: int, flush_us: int) -> None:
        """recv closed `epoch` (EPOCH_ACK) having read `wire_bytes` from its channels."""
        self.delivery.on_ack(now, epoch, wire_bytes, flush_us)

    def end_pass(self, sample: PassSample) -> None:
        self.passes.append(sample)
        # A link that slowed down is followed a tenth per pass.
        self._best_bandwidth = max(self._best_bandwidth * 0.9, self._pass_peak)
        self._pass_peak = 0.0
        d = self.delivery
        d.on_synced(sample.number, sample.started, sample.started + sample.duration,
                    d.sent + sample.wire_bytes)
        if sample.duration > 0 and sample.wire_bytes >= 4 << 20:
            rate = sample.wire_bytes / sample.duration
            self._best_bandwidth = max(self._best_bandwidth, rate)
        if sample.duration > 0 and sample.scanned_bytes:
            # Channels scan and send at once, so only a pass that sent little
            # shows the scan rate; its whole duration is counted, to be safe.
            send_time = sample.wire_bytes / self.bandwidth if self.bandwidth else 0.0
            if send_time < 0.5 * sample.duration:
                self.scan_rate = sample.scanned_bytes / sample.duration

    # -- outputs --------------------------------------------------------------------------
    @property
    def bandwidth(self) -> float:
        """Bytes/s the channels together put on the wire, capped by --max-bandwidth,
        and by what recv acknowledged applying once its acks arrive."""
        bw = self._best_bandwidth
        if self.delivery.rate:
            bw = min(bw, self.delivery.rate) if bw else self.delivery.rate
        if self.bandwidth_cap:
            bw = min(bw, self.bandwidth_cap) if bw else self.bandwidth_cap
        return bw

    @property
    def dirty_rate(self) -> float:
        """Bytes/s the writer dirtied, judged from the last pass and the gap before it."""
        if len(self.passes) < 2:
            return 0.0
        prev, last = self.passes[-2], self.passes[-1]
        interval = last.started + last.duration - (prev.started + prev.duration)
        return last.dirty_bytes / interval if interval > 0 else 0.0

    @property
    def remaining(self) -> int:
        """Bytes the final pass is expected to send: what is known to be dirty, or
        else what the last pass found."""
        if self.pending_bytes is not None:
            return self.pending_bytes
        return self.passes[-1].dirty_bytes if self.passes else 0

    def scan_seconds(self, size: int) -> float:
        """What finding the final pass's dirty pages costs: nothing for the API
        tracker, the tracker's pass start and its window's bytes for the kernel
        tracker, one walk for a directory tree, and reading all `size` bytes for
        the hash tracker."""
        if self.walk_seconds is not None:
            return self.walk_seconds
        if self.scan_is_free:
            return 0.0
        rate = self.scan_rate or ASSUMED_SCAN_BYTES_PER_S * self.channels
        if self.tracker_cost is not None:
            return self.tracker_cost + self.scan_bytes / rate
        return size / rate

    def sync_seconds(self) -> float:
        if not self.passes:
            return 0.0
        d = self.delivery
        if d.expected:
            # Measured: send's flush+sync, the lag until recv had applied the pass and
            # said so (delivery through any buffers, and one round trip), and recv's
            # flush of DEST, which completion waits for.
            return self.passes[-1].sync_seconds + d.latency() + d.flush
        # The final pass pays one flush+sync and the completion round trip,
        # which costs about as much again.
        return 2 * self.passes[-1].sync_seconds

    def parts(self, size: int) -> tuple[float, float, float]:
        """The expected downtime's three terms, in seconds: finding the dirty pages,
        sending them (and what is still in flight), and flush, sync and completion."""
        bw = self.bandwidth
        left = self.remaining + self.delivery.in_flight
        send = left / bw if bw else (0.0 if not left else float("inf"))
        return self.scan_seconds(size), send, self.sync_seconds()

    def expected_downtime(self, size: int) -> float:
        """Seconds from the pause to the destination's acknowledgement."""
        if not self.passes or (len(self.passes) < 2 and self.pending_bytes is None):
            return float("inf")
        return sum(self.parts(size))

    def converging(self) -> bool:
        """False when the writer keeps outrunning the link, as QEMU's auto-converge
        judges it: in each of the last two pass intervals the writer dirtied more
        than half of what the link could send in that time."""
        if len(self.passes) < 3:
            return True

        def heavy(prev: PassSample, last: PassSample) -> bool:
            interval = last.started + last.duration - (prev.started + prev.duration)
            return last.dirty_bytes > 0.5 * self.bandwidth * interval

        p = self.passes
        return not (heavy(p[-3], p[-2]) and heavy(p[-2], p[-1]))

    def bound(self, size: int) -> str:
        """What the expected downtime is mostly made of, in words for the user."""
        bw = self.bandwidth
        parts = {
            f"finding the dirty pages takes about {self.scan_seconds(size) * 1000:.0f} ms "
            + ("(the kernel tracker's writeback and reads)" if self.tracker_cost is not None
               else "(the hash tracker reads all of the source)"): self.scan_seconds(size),
            f"the writer dirties {self.dirty_rate / 2**20:.1f} MiB/s against "
            f"{bw / 2**20:.1f} MiB/s of bandwidth, leaving {self.remaining / 2**20:.1f} MiB "
            "for the final pass": self.remaining / bw if bw else math.inf,
            f"flush, sync, delivery and completion take about "
            f"{self.sync_seconds() * 1000:.0f} ms"
            + (f" (recv acknowledged a pass {self.delivery.latency() * 1000:.0f} ms after it "
               "was sent)" if self.delivery.expected else ""): self.sync_seconds(),
        }
        return max(parts, key=lambda k: parts[k])


@dataclass
class StallWatch:
    """Says when passes stopped paying off: the expected downtime has not beaten
    the best estimate so far by STALL_GAIN for STALL_PASSES passes in a row."""

    best: float = math.inf
    flat: int = 0

    def observe(self, expected: float) -> bool:
        """Take one pass's estimate; True once the estimates have stalled."""
        if not math.isfinite(expected):
            return False
        if expected < self.best * (1 - STALL_GAIN):
            self.flat = 0
        else:
            self.flat += 1
        # The best so far is the lowest estimate, gain or not: otherwise a slow
        # creep of a few % a pass beats a stale best every third pass and never stalls.
        self.best = min(self.best, expected)
        return self.flat >= STALL_PASSES
