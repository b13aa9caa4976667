"""Progress for people (a status line on a TTY) and for scripts (JSON events).

Both read the same snapshot, taken from the orchestrator or receiver at most
every `interval` seconds, so a slow terminal never slows the migration.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from multifd_cli.events import Events


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Snapshot:
    """What a progress line shows; fields that are unknown stay None."""

    phase: str  # "setup", "pass", "switchover", "completing"
    pass_no: int
    sent_bytes: int  # bytes put on the wire so far
    total_bytes: int  # the source size
    rate: float  # bytes/s
    remaining_bytes: int | None = None
    expected_downtime_ms: float | None = None
    eta_s: float | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "pass": self.pass_no,
            "transferred_bytes": self.sent_bytes,
            "total_bytes": self.total_bytes,
            "bandwidth_bytes_per_s": round(self.rate),
            "remaining_bytes": self.remaining_bytes,
            "expected_downtime_ms": self.expected_downtime_ms,
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }


class Progress:
    """Rate-limited progress: a redrawn stderr line and/or `progress` JSON events."""

    def __init__(
        self,
        events: Events,
        *,
        tty: bool | None = None,
        json_interval: float = 1.0,
        line_interval: float = 0.5,
        stream: IO[str] | None = None,
    ) -> None:
        self.events = events
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.json_interval = json_interval
        self.line_interval = line_interval
        self._next_json = time.monotonic() + json_interval
        self._next_line = 0.0
        self._last_rate_t = time.monotonic()
        self._last_rate_bytes = 0
        self._rate = 0.0
        self._drawn = False

    def rate(self, sent: int) -> float:
        """A smoothed sending rate from successive byte counts."""
        now = time.monotonic()
        dt = now - self._last_rate_t
        if dt >= 0.25:
            inst = (sent - self._last_rate_bytes) / dt
            self._rate = inst if not self._rate else 0.5 * self._rate + 0.5 * inst
            self._last_rate_t, self._last_rate_bytes = now, sent
        return self._rate

    def due(self) -> bool:
        now = time.monotonic()
        return (self.events.enabled and now >= self._next_json) or (
            self.tty and now >= self._next_line
        )

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if self.events.enabled and now >= self._next_json:
            self._next_json = now + self.json_interval
            self.events.emit("progress", **snap.fields())
        if self.tty and now >= self._next_line:
            self._next_line = now + self.line_interval
            self._draw(snap)

    def _draw(self, s: Snapshot) -> None:
        parts = [
            f"pass {s.pass_no}",
            f"{human_bytes(s.sent_bytes)} sent of {human_bytes(s.total_bytes)}",
            f"{human_bytes(s.rate)}/s",
        ]
        if s.remaining_bytes is not None:
            parts.append(f"dirty {human_bytes(s.remaining_bytes)}")
        if s.expected_downtime_ms is not None:
            parts.append(f"downtime ~{s.expected_downtime_ms:.0f} ms")
        if s.eta_s is not None:
            parts.append(f"ETA {s.eta_s:.0f} s")
        line = f"{s.phase}: " + ", ".join(parts)
        try:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._drawn = True
        except OSError:
            self.tty = False

    def finish(self) -> None:
        """Leave the last line on screen and move below it."""
        if self._drawn:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except OSError:
                pass
            self._drawn = False
