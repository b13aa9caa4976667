"""The safety net: when a source's stat says more changed than the tracker saw.

The folio tracepoint sees page-cache writes only. A punch-hole, zero-range,
truncate, reflink or O_DIRECT write changes the file without dirtying a page.
Each of them moves mtime or ctime, and most move size or st_blocks, so
comparing stat across a pass catches what the events cannot. A superset is
fine: the answer here is only ever "hash this file again".

The stat taken at a pass start must come before that pass's marker: a change
between the stat and the marker then shows up in the next comparison, while a
stat after the marker would hide a change made between the two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceStat:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    blocks: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceStat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks)

    @classmethod
    def of_path(cls, path: str) -> SourceStat:
        return cls.of(os.stat(path))


def rescan_reason(before: SourceStat, after: SourceStat, saw_events: bool) -> str | None:
    """Why this pass must hash the whole file instead of trusting the events; None if it need not.

    `saw_events` is whether the tracker reported any folio of this file in the
    window between the two stats.
    """
    if (before.dev, before.ino) != (after.dev, after.ino):
        return "the file was replaced (device or inode changed)"
    if after.size < before.size:
        return f"the file shrank ({before.size} -> {after.size} bytes): truncate dirties no page"
    if after.blocks < before.blocks:
        return (
            f"st_blocks fell ({before.blocks} -> {after.blocks}): a punched hole or truncate "
            "dirties no page"
        )
    changed = [
        name
        for name, a, b in (
            ("size", before.size, after.size),
            ("mtime", before.mtime_ns, after.mtime_ns),
            ("ctime", before.ctime_ns, after.ctime_ns),
            ("st_blocks", before.blocks, after.blocks),
        )
        if a != b
    ]
    if changed and not saw_events:
        return (
            f"{', '.join(changed)} changed but the tracker saw no write "
            "(O_DIRECT, fallocate, reflink or a lost event)"
        )
    return None


def grown_range(before: SourceStat, after: SourceStat) -> tuple[int, int] | None:
    """Bytes past the old end: an extending ftruncate fills them without an event."""
    if after.size > before.size:
        return before.size, after.size
    return None
