"""Which files of a tree a pass reads, and which bytes of them, from a kernel window.

The walk's delta (send/tree/diff.py) lists the files whose stat moved, the new
ones, the racily clean ones and the ones the last pass could not read. With a
trusted window the tracker vouches for every file on a traced filesystem:
those files are read where the window says they were written (plan_file), the
files with events but no stat change are added, and the rest are skipped.
Files elsewhere are read as the delta says, whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from multifd_cli.send.ktrace import parse
from multifd_cli.send.tree.diff import ScanItem
from multifd_cli.send.tree.scan import FILE

if TYPE_CHECKING:
    from multifd_cli.send.ktrace.treewatch import TreeWindow
    from multifd_cli.send.tree.diff import TreeDelta

Spans = list[tuple[int, int]]
Key = tuple[int, int]


@dataclass(frozen=True)
class FileState:
    """What two walks compare for one file."""

    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class FilePlan:
    """What a pass reads of one file: `ranges` (empty: nothing) or, if None, all of it."""

    ranges: Spans | None
    reason: str = ""  # why all of it

    @property
    def whole(self) -> bool:
        return self.ranges is None


def plan_file(
    old: FileState | None,
    new: FileState,
    folios: Collection[int],
    nopage: str | None,
    extent: Callable[[int], tuple[int, int]],
    safety_net: bool = True,
    later: bool = False,
) -> FilePlan:
    """What this pass must read of a file the tracker vouches for, window trusted.

    `old` is the last walk's stat (None: new to the walk), `new` this walk's,
    `folios` the folio indexes the window reported for its inode, `nopage` the
    name of an event that changed it without dirtying a page (fallocate, punch,
    truncate, direct I/O). `later`: the trace has events for it after this pass's
    marker (the next window's, drained once the walk was done).

    Why this is sound. Every way ext4 changes a file's data is one of: a folio
    going clean to dirty (write(2), splice, a store through a shared mapping:
    after the pass start's syncfs every folio is clean, so each such change
    after the marker emits an event); an iomap direct I/O (its events); a
    fallocate, punch, zero, collapse, insert or truncate (the no-page events);
    or an extending ftruncate, which adds zeros past the old end (the grown
    range, from the size). So a file with events is read where they point,
    plus the grown range; a shrunk file or one with a no-page event is read
    whole. The stat is the net for anything this list missed: a size or mtime
    that moved with no event at all is read whole (an O_DIRECT write on a
    kernel without the iomap events moves mtime, as every data write does).
    A change of ctime alone, with no event, is skipped: rename, chmod, chown,
    link and unlink move ctime and no byte of data, and every data write also
    moves mtime, which the rule above catches. Files new to the walk were
    never read, so they are read whole.

    The walk stats after the marker, so a write between the two moves the stat
    with its event in the next window: with `later` set, the stat's move is
    accounted for, and the next pass reads where that event points. Reading
    the file whole here instead would be sound too, but would cost a large
    file that is written now and then its whole size whenever a write falls
    between the marker and the walk's stat of it. Should that next window be
    lost, its pass falls back to the stat rule, which compares with this walk
    and so would not see such a write: plan_delta lists these files (and every
    file whose stat moved but that was not read whole) in PlanStats.owed, and a
    pass with a lost window reads them whole.
    """
    if old is None:
        return FilePlan(None, "new to the walk")
    if nopage:
        return FilePlan(None, f"{nopage} changed it without dirtying a page")
    if new.size < old.size:
        return FilePlan(None, f"it shrank ({old.size} -> {new.size} bytes)")
    grown: Spans = [(old.size, new.size)] if new.size > old.size else []
    if folios:
        return FilePlan(parse.merge_ranges([extent(i) for i in folios] + grown))
    if safety_net:
        moved = [n for n, a, b in (("size", old.size, new.size),
                                   ("mtime", old.mtime_ns, new.mtime_ns)) if a != b]
        if moved and not later:
            return FilePlan(None, f"{', '.join(moved)} changed but the tracker saw no write")
    return FilePlan(grown)


def clip(ranges: Iterable[tuple[int, int]], size: int) -> Spans:
    """Ranges cut at the file's end; empty ones dropped."""
    return [(s, min(e, size)) for s, e in ranges if s < size]


@dataclass
class PlanStats:
    """What the plan chose this pass, for the log and the pass event."""

    ranged: int = 0  # files read where the window points
    ranged_bytes: int = 0
    skipped: int = 0  # files in the delta the window says need no read
    whole: Counter[str] = field(default_factory=Counter)  # why a file was read whole
    # (dev, ino) of files whose size or mtime moved but that were not read whole: a write
    # between the marker and the walk's stat of them has its event in the next window
    # only, so if that window is lost, the stat rule alone would not read them again.
    owed: set[tuple[int, int]] = field(default_factory=set)

    def summary(self) -> str:
        if not self.whole:
            return ""
        top = ", ".join(f"{n} {why}" for why, n in self.whole.most_common(3))
        return f"{sum(self.whole.values())} tree files read whole ({top})"


def plan_delta(
    delta: TreeDelta,
    window: TreeWindow,
    devs: Collection[int],
    unread: Collection[Key],
    extent: Callable[[int], tuple[int, int]],
    stats: PlanStats,
    safety_net: bool = True,
    later: Collection[int] = (),
) -> Iterator[ScanItem]:
    """The delta's files to read, narrowed by a trusted `window` on filesystems `devs`.

    A file added for its events gets a TIMES op in the delta too, as the files the
    delta lists have, since recv's writes move its copy's mtime.

    `unread` are (dev, ino) of files the last pass could not read at their
    path: read whole, whatever the window says. `later` are inodes with events
    after the window's marker (see plan_file).
    """
    new, old = delta.new, delta.old
    scan = delta.found.scan
    touched = set(window.folios) | set(window.nopage)
    picked = list(scan)
    listed = {new.fid[c] for c in scan}
    if touched:
        # Written with no stat change (a mapping's stores, a racy write): not in the delta.
        kind, dev, ino, fid = new.kind, new.dev, new.ino, new.fid
        for c in range(len(new)):
            if ino[c] in touched and kind[c] == FILE and dev[c] in devs and fid[c] not in listed:
                listed.add(fid[c])
                picked.append(c)
                # recv writing its pages moves its mtime: the walk's goes after them.
                delta.found.times.append(c)
    want = {new.fid[c] for c in picked if new.dev[c] in devs}
    old_at: dict[int, int] = {}
    if old is not None and want:
        ofid, okind = old.fid, old.kind
        for o in range(len(old)):
            if okind[o] == FILE and ofid[o] in want:
                old_at[ofid[o]] = o
    for c in picked:
        item = ScanItem(new.fid[c], new.path(c), new.dev[c], new.ino[c], new.size[c])
        if item.dev not in devs:
            yield item
            continue
        o = old_at.get(item.fid, -1)
        before = None
        if old is not None and o >= 0 and (old.dev[o], old.ino[o]) == (item.dev, item.ino):
            before = FileState(old.size[o], old.mtime[o], old.ctime[o])
        if (item.dev, item.ino) in unread:
            plan = FilePlan(None, "the last pass could not read it")
        else:
            plan = plan_file(before, FileState(item.size, new.mtime[c], new.ctime[c]),
                             window.folios.get(item.ino, ()), window.nopage.get(item.ino),
                             extent, safety_net, item.ino in later)
        if plan.ranges is None:
            stats.whole[plan.reason] += 1
            yield item
            continue
        if before is not None and (before.size, before.mtime_ns) != (item.size, new.mtime[c]):
            stats.owed.add((item.dev, item.ino))
        ranges = clip(plan.ranges, item.size)
        if not ranges:
            stats.skipped += 1
            continue
        stats.ranged += 1
        stats.ranged_bytes += sum(e - s for s, e in ranges)
        yield item._replace(ranges=tuple(ranges))
