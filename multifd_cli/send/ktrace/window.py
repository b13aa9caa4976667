"""A trace read in windows that markers close: the part every kernel tracker shares.

A pass start writes a marker, makes every watched folio clean (the subclass's
writeback), then drains the trace until the marker comes back. Events before
the marker belong to the window being closed; events after it are carried into
the next one. tracker.py explains why this order is the sound one; the file
tracker (tracker.py) and the tree tracker (treewatch.py) differ only in what
they watch, how they write back and what an event means to them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from multifd_cli.send.ktrace import bio, parse
from multifd_cli.send.ktrace.session import TraceSession

RESYNC_ATTEMPTS = 3
_instances_made = 0


def instance_tag(tag: str | None) -> str:
    """A tracefs instance name unique in this process: the pid, then a counter after the first."""
    global _instances_made
    if tag is None:
        _instances_made += 1
        tag = None if _instances_made == 1 else str(_instances_made)
    from multifd_cli.send.ktrace.tracefs import INSTANCE_PREFIX

    return f"{INSTANCE_PREFIX}{os.getpid()}" + (f"-{tag}" if tag else "")


@dataclass
class Window:
    """What the trace said about the watched files since one marker."""

    folios: dict[int, set[int]] = field(default_factory=dict)  # ino -> folio indexes
    nopage: dict[int, str] = field(default_factory=dict)  # ino -> event name
    lost: list[str] = field(default_factory=list)  # why events may be missing
    bios: list[bio.Bio] = field(default_factory=list)  # writes that bypassed the page cache
    own: list[bio.Bio] = field(default_factory=list)  # our writeback's bios: narrow the folios
    events: int = 0

    def absorb(self, other: Window) -> None:
        for ino, idx in other.folios.items():
            self.folios.setdefault(ino, set()).update(idx)
        self.bios.extend(other.bios)
        self.own.extend(other.own)
        self.nopage.update(other.nopage)
        self.lost.extend(other.lost)
        self.events += other.events


class MarkedTrace:
    """The marker, the drain and the re-marking after a loss; subclasses say what events mean.

    `order="unsound"` (writeback before the marker) and `edge_hook` exist only
    for tests: the hook runs between the two steps of a pass start ("between")
    and before the drain ("before drain").
    """

    def __init__(self, order: str, edge_hook: Callable[[str], None] | None) -> None:
        if order not in ("sound", "unsound"):
            raise ValueError(f"order {order!r}: sound or unsound")
        self.order = order
        self._edge_hook = edge_hook
        self._window = Window()
        self._next = Window()
        self._seq = 0
        self._target: str | None = None  # the marker text this pass start waits for
        self._past = False  # the target marker has come back: events belong to _next
        self._tail_lost = False
        self._trace: TraceSession

    @property
    def instance_name(self) -> str:
        return self._trace.name

    @property
    def method(self) -> str:
        """How tracefs was reached: mounted:<path>, detached or namespace."""
        return self._trace.method

    @property
    def swept(self) -> list[str]:
        """Stale instances of killed senders that this one removed at start."""
        return self._trace.swept

    def _close_window(self, writeback: Callable[[], None]) -> Window:
        """Marker, writeback, drain; re-marked while the tail after the marker is lost.

        Returns the closed window; the events after its marker stay in
        self._window, the carried start of the next one.
        """
        for _attempt in range(RESYNC_ATTEMPTS):
            self._seq += 1
            # The next marker's window starts empty; a retry folds the old tail in.
            self._window.absorb(self._next)
            self._next = Window()
            self._tail_lost = False
            if self.order == "unsound":
                writeback()
                self._edge("between")
                self._mark()
            else:
                self._mark()
                self._edge("between")
                writeback()
            self._edge("before drain")
            self._drain(wait_marker=True)
            if not self._tail_lost:
                break
        window, self._window, self._next = self._window, self._next, Window()
        self._target = None  # until the next pass start, events belong to the carried window
        if self._tail_lost:
            # Even the last marker's tail is incomplete: the next pass is blind too.
            self._window.lost.append("the trace kept overrunning while re-marking")
        return window

    def poll(self) -> None:
        """Drain mid-pass so a long pass does not overrun the buffer."""
        self._drain(wait_marker=False)

    def _edge(self, stage: str) -> None:
        if self._edge_hook is not None:
            self._edge_hook(stage)

    def _mark(self) -> None:
        self._target = f"multifd {os.getpid()} {self._seq}"
        self._past = False
        self._trace.mark(self._target)

    def _drain(self, wait_marker: bool) -> None:
        """Read the pipe dry, sorting events either side of the current marker.

        With `wait_marker`, keep reading until the marker has come back. A loss
        seen after the marker, or any overrun, sets _tail_lost: the window the
        marker opens may be missing events too.
        """
        for tries in range(200):
            got = self._trace.read_lines()
            for line in got:
                ev = parse.parse_line(line)
                if ev is None:
                    continue
                if isinstance(ev, parse.Marker):
                    if self._target is not None and ev.text == self._target:
                        self._past = True
                    continue
                win = self._next if self._past and self._target is not None else self._window
                if self._ingest(win, ev) and self._past:
                    self._tail_lost = True
            done = self._past or not wait_marker or self._target is None
            if done and not got and not self._trace.split.pending:
                break
            if not got:
                if self._trace.read_overruns() != self._trace.overruns:
                    break  # the marker was overwritten: waiting cannot bring it back
                time.sleep(0.001 * min(tries + 1, 10))
        over = self._trace.read_overruns()
        if wait_marker and self._target is not None and not self._past:
            self._window.lost.append("the pass marker never came back from the trace")
            self._tail_lost = True
        if over != self._trace.overruns:
            # The counters cannot say where the loss fell, so assume after the marker too.
            self._window.lost.append(
                f"the trace buffer overran ({over - self._trace.overruns} events)"
            )
            self._tail_lost = True
        self._trace.overruns = over

    def _ingest(self, win: Window, ev: parse.Event) -> bool:
        """Add one event to a window; True if it says events were lost."""
        if isinstance(ev, parse.Lost):
            win.lost.append(f"the trace lost {ev.count} events on CPU {ev.cpu}")
            return True
        if isinstance(ev, parse.Unknown):
            win.lost.append(f"unreadable trace line: {ev.line[:80]!r}")
            return True
        return False
