"""One migration as the report sees it: send's and recv's JSON events joined by pass.

The two sides' `ts` come from each process's own monotonic clock, so they are
never compared: a pass is the same pass on both sides because it has the same
number (the epoch), which is what the protocol guarantees.

Every input problem is a UsageError with the file and line, never a traceback:
the files are whatever a user saved, and may be truncated, mixed with stderr, or
from two different runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

from multifd_cli.errors import UsageError

Types = tuple[type, ...]
_NUM: Types = (int, float)
_INT: Types = (int,)
_NULLABLE_NUM: Types = (int, float, type(None))

#: Fields the report reads, per side, with the types docs/events.md gives them.
SEND_PASS: dict[str, Types] = {
    "pass": _INT, "dirty_bytes": _INT, "sent_bytes": _INT, "duration_ms": _NUM,
    "bandwidth_bytes_per_s": _INT, "dirty_rate_bytes_per_s": _INT, "remaining_bytes": _INT,
    "expected_downtime_ms": _NULLABLE_NUM, "throttle_pct": _INT, "final": (bool,),
}
RECV_PASS: dict[str, Types] = {
    "pass": _INT, "normal_pages": _INT, "zero_pages": _INT, "packets": _INT,
    "transferred_bytes": _INT, "duration_ms": _NUM,
}
SWITCHOVER: dict[str, Types] = {"pass": _INT, "expected_downtime_ms": _NULLABLE_NUM, "remaining_bytes": _INT}

Number = Union[int, float]


@dataclass
class Pass:
    """One epoch, as send saw it and (if its events were given) as recv applied it."""

    number: int
    dirty_bytes: int
    sent_bytes: int
    duration_ms: float
    bandwidth_bytes_per_s: int
    dirty_rate_bytes_per_s: int
    remaining_bytes: int
    expected_downtime_ms: float | None
    throttle_pct: int
    final: bool
    recv_duration_ms: float | None = None
    recv_bytes: int | None = None  # this pass's share of recv's cumulative count


@dataclass
class Run:
    """Everything one report draws."""

    passes: list[Pass]
    switchover_pass: int | None = None
    switchover_expected_ms: float | None = None
    send_end: dict[str, Any] = field(default_factory=dict)  # completed or failed, if any
    recv_end: dict[str, Any] = field(default_factory=dict)
    has_recv: bool = False

    @property
    def downtime_ms(self) -> float | None:
        """The real downtime, as send measured it; None when there was no pause."""
        value = self.send_end.get("downtime_ms")
        paused = self.send_end.get("paused", self.switchover_pass is not None)
        return float(value) if isinstance(value, (int, float)) and paused else None

    def series(self) -> dict[str, list[Number | None]]:
        """Per pass, in pass order: the values the report plots, by name."""
        p = self.passes
        return {
            "pass": [x.number for x in p],
            "dirty_bytes": [x.dirty_bytes for x in p],
            "sent_bytes": [x.sent_bytes for x in p],
            "recv_bytes": [x.recv_bytes for x in p],
            "bandwidth_bytes_per_s": [x.bandwidth_bytes_per_s for x in p],
            "dirty_rate_bytes_per_s": [x.dirty_rate_bytes_per_s for x in p],
            "expected_downtime_ms": [x.expected_downtime_ms for x in p],
            "duration_ms": [x.duration_ms for x in p],
            "recv_duration_ms": [x.recv_duration_ms for x in p],
            "throttle_pct": [x.throttle_pct for x in p],
        }


def read_events(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The JSON event lines of one file, with their line numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            raise UsageError(f"{path}:{n}: not a JSON event (expected the output of "
                             f"multifd send/recv --json): {line[:60]!r}") from None
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str) \
                or ev.get("side") not in ("send", "recv"):
            raise UsageError(f"{path}:{n}: not a multifd event (no 'event' and 'side')")
        events.append((n, ev))
    return events


def _checked(path: str, n: int, ev: dict[str, Any], spec: dict[str, Types]) -> None:
    for name, types in spec.items():
        value = ev.get(name)
        # bool is an int in Python; only the fields meant to be booleans accept it.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UsageError(f"{path}:{n}: {ev['side']} {ev['event']} event: field {name!r} "
                             f"is {value!r}, expected {_describe(types)}")


def _describe(types: Types) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def load_run(send_path: str, recv_path: str | None = None) -> Run:
    """Read send's events (and recv's) and join them by pass number."""
    by_side: dict[str, list[tuple[str, int, dict[str, Any]]]] = {"send": [], "recv": []}
    for path in (send_path, recv_path):
        if path is None:
            continue
        for n, ev in read_events(path):
            by_side[ev["side"]].append((path, n, ev))
    if not any(ev["event"] == "pass" for _, _, ev in by_side["send"]):
        raise UsageError(f"{send_path}: no pass event from send: expected the output of "
                         "`multifd send --json`")
    if recv_path is not None and not by_side["recv"]:
        raise UsageError(f"{recv_path}: no event from recv: expected the output of "
                         "`multifd recv --json`")
    run = Run(passes=[])
    for path, n, ev in by_side["send"]:
        if ev["event"] == "pass":
            _checked(path, n, ev, SEND_PASS)
            expected = len(run.passes) + 1
            if ev["pass"] != expected:
                raise UsageError(f"{path}:{n}: pass {ev['pass']}, expected pass {expected}: "
                                 "are two runs mixed in one file?")
            run.passes.append(Pass(
                ev["pass"], ev["dirty_bytes"], ev["sent_bytes"], ev["duration_ms"],
                ev["bandwidth_bytes_per_s"], ev["dirty_rate_bytes_per_s"], ev["remaining_bytes"],
                ev["expected_downtime_ms"], ev["throttle_pct"], ev["final"],
            ))
        elif ev["event"] == "switchover":
            _checked(path, n, ev, SWITCHOVER)
            run.switchover_pass = ev["pass"]
            run.switchover_expected_ms = ev["expected_downtime_ms"]
        elif ev["event"] in ("completed", "failed"):
            run.send_end = ev
    _join_recv(run, by_side["recv"])
    _check_same_run(run, send_path, recv_path)
    return run


def _join_recv(run: Run, events: list[tuple[str, int, dict[str, Any]]]) -> None:
    """recv's passes, matched to send's by number; its byte count is cumulative."""
    by_number = {p.number: p for p in run.passes}
    before = 0
    for path, n, ev in events:
        run.has_recv = True
        if ev["event"] == "pass":
            _checked(path, n, ev, RECV_PASS)
            p = by_number.get(ev["pass"])
            if p is None:
                raise UsageError(f"{path}:{n}: recv's pass {ev['pass']} is not among send's "
                                 f"passes 1-{len(run.passes)}: are these events of one run?")
            p.recv_duration_ms = ev["duration_ms"]
            p.recv_bytes = ev["transferred_bytes"] - before
            before = ev["transferred_bytes"]
        elif ev["event"] in ("completed", "failed"):
            run.recv_end = ev


def _check_same_run(run: Run, send_path: str, recv_path: str | None) -> None:
    a, b = run.send_end.get("digest"), run.recv_end.get("digest")
    if a and b and a != b:
        raise UsageError(f"{send_path} and {recv_path or send_path} are two different runs "
                         f"(digest {a} vs {b})")
