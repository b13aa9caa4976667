"""From two snapshots of a tree, the ordered delta that brings a replica from one to
the other, and the files whose content this pass must read.

Directories, symlinks, fifos and devices are matched by path. Regular files are
matched by path first and, where a path's inode changed or vanished, by (dev, ino):
an inode that left one path and appears at another is a move of its file id, so the
receiver keeps its page tables (PostgreSQL recycles WAL segments by rename). A new
inode at an old path (an atomic save) is a removal of the old id plus a new id.

Memory: what the diff finds is kept as arrays of snapshot indices (4 bytes each), and
TreeOps with their paths are built only as the delta is consumed, so the first pass
over a million files does not hold a million TreeOps. The dicts that resolve moves
and links hold only the files whose path changed, plus files with several links.
"""

from __future__ import annotations

import stat
from array import array
from collections.abc import Collection, Iterator
from typing import NamedTuple

from multifd_cli.send.tree.scan import DIR, FILE, SYMLINK, Snapshot
from multifd_cli.send.tree.xattrs import XattrPass, XattrReader
from multifd_cli.wire.treeops import EntryType, Op, TreeOp

Key = tuple[int, int]

#: A file whose ctime is this close to (or after) the start of the walk that saw it may
#: be written again within the same timestamp tick (filesystems stamp with a coarse
#: clock, a jiffy of up to 10 ms), leaving size, mtime and ctime as they were. Such a
#: "racily clean" file is read again on the next pass, as git does for its index.
RACY_NS = 20_000_000

_IFMT = {
    int(EntryType.FIFO): stat.S_IFIFO,
    int(EntryType.CHR): stat.S_IFCHR,
    int(EntryType.BLK): stat.S_IFBLK,
}


class ScanItem(NamedTuple):
    """A file whose content this pass must read. dev and ino let the reader check that
    the path still holds that inode when it opens it (see open_scanned)."""

    fid: int
    path: bytes
    dev: int
    ino: int
    size: int
    ranges: tuple[tuple[int, int], ...] | None = None  # byte ranges to read; None: all


class _Found:
    """Snapshot indices the diff collected, by what they become."""

    def __init__(self) -> None:
        self.left = array("i")  # old: paths of regular files that went away
        self.gone_other = array("i")  # old: symlinks, fifos, devices that went away
        self.gone_dirs = array("i")  # old, pre-order: ancestors first
        self.new_dirs = array("i")  # new, pre-order
        self.new_other = array("i")  # new: symlinks, fifos, devices
        self.moved_in = array("i")  # new: new paths of files that existed before
        self.created = array("i")  # new: first path of each new file
        self.extra_links = array("i")  # new: further paths of new files
        self.meta = array("i")  # new: mode or owner (files: or size) changed
        self.times = array("i")  # new: mtime to set after the epoch's pages
        self.scan = array("i")  # new: files to read
        self.staying: set[int] = set()  # fids that left a path but still exist
        self.xattrs: XattrPass | None = None  # --preserve: the entries whose xattrs to read


class TreeDelta:
    """What one pass changed, built lazily from the two snapshots; every method
    returns a fresh iterator, so the delta can be read more than once.

    ops(): phase-ordered TreeOps (wire.treeops.PHASES), applied at the start of the
    epoch, before its pages. times(): XATTRS then TIMES ops, applied after the
    epoch's pages, because writing a page moves the receiver's mtime (and drops a
    file's security.capability). scan(): the files to read.
    dropped: file ids that no longer exist; their page tables can go.
    """

    def __init__(self, old: Snapshot | None, new: Snapshot, found: _Found) -> None:
        self.old = old
        self.new = new
        self.found = found
        gone: set[int] = set()
        if old is not None:
            gone = {old.fid[o] for o in found.left} - found.staying
        self.dropped = sorted(gone)

    def empty(self) -> bool:
        f = self.found
        return not (f.left or f.gone_other or f.gone_dirs or f.new_dirs or f.new_other
                    or f.moved_in or f.created or f.meta or f.times or f.scan)

    def summary(self) -> dict[str, int]:
        """Counts for the progress log."""
        f = self.found
        return {"moved": len(f.moved_in), "created": len(f.created), "dropped": len(self.dropped),
                "dirs_added": len(f.new_dirs), "dirs_removed": len(f.gone_dirs),
                "scan": len(f.scan)}

    def ops(self) -> Iterator[TreeOp]:
        old, new, f = self.old, self.new, self.found
        if old is not None:
            lefts = [(o, old.fid[o]) for o in f.left]
            for o, fid in lefts:
                if fid in f.staying:
                    yield TreeOp(Op.UNLINK, old.path(o), fid)
            for o, fid in lefts:
                if fid not in f.staying:
                    yield TreeOp(Op.UNLINK, old.path(o), fid)
            for fid in self.dropped:
                yield TreeOp(Op.DROP, fid=fid)
            for o in f.gone_other:
                yield TreeOp(Op.REMOVE, old.path(o))
            for o in reversed(f.gone_dirs):
                yield TreeOp(Op.RMDIR, old.path(o))
        for c in f.new_dirs:
            yield TreeOp(Op.MKDIR, new.path(c), mode=new.mode[c])
        for c in f.moved_in:
            yield TreeOp(Op.LINK, new.path(c), new.fid[c])
        for c in f.created:
            yield TreeOp(Op.CREATE, new.path(c), new.fid[c], mode=new.mode[c], uid=new.uid[c],
                         gid=new.gid[c], size=new.size[c])
        for c in f.extra_links:
            yield TreeOp(Op.LINK, new.path(c), new.fid[c])
        for c in f.new_other:
            yield _create_other(new, c)
        for c in f.meta:
            file = new.kind[c] == FILE
            yield TreeOp(Op.META, new.path(c), new.fid[c] if file else -1, mode=new.mode[c],
                         uid=new.uid[c], gid=new.gid[c], size=new.size[c] if file else -1)

    def times(self) -> Iterator[TreeOp]:
        new = self.new
        if self.found.xattrs is not None:
            yield from self.found.xattrs.ops()
        for c in self.found.times:
            fid = new.fid[c] if new.kind[c] == FILE else -1
            yield TreeOp(Op.TIMES, new.path(c), fid, mtime_ns=new.mtime[c])

    def scan(self) -> Iterator[ScanItem]:
        new = self.new
        for c in self.found.scan:
            yield ScanItem(new.fid[c], new.path(c), new.dev[c], new.ino[c], new.size[c])


def _create_other(new: Snapshot, c: int) -> TreeOp:
    kind = new.kind[c]
    if kind == SYMLINK:
        return TreeOp(Op.SYMLINK, new.path(c), uid=new.uid[c], gid=new.gid[c],
                      target=new.target[c])
    return TreeOp(Op.MKNOD, new.path(c), mode=_IFMT[kind] | new.mode[c], uid=new.uid[c],
                  gid=new.gid[c], rdev=new.rdev.get(c, 0))


class TreeTracker:
    """What send keeps between passes: the last snapshot and the next file id.

    One tracker per directory source; file ids are never reused within a migration,
    so a late message about a dropped id cannot be mistaken for a new file.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.next_fid = 0
        self.xattrs: XattrReader | None = None  # --preserve: see carry_xattrs()
        self.xattr_digests: array[int] | None = None  # per entry of `snapshot`

    def carry_xattrs(self, root: bytes, privileged: bool) -> None:
        """From the next pass on, deltas carry xattrs (send/tree/xattrs.py); PRIVILEGED:
        recv runs as root, so trusted.* and security.* travel too."""
        self.xattrs = XattrReader(root, privileged)

    def advance(self, new: Snapshot, mapped: Collection[Key] = ()) -> TreeDelta:
        """The delta from the last snapshot to NEW, which becomes the last snapshot.

        mapped: (dev, ino) of files some process maps shared and writable (see
        procmaps.shared_writable_mapped); they are read even when their stat did not
        change, because writes through a mapping do not move mtime.
        """
        xattrs = None
        if self.xattrs is not None:
            xattrs = XattrPass(self.xattrs, new, self.xattr_digests)
        delta, self.next_fid = diff_snapshots(self.snapshot, new, self.next_fid, mapped, xattrs)
        self.snapshot = new
        self.xattr_digests = xattrs.digests if xattrs is not None else None
        return delta


def diff_snapshots(
    old: Snapshot | None, new: Snapshot, next_fid: int = 0, mapped: Collection[Key] = (),
    xattrs: XattrPass | None = None,
) -> tuple[TreeDelta, int]:
    """The delta from OLD (None: an empty replica) to NEW, and the next free file id.
    Assigns NEW's file ids as a side effect. XATTRS (--preserve) is told, for every
    entry of NEW, what it was in OLD, and yields the delta's XATTRS ops."""
    differ = _Differ(old, new, next_fid, mapped)
    differ.found.xattrs = xattrs
    if old is None:
        if xattrs is not None:
            xattrs.entry(0)
        for c in new.child_range(0):
            differ.add(c)
    else:
        differ.xattrs_of(old, 0, 0)
        differ.match(old)
    differ.resolve()
    return TreeDelta(old, new, differ.found), differ.next_fid


class _Differ:
    def __init__(
        self, old: Snapshot | None, new: Snapshot, next_fid: int, mapped: Collection[Key]
    ) -> None:
        self.old = old
        self.new = new
        self.next_fid = next_fid
        self.mapped = mapped
        self.found = _Found()
        self.added_files = array("i")  # new, resolved to moves, links or new ids later
        self.left_key: dict[Key, int] = {}
        self.left_at: dict[int, int] = {}  # old fid -> an old index of it
        self.same: list[tuple[int, int]] = []  # linked files whose path kept its inode
        # Every file id a path kept, whatever its link count said: a walk that races
        # with link() or unlink() can see one inode with different link counts at its
        # paths, so nlink alone cannot say whether a file that lost a path still has one.
        self.kept = array("i")

    def match(self, old: Snapshot) -> None:
        """Pair old and new entries by path, directory by directory from the root."""
        new = self.new
        stack = [(0, 0)]
        while stack:
            od, nd = stack.pop()
            orange, nrange = old.child_range(od), new.child_range(nd)
            onames = [old.name(i) for i in orange]
            nnames = [new.name(i) for i in nrange]
            if onames == nnames:  # the common case: the same names in the same order
                pairs: Collection[tuple[int, int]] = list(zip(orange, nrange))
                unmatched: Collection[int] = ()
            else:
                index = dict(zip(onames, orange))
                pairs = [(index.pop(nm, -1), c) for c, nm in zip(nrange, nnames)]
                unmatched = index.values()
            for o, c in pairs:
                if o >= 0 and self._same_entry(old, o, c):
                    self.xattrs_of(old, o, c)
                    if new.kind[c] == DIR:
                        stack.append((o, c))
                    continue
                if o >= 0:
                    self._remove(old, o)
                self.add(c)
            for o in unmatched:
                self._remove(old, o)

    def xattrs_of(self, old: Snapshot, o: int, c: int) -> None:
        """Tell the pass's XattrPass that new entry C was old entry O."""
        xp = self.found.xattrs
        if xp is not None:
            xp.entry(c, o, old.ctime[o] != self.new.ctime[c],
                     old.ctime[o] >= old.started_ns - RACY_NS)

    def _same_entry(self, old: Snapshot, o: int, c: int) -> bool:
        """True when the entry at a path is still the same thing (metadata aside)."""
        new = self.new
        kind = new.kind[c]
        if old.kind[o] != kind:
            return False
        if kind == DIR:
            return True
        if kind == FILE:
            if old.ino[o] != new.ino[c] or old.dev[o] != new.dev[c]:
                return False
            new.fid[c] = old.fid[o]
            self.kept.append(old.fid[o])
            if new.nlink[c] > 1 or old.nlink[o] > 1:
                self.same.append((o, c))  # resolved with moves and links
            else:
                self._file_changes(old, o, c)
            return True
        if kind == SYMLINK:
            if old.target[o] != new.target[c]:
                return False
        elif old.rdev.get(o) != new.rdev.get(c):
            return False
        if (old.mode[o], old.uid[o], old.gid[o]) != (new.mode[c], new.uid[c], new.gid[c]):
            self.found.meta.append(c)
        if old.mtime[o] != new.mtime[c]:
            self.found.times.append(c)
        return True

    def _remove(self, old: Snapshot, o: int) -> None:
        found = self.found
        stack = [o]
        while stack:
            o = stack.pop()
            kind = old.kind[o]
            if kind == FILE:
                fid = old.fid[o]
                found.left.append(o)
                self.left_key[old.key(o)] = fid
                self.left_at[fid] = o
            elif kind == DIR:
                found.gone_dirs.append(o)
                stack.extend(reversed(old.child_range(o)))
            else:
                found.gone_other.append(o)

    def add(self, c: int) -> None:
        new, found = self.new, self.found
        stack = [c]
        while stack:
            c = stack.pop()
            kind = new.kind[c]
            if kind == FILE:
                self.added_files.append(c)  # XattrPass.entry() once resolved
                continue
            if found.xattrs is not None:
                found.xattrs.entry(c)
            if kind == DIR:
                found.new_dirs.append(c)
                stack.extend(reversed(new.child_range(c)))
            else:
                found.new_other.append(c)
                found.times.append(c)

    def _file_changes(self, old: Snapshot, o: int, c: int) -> None:
        """The stat shortcut: read a file only when size, mtime or ctime moved (the
        inode is equal by construction), when it was racily clean, or when a process
        maps it shared-writable."""
        new, found = self.new, self.found
        content = (
            old.ctime[o] >= old.started_ns - RACY_NS
            or old.size[o] != new.size[c]
            or old.mtime[o] != new.mtime[c]
            or old.ctime[o] != new.ctime[c]
            or (bool(self.mapped) and new.key(c) in self.mapped)
        )
        if content:
            found.scan.append(c)
        if (old.mode[o], old.uid[o], old.gid[o], old.size[o]) != (
            new.mode[c], new.uid[c], new.gid[c], new.size[c]
        ):
            found.meta.append(c)
        if content or old.mtime[o] != new.mtime[c]:
            found.times.append(c)

    def resolve(self) -> None:
        """Turn the paths files gained into moves, links and new file ids."""
        old, new, found = self.old, self.new, self.found
        known = dict(self.left_key)
        linked: set[int] = set()  # fids with several paths, compared once
        merged: set[int] = set()  # fids found to be another fid's inode
        relinked: set[int] = set()  # the fids they were found to be
        for o, c in self.same:
            assert old is not None
            fid = new.fid[c]
            first = known.setdefault(new.key(c), fid)
            if first != fid:
                # One inode under two file ids: a walk that raced with link() saw
                # the link count at one path before the link existed. Now that the
                # walk agrees, this path moves to the first id and this id goes.
                found.left.append(o)
                new.fid[c] = first
                found.moved_in.append(c)
                merged.add(fid)
                relinked.add(first)
                self._file_changes(old, o, c)
                continue
            if fid not in linked:
                linked.add(fid)
                self._file_changes(old, o, c)
        moved: set[int] = set()
        fresh: set[int] = set()  # new fids with more than one link
        # Fresh paths with several links first, so that a path of the same inode seen
        # with one link (before the link existed) finds their id.
        # (Two filtering passes, not sorted(): that would hold a Python int per file.)
        nlink, added = new.nlink, self.added_files
        self.added_files = array("i", (c for c in added if nlink[c] > 1))
        self.added_files.extend(c for c in added if nlink[c] <= 1)
        del added
        xp = found.xattrs
        for c in self.added_files:
            key = new.key(c)
            found_fid = known.get(key)
            if xp is not None:  # a moved file was its old entry; any other is new
                was = self.left_at.get(found_fid, -1) if found_fid is not None else -1
                if was >= 0 and found_fid not in fresh:
                    assert old is not None
                    self.xattrs_of(old, was, c)
                else:
                    xp.entry(c)
            if found_fid is None:
                fid = self.next_fid
                self.next_fid += 1
                new.fid[c] = fid
                if new.nlink[c] > 1:  # a single-link file can't be met again
                    known[key] = fid
                    fresh.add(fid)
                found.created.append(c)
                found.scan.append(c)
                found.times.append(c)
                continue
            fid = found_fid
            new.fid[c] = fid
            if fid in fresh:
                found.extra_links.append(c)
                continue
            if fid not in moved and fid not in linked:
                assert old is not None
                self._file_changes(old, self.left_at[fid], c)
            moved.add(fid)
            found.moved_in.append(c)
        staying = (moved | linked | relinked) - merged
        lost = {old.fid[o] for o in found.left} - staying if old is not None else set()
        if lost:  # a file that lost a path may keep another one that nlink did not show
            staying |= lost.intersection(self.kept) - merged
        found.staying = staying


def dir_finish(snap: Snapshot) -> list[TreeOp]:
    """DIRMETA for every directory of the final snapshot, deepest first, the root last.

    Applied once, at completion: every entry created in a directory moves its mtime,
    and a directory without write permission would refuse the next pass's entries,
    so directories stay owner-writable until the end.
    """
    ops = []
    for i in range(len(snap) - 1, -1, -1):  # children have larger indices than parents
        if snap.kind[i] == DIR:
            ops.append(
                TreeOp(Op.DIRMETA, snap.path(i), mode=snap.mode[i], uid=snap.uid[i],
                       gid=snap.gid[i], mtime_ns=snap.mtime[i])
            )
    return ops
