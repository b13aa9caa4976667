"""What the user sees and steers while send runs: the progress line and events,
and the control socket's `multifd status|cancel|set` (QMP's query-migrate,
migrate_cancel and migrate-set-parameters)."""

from __future__ import annotations

import contextlib
import logging
import math
from types import TracebackType
from typing import Any, Iterator

from multifd_cli.common.progress import Progress, Snapshot
from multifd_cli.config import SendConfig, parse_rate
from multifd_cli.errors import EXIT_SIGINT, Cancelled, UsageError
from multifd_cli.events import Events
from multifd_cli.net.control import ControlServer, control_path
from multifd_cli.send.convergence import Estimator
from multifd_cli.send.pool import Watch
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.state import MigrationState
from multifd_cli.writer.guard import WriterGuard

log = logging.getLogger("multifd")


class Steering:
    """Serves the control socket and draws progress; a `with` block owns the socket."""

    def __init__(self, cfg: SendConfig, events: Events, state: MigrationState,
                 estimator: Estimator, writer: WriterGuard, limit: SharedRateLimit) -> None:
        self.control_socket = cfg.control
        self.state = state
        self.estimator = estimator
        self.writer = writer
        self.limit = limit
        self.progress = Progress(events, tty=cfg.progress, json_interval=cfg.json_interval)
        self.control: ControlServer | None = None
        self.cancelled = False

    def __enter__(self) -> Steering:
        if self.control_socket:
            self.control = ControlServer(control_path(self.control_socket), self.on_control)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    @contextlib.contextmanager
    def showing_progress(self) -> Iterator[None]:
        """Clear the progress line when the migration ends, however it ends."""
        try:
            yield
        finally:
            self.progress.finish()

    def watched(self) -> list[Watch]:
        return [(self.control, self.control.serve_ready)] if self.control is not None else []

    def tick(self) -> None:
        """After every wait: act on a cancel, and redraw the progress when due."""
        if self.cancelled:
            raise Cancelled("cancelled by `multifd cancel`", EXIT_SIGINT)
        if self.progress.due():
            self.progress.update(self.snapshot())

    def snapshot(self) -> Snapshot:
        est, state = self.estimator, self.state
        total = sum(state.sizes)
        rate = self.progress.rate(state.live_wire)
        expected = est.expected_downtime(total) if state.phase != "setup" else float("inf")
        eta = None
        if state.pass_no == 1 and rate > 0:
            eta = max(0.0, total - state.live_wire) / rate
        return Snapshot(
            state.phase, state.pass_no, state.live_wire, total, rate,
            est.remaining if est.passes else None,
            round(expected * 1000, 1) if expected != float("inf") else None, eta,
        )

    def status(self) -> dict[str, Any]:
        """What `multifd status` shows: query-migrate's counters and the estimates."""
        state, writer = self.state, self.writer
        s = state.stats.summary()
        s.update(self.snapshot().fields())
        s.update(
            status="completed" if writer.succeeded
            else ("setup" if state.phase == "setup" else "active"),
            transferred_bytes=state.live_wire,
            downtime_ms=s["downtime_ms"] if writer.paused_at or writer.succeeded else 0.0,
            dirty_rate_bytes_per_s=round(self.estimator.dirty_rate),
            throttle_pct=writer.throttle.pct,
            downtime_limit_ms=state.downtime_limit_ms,
            max_bandwidth=int(self.limit.rate),
        )
        return s

    def on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request; a UsageError becomes the client's error."""
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "cancel":
            self.cancelled = True
            return {"ok": True}
        if cmd == "set":
            param, value = req.get("param"), str(req.get("value", ""))
            if param == "max-bandwidth":
                rate = parse_rate(value)
                self.estimator.bandwidth_cap = float(rate)
                if not self.writer.pauser.paused:  # the downtime always runs unlimited
                    self.limit.set_rate(rate)
                log.info("max-bandwidth set to %d bytes/s", rate)
                return {"ok": True}
            if param == "downtime-limit":
                try:
                    ms = float(value)
                except ValueError:
                    raise UsageError(f"downtime-limit {value!r}: expected milliseconds") from None
                if not math.isfinite(ms) or ms <= 0:
                    raise UsageError("downtime-limit must be a number of milliseconds above 0")
                self.state.downtime_limit_ms = ms
                log.info("downtime-limit set to %g ms", ms)
                return {"ok": True}
            raise UsageError(f"unknown parameter {param!r}: expected max-bandwidth or downtime-limit")
        raise UsageError(f"unknown command {cmd!r}: expected status, cancel or set")
