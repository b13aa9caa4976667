"""What the user sees: JSON event lines on stdout, and the counters behind them.

Counter names follow QEMU's query-migrate and are a contract with users'
scripts (docs/events.md): total_time_ms, setup_time_ms, downtime_ms,
transferred_bytes, normal_pages, zero_pages, passes, mbps, channels,
compression, digest.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, cast


class _Discard(io.TextIOBase):
    """Where events go when there is no stdout: nowhere."""

    def write(self, s: str) -> int:
        return len(s)


class Events:
    """Emits one JSON object per line on stdout when --json is given."""

    def __init__(self, side: str, enabled: bool, stream: IO[str] | None = None) -> None:
        self.side = side
        # sys.stdout is None when the process started with stdout closed (`>&-`):
        # the events then go nowhere, and the exit code and stderr still tell.
        self.stream: IO[str] = stream or sys.stdout or cast("IO[str]", _Discard())
        self.enabled = enabled
        self.t0 = time.monotonic()
        # The progress display shows the same pass events that scripts read, with or
        # without --json, so the two never disagree.
        self.watchers: list[Callable[[str, dict[str, Any]], None]] = []

    def emit(self, event: str, **fields: Any) -> None:
        for watch in self.watchers:
            watch(event, fields)
        if not self.enabled:
            return
        record = {"event": event, "side": self.side, "ts": round(time.monotonic(), 6), **fields}
        try:
            self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError):
            # A reader that went away must not turn success into a crash.
            self.enabled = False


@dataclass
class Stats:
    """Counters of one side of one migration."""

    channels: int = 0
    compression: str = "none"
    started: float = field(default_factory=time.monotonic)
    setup_done: float = 0.0
    final_pass_started: float = 0.0
    finished: float = 0.0
    transferred_bytes: int = 0
    payload_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    passes: int = 0
    digest: str = ""
    paused: bool = False
    expected_downtime: float | None = None  # send: the estimate the switchover was decided on

    def summary(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        total = end - self.started
        return {
            "total_time_ms": round(total * 1000, 1),
            "setup_time_ms": round(((self.setup_done or end) - self.started) * 1000, 1),
            "downtime_ms": round((end - self.final_pass_started) * 1000, 1)
            if self.final_pass_started
            else None,
            "transferred_bytes": self.transferred_bytes,
            "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages,
            "passes": self.passes,
            "mbps": round(self.transferred_bytes * 8 / total / 1e6, 2) if total > 0 else 0.0,
            "channels": self.channels,
            "compression": self.compression,
            "digest": self.digest,
            "payload_bytes": self.payload_bytes,
            "paused": self.paused,
            "expected_downtime_ms": None if self.expected_downtime is None
            else round(self.expected_downtime * 1000, 1),
        }


def human_summary(side: str, status: str, s: dict[str, Any]) -> str:
    """A QEMU `info migrate`-shaped summary for stderr."""
    wire = s["transferred_bytes"]
    ratio = f"{s['payload_bytes'] / wire:.2f}" if wire else "-"
    lines = [
        f"{side}: status: {status}",
        f"  total time: {s['total_time_ms']:.0f} ms  setup: {s['setup_time_ms']:.0f} ms"
        f"  downtime: {_downtime(s)}",
        f"  passes: {s['passes']}  channels: {s['channels']}  compression: {s['compression']}",
        f"  transferred: {s['transferred_bytes']} bytes  throughput: {_mib_per_s(s):.1f} MiB/s"
        f"  compression ratio: {ratio}",
        f"  normal pages: {s['normal_pages']}  zero pages: {s['zero_pages']}",
        f"  digest: {s['digest']}",
    ]
    return "\n".join(lines)


def _downtime(s: dict[str, Any]) -> str:
    if s["downtime_ms"] is None:
        return "none, the writer was not paused"
    return f"{s['downtime_ms']:.0f} ms"


def _mib_per_s(s: dict[str, Any]) -> float:
    """Throughput in MiB/s, the unit of the progress display; JSON keeps QEMU's mbps."""
    secs = s["total_time_ms"] / 1000
    return s["transferred_bytes"] / secs / (1 << 20) if secs > 0 else 0.0
