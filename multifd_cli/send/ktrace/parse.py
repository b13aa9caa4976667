"""The text form of the instance's trace_pipe, turned into events.

Why the text pipe and not the binary trace_pipe_raw: the raw form is per-CPU
ring-buffer pages whose record layout (type_len, time extends, absolute
timestamps, commit flags, sub-buffer sizes) has changed across kernel versions,
and send would have to merge the CPUs by timestamp itself. trace_pipe does that
merge in the kernel, in timestamp order, prints a lost-events line where the
ring buffer overran, and consumes what it returns, so a pass reads only what
happened since the last one. Its volume is a line per dirtied folio, which is
what a pass costs anyway. The event's print format is checked on open, so a
kernel whose text we would misread is refused rather than trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from multifd_cli.send.ktrace.bio import Bio, parse_bio

FOLIO_EVENT = "writeback/writeback_dirty_folio"
FOLIO_FORMAT = '"bdi %s: ino=%lu index=%lu"'

# Operations that change a file without dirtying a page. Any of them on a
# source means "hash all of that file this pass". ext4's are the only ones
# tested here; the stat safety net stands in for the rest.
NOPAGE_EVENTS = (
    "ext4/ext4_punch_hole",
    "ext4/ext4_zero_range",
    "ext4/ext4_collapse_range",
    "ext4/ext4_insert_range",
    "ext4/ext4_fallocate_enter",
    "ext4/ext4_truncate_enter",
)

# Direct I/O through iomap (ext4 since 5.5): its data bypasses the page cache, so no
# folio event reports it. The events do not say whether it reads or writes (a plain
# pwrite has no IOCB_WRITE flag), so the tree tracker reads any file they name whole.
DIO_EVENTS = ("iomap/iomap_dio_rw_begin", "iomap/iomap_dio_complete")

# The comm may hold any byte, spaces and brackets included; anchoring on the
# end of the line makes the last "[cpu] flags ts: event:" the one that counts.
_LINE = re.compile(r"^.*-(\d+) +\[(\d+)\] \S+ +(\d+)\.(\d+): (\w+): (.*)$")
_FOLIO = re.compile(r"^bdi (\S*): ino=(\d+) index=(\d+)$")
_NOPAGE_INO = re.compile(r"\bino (\d+)\b")
_DIO_INO = re.compile(r"\bino 0x([0-9a-f]+)\b")
_LOST = re.compile(r"^CPU:(\d+) \[LOST (\d+) EVENTS\]$")
MARKER_EVENT = "tracing_mark_write"


@dataclass(frozen=True)
class Folio:
    ts_us: int
    ino: int
    index: int
    bdi: str


@dataclass(frozen=True)
class NoPage:
    """A size or block change that no folio event reports."""

    ts_us: int
    ino: int
    event: str


@dataclass(frozen=True)
class Marker:
    ts_us: int
    text: str


@dataclass(frozen=True)
class Lost:
    cpu: int
    count: int


@dataclass(frozen=True)
class Unknown:
    """A line we could not read. Treated as a loss: we cannot tell what it said."""

    line: str


Event = Union[Folio, NoPage, Marker, Lost, Unknown, Bio]


def parse_line(line: str) -> Event | None:
    """One trace_pipe line; None for blank lines and block events that write nothing."""
    if not line.strip():
        return None
    lost = _LOST.match(line.strip())
    if lost:
        return Lost(int(lost.group(1)), int(lost.group(2)))
    m = _LINE.match(line)
    if m is None:
        return Unknown(line)
    pid, frac = int(m.group(1)), m.group(4)
    # mono prints microseconds, counter-style clocks print more digits: normalise.
    ts_us = int(m.group(3)) * 1_000_000 + int((frac + "000000")[:6])
    name, body = m.group(5), m.group(6)
    if name == "writeback_dirty_folio":
        f = _FOLIO.match(body)
        if f is None:
            return Unknown(line)
        return Folio(ts_us, int(f.group(2)), int(f.group(3)), f.group(1))
    if name in ("block_bio_queue", "block_rq_complete"):
        try:
            return parse_bio(ts_us, pid, body, completion=name == "block_rq_complete")
        except ValueError:
            return Unknown(line)
    if name == MARKER_EVENT:
        return Marker(ts_us, body.strip())
    if any(name == e.split("/")[1] for e in NOPAGE_EVENTS):
        i = _NOPAGE_INO.search(body)
        if i is None:
            return Unknown(line)
        return NoPage(ts_us, int(i.group(1)), name)
    if any(name == e.split("/")[1] for e in DIO_EVENTS):
        i = _DIO_INO.search(body)
        if i is None:
            return Unknown(line)
        return NoPage(ts_us, int(i.group(1), 16), name)
    return Unknown(line)


class LineSplitter:
    """Bytes from a non-blocking read into whole lines; a partial tail waits."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[str]:
        data = self._tail + data
        *lines, self._tail = data.split(b"\n")
        return [ln.decode(errors="replace") for ln in lines]

    @property
    def pending(self) -> bool:
        return bool(self._tail)


def folio_extent(index: int, page_size: int, max_folio_pages: int) -> tuple[int, int]:
    """Byte range a folio starting at `index` can cover.

    Page-cache folios are naturally aligned, so a folio at index i spans at most
    the largest power of two dividing i (capped by the largest folio size);
    index 0 is divisible by everything and gets the cap.
    """
    span = max_folio_pages if index == 0 else min(index & -index, max_folio_pages)
    start = index * page_size
    return start, start + span * page_size


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def inode_filter(inodes: list[int], max_len: int = 3000) -> str:
    """An in-kernel filter matching at least these inodes.

    The filter file takes under a page, so long lists become ranges and, at
    worst, one min..max range; user space drops the extra inodes it lets in.
    """
    uniq = sorted(set(inodes))
    if not uniq:
        raise ValueError("no inodes to trace")
    exact = " || ".join(f"ino == {i}" for i in uniq)
    if len(exact) <= max_len:
        return exact
    runs: list[list[int]] = []
    for i in uniq:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    ranged = " || ".join(
        f"ino == {a}" if a == b else f"(ino >= {a} && ino <= {b})" for a, b in runs
    )
    if len(ranged) <= max_len:
        return ranged
    return f"ino >= {uniq[0]} && ino <= {uniq[-1]}"
