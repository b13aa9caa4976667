"""Progress for people (a bar on a terminal, a line per pass elsewhere) and for
scripts (JSON events).

All of them read the same snapshot, taken from the orchestrator or receiver at
most every `interval` seconds, so a slow terminal never slows the migration;
the per-pass lines come from the very `pass` events that scripts read.

rich draws the bar. It costs 45-115 ms to import, as much as the rest of a
`multifd` start, so it is imported only when a bar is first drawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from multifd_cli.common import terminal
from multifd_cli.events import Events

#: Redraws per second at most: smooth enough to read, cheap for the main loop.
REDRAWS_PER_S = 10


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(n: float) -> str:
    """Bytes/s in the one unit people see everywhere (MiB/s, as rsync and pv -b do)."""
    return f"{human_bytes(n)}/s"


def human_seconds(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


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


def pass_line(side: str, ev: dict[str, Any]) -> str:
    """One plain line for a `pass` event, in the units of the bar."""
    secs = ev.get("duration_ms", 0) / 1000
    if "sent_bytes" in ev:  # send knows what it found dirty and what it expects next
        sent = ev["sent_bytes"]
        line = (f"{side}: pass {ev['pass']}: {human_bytes(ev['dirty_bytes'])} dirty, "
                f"{human_bytes(sent)} sent in {secs * 1000:.0f} ms")
        if secs > 0:
            line += f" ({human_rate(sent / secs)})"
        if ev["pass"] > 1:
            line += f", dirty rate {human_rate(ev['dirty_rate_bytes_per_s'])}"
        if ev.get("expected_downtime_ms") is not None:
            line += f", expected downtime {ev['expected_downtime_ms']:.0f} ms"
        if ev.get("throttle_pct"):
            line += f", throttle {ev['throttle_pct']}%"
        return line + (", final (writer paused)" if ev.get("final") else "")
    return (f"{side}: pass {ev['pass']}: {ev['normal_pages']} pages applied in "
            f"{secs * 1000:.0f} ms, {human_bytes(ev['transferred_bytes'])} received so far")


def switchover_line(side: str, ev: dict[str, Any]) -> str:
    expected = ev.get("expected_downtime_ms")
    guess = f", expected downtime {expected:.0f} ms" if expected is not None else ""
    return (f"{side}: switchover: writer paused for pass {ev['pass']}, "
            f"{human_bytes(ev['remaining_bytes'])} to send{guess}")


def _foreground(stream: IO[str]) -> bool:
    """Whether this process owns the terminal: of two sides sharing one, only the
    foreground job draws, so the two never overwrite each other's bar."""
    try:
        return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return True  # a terminal that is not our controlling one: nobody to share it with


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


class _PassView:
    """The current pass as the bar shows it, kept up to date from pass events."""

    def __init__(self) -> None:
        self.base = 0  # wire bytes when the current pass began
        self.expected: int | None = None  # bytes the current pass should send, if known
        self.last_pass = 0

    def on_pass(self, ev: dict[str, Any]) -> None:
        self.last_pass = ev["pass"]
        if "sent_bytes" in ev:
            self.base += ev["sent_bytes"]
            # The next pass sends what the writer dirties during this one; unknown
            # after pass 1, which measured no dirty rate yet.
            rate = ev["dirty_rate_bytes_per_s"]
            self.expected = round(rate * ev["duration_ms"] / 1000) if ev["pass"] > 1 else None
        else:  # recv counts bytes since the start; it cannot know the next pass's size
            self.base = ev["transferred_bytes"]
            self.expected = None

    def fields(self, side: str, s: Snapshot) -> tuple[str, float, float | None, str]:
        """description, done, total and the text after the bar."""
        first = s.pass_no <= 1 and self.last_pass == 0
        total = s.total_bytes if first else self.expected
        done = max(0, s.sent_bytes - self.base)
        if s.phase == "setup":
            what = "setup"
        elif s.phase == "completing":  # everything is sent; recv checks the digest
            return f"{side} verifying", 1, 1, "waiting for the destination's verification"
        else:
            what = f"pass {s.pass_no}" + (" (paused)" if s.phase == "switchover" else "")
        info = [f"{human_bytes(done)}", human_rate(s.rate)]
        if s.remaining_bytes is not None and self.last_pass > 1:  # pass 1 found all dirty
            info.append(f"dirty {human_bytes(s.remaining_bytes)}")
        if s.expected_downtime_ms is not None:
            info.append(f"downtime ~{s.expected_downtime_ms:.0f} ms")
        eta = s.eta_s
        if eta is None and total and s.rate > 0 and s.phase == "pass":
            eta = max(0, total - done) / s.rate
        if eta is not None:
            info.append(f"ETA {human_seconds(eta)}")
        if total is not None:
            total = max(total, done)  # headers can take the wire count past the estimate
        return f"{side} {what}", done, total, "  ".join(info)


class _Bar:
    """rich's progress bar on stderr, redrawn by us (no refresh thread: channels
    fork from this process) and sharing the terminal with log records."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=stream, highlight=False)
        self.rich = RichProgress(
            TextColumn("{task.description}", markup=False), BarColumn(bar_width=28),
            TaskProgressColumn(), TextColumn("{task.fields[info]}", markup=False),
            console=console, auto_refresh=False, transient=True,
            redirect_stdout=False, redirect_stderr=False,
        )
        self.task = self.rich.add_task("", total=None, info="")

    def show(self, description: str, done: float, total: float | None, info: str) -> None:
        if total is None and self.rich.tasks[0].total is not None:
            # rich's update() reads total=None as "unchanged": a pass of unknown size
            # needs a task of its own to pulse instead of showing the last pass's size.
            self.rich.remove_task(self.task)
            self.task = self.rich.add_task("", total=None, info="")
        self.rich.update(self.task, description=description, completed=done, total=total,
                         info=info)
        if self.rich.live.is_started:
            self.rich.refresh()
        else:
            self.rich.start()  # hides the cursor and draws the first frame

    def above(self, line: str) -> None:
        """A line that stays: printed above the bar, which is redrawn below it."""
        self.rich.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self.rich.stop()


class Progress:
    """Rate-limited progress: a bar on a terminal, or a plain line per pass on a pipe
    (with --progress), and/or `progress` JSON events."""

    def __init__(
        self,
        events: Events,
        *,
        tty: bool | None = None,
        json_interval: float = 1.0,
        line_interval: float = 1.0 / REDRAWS_PER_S,
        stream: IO[str] | None = None,
    ) -> None:
        self.events = events
        self.stream = stream or sys.stderr
        terminal = _isatty(self.stream)
        wanted = terminal if tty is None else tty
        #: "bar" on a terminal, "lines" elsewhere when asked for, or "off".
        self.mode = "off" if not wanted else ("bar" if terminal else "lines")
        self.json_interval = json_interval
        self.line_interval = line_interval
        self._next_json = time.monotonic() + json_interval
        self._next_line = 0.0
        self._last_rate_t = time.monotonic()
        self._last_rate_bytes = 0
        self._rate = 0.0
        self._view = _PassView()
        self._bar: _Bar | None = None
        # The main loop redraws while the log thread prints records above the bar.
        self._lock = threading.Lock()
        if self.mode != "off":
            events.watchers.append(self._on_event)

    @property
    def tty(self) -> bool:
        """Whether a bar is drawn (on a terminal)."""
        return self.mode == "bar"

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
            self.mode == "bar" and now >= self._next_line
        )

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if self.events.enabled and now >= self._next_json:
            self._next_json = now + self.json_interval
            self.events.emit("progress", **snap.fields())
        if self.mode == "bar" and now >= self._next_line:
            self._next_line = now + self.line_interval
            self._draw(snap)

    def _draw(self, s: Snapshot) -> None:
        if not _foreground(self.stream):
            return
        try:
            with self._lock:
                bar = self._start_bar()
                bar.show(*self._view.fields(self.events.side, s))
        except OSError:
            self._give_up()

    def _start_bar(self) -> _Bar:
        if self._bar is None:
            self._bar = _Bar(self.stream)
            terminal.show_lines_above(self._above)
        return self._bar

    def _above(self, line: str) -> None:
        """Print a line that stays on screen: above the bar when there is one."""
        with self._lock:
            if self._bar is not None:
                self._bar.above(line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()

    def _on_event(self, event: str, fields: dict[str, Any]) -> None:
        """Pass and switchover events, as people read them."""
        if event == "pass":
            self._view.on_pass(fields)
            line = pass_line(self.events.side, fields)
        elif event == "switchover":
            line = switchover_line(self.events.side, fields)
        else:
            return
        if self.mode == "bar" and not _foreground(self.stream):
            return
        try:
            self._above(line)
        except OSError:
            self._give_up()

    def _give_up(self) -> None:
        """The terminal went away (hangup, closed pipe): migrate on without a display."""
        self.mode = "off"
        self.finish()

    def finish(self) -> None:
        """Take the bar down (the per-pass lines stay) and hand stderr back to logging."""
        if self._bar is not None:
            terminal.show_lines_above(None)
        with self._lock:
            bar, self._bar = self._bar, None
            if bar is not None:
                try:
                    bar.stop()
                except OSError:
                    pass
