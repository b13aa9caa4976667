"""From two snapshots of a tree, the ordered delta that brings a replica from one to
the other, and the file ids whose content this pass must read.

Directories, symlinks, fifos and devices are matched by path. Regular files are
matched by path first and, where a path's inode changed or vanished, by (dev, ino):
an inode that left one path and appears at another is a move of its file id, so the
receiver keeps its page tables (PostgreSQL recycles WAL segments by rename). A new
inode at an old path (an atomic save) is a removal of the old id plus a new id.

An unchanged pass costs one comparison of stat fields per entry; the dicts that
resolve moves and links hold only the entries whose path changed, plus files with
more than one link.
"""

from __future__ import annotations

import stat
from collections.abc import Collection

from multifd_cli.common.treeops import EntryType, Op, ScanItem, TreeDelta, TreeOp
from multifd_cli.send.tree.scan import DIR, FILE, SYMLINK, Snapshot

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


def _join(path: bytes, name: bytes) -> bytes:
    return path + b"/" + name if path else name


class TreeTracker:
    """What send keeps between passes: the last snapshot and the next file id.

    One tracker per directory source; file ids are never reused within a migration,
    so a late message about a dropped id cannot be mistaken for a new file.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.next_fid = 0

    def advance(self, new: Snapshot, mapped: Collection[Key] = ()) -> TreeDelta:
        """The delta from the last snapshot to NEW, which becomes the last snapshot.

        mapped: (dev, ino) of files some process maps shared and writable (see
        procmaps.shared_writable_mapped); they are scanned even when their stat
        did not change, because writes through a mapping do not move mtime.
        """
        differ = _Differ(self.snapshot, new, self.next_fid, mapped)
        delta = differ.run()
        self.next_fid = differ.next_fid
        self.snapshot = new
        return delta


def diff_snapshots(
    old: Snapshot | None, new: Snapshot, next_fid: int = 0, mapped: Collection[Key] = ()
) -> tuple[TreeDelta, int]:
    """The delta from OLD (None: an empty replica) to NEW, and the next free file id.
    Assigns NEW's file ids as a side effect."""
    differ = _Differ(old, new, next_fid, mapped)
    return differ.run(), differ.next_fid


class _Differ:
    def __init__(
        self, old: Snapshot | None, new: Snapshot, next_fid: int, mapped: Collection[Key]
    ) -> None:
        self.old = old
        self.new = new
        self.next_fid = next_fid
        self.mapped = mapped
        self.left: dict[int, list[bytes]] = {}  # old fid -> paths it no longer has
        self.left_key: dict[Key, int] = {}
        self.left_idx: dict[int, int] = {}  # old fid -> an old index of it
        self.gone_other: list[bytes] = []
        self.gone_dirs: list[bytes] = []  # pre-order: ancestors before descendants
        self.added_dirs: list[tuple[bytes, int]] = []
        self.added_files: list[tuple[int, bytes]] = []
        self.added_other: list[tuple[int, bytes]] = []
        self.same: list[tuple[int, int, bytes]] = []  # linked files whose path kept its inode
        self.meta: list[TreeOp] = []
        self.times: list[TreeOp] = []
        self.scan: list[ScanItem] = []

    def run(self) -> TreeDelta:
        if self.old is None:
            for c in self.new.child_range(0):
                self._add(c, self.new.name(c))
        else:
            self._match(self.old)
        return self._resolve()

    def _match(self, old: Snapshot) -> None:
        new = self.new
        stack = [(0, 0, b"")]
        while stack:
            od, nd, path = stack.pop()
            orange, nrange = old.child_range(od), new.child_range(nd)
            onames = [old.name(i) for i in orange]
            nnames = [new.name(i) for i in nrange]
            if onames == nnames:
                pairs: list[tuple[int, int, bytes]] = list(zip(orange, nrange, nnames))
                unmatched: Collection[tuple[bytes, int]] = ()
            else:
                index = dict(zip(onames, orange))
                pairs = [(index.pop(nm, -1), c, nm) for c, nm in zip(nrange, nnames)]
                unmatched = index.items()
            for o, c, name in pairs:
                cpath = _join(path, name)
                if o >= 0 and self._same_entry(old, o, c, cpath):
                    if new.kind[c] == DIR:
                        stack.append((o, c, cpath))
                    continue
                if o >= 0:
                    self._remove(old, o, cpath)
                self._add(c, cpath)
            for name, o in unmatched:
                self._remove(old, o, _join(path, name))

    def _same_entry(self, old: Snapshot, o: int, c: int, path: bytes) -> bool:
        """True when the entry at PATH is still the same thing (metadata aside)."""
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
            if new.nlink[c] > 1 or old.nlink[o] > 1:
                self.same.append((o, c, path))  # resolved with moves and links
            else:
                self._file_changes(old, o, c, new.fid[c], path)
            return True
        if kind == SYMLINK:
            if old.target[o] != new.target[c]:
                return False
        elif old.rdev.get(o) != new.rdev.get(c):
            return False
        self._other_meta(old, o, c, path)
        return True

    def _remove(self, old: Snapshot, o: int, path: bytes) -> None:
        stack = [(o, path)]
        while stack:
            o, path = stack.pop()
            kind = old.kind[o]
            if kind == FILE:
                fid = old.fid[o]
                self.left.setdefault(fid, []).append(path)
                self.left_key[old.key(o)] = fid
                self.left_idx[fid] = o
            elif kind == DIR:
                self.gone_dirs.append(path)
                stack.extend((k, _join(path, old.name(k))) for k in old.child_range(o))
            else:
                self.gone_other.append(path)

    def _add(self, c: int, path: bytes) -> None:
        new = self.new
        stack = [(c, path)]
        while stack:
            c, path = stack.pop()
            kind = new.kind[c]
            if kind == FILE:
                self.added_files.append((c, path))
            elif kind == DIR:
                self.added_dirs.append((path, c))
                stack.extend((k, _join(path, new.name(k))) for k in new.child_range(c))
            else:
                self.added_other.append((c, path))

    def _other_meta(self, old: Snapshot, o: int, c: int, path: bytes) -> None:
        new = self.new
        if (old.mode[o], old.uid[o], old.gid[o]) != (new.mode[c], new.uid[c], new.gid[c]):
            self.meta.append(
                TreeOp(Op.META, path, mode=new.mode[c], uid=new.uid[c], gid=new.gid[c])
            )
        if old.mtime[o] != new.mtime[c]:
            self.times.append(TreeOp(Op.TIMES, path, mtime_ns=new.mtime[c]))

    def _file_changes(self, old: Snapshot, o: int, c: int, fid: int, path: bytes) -> None:
        """The stat shortcut: read a file only when size, mtime or ctime moved (the
        inode is equal by construction), or when a process maps it shared-writable."""
        new = self.new
        content = (
            old.ctime[o] >= old.started_ns - RACY_NS
            or old.size[o] != new.size[c]
            or old.mtime[o] != new.mtime[c]
            or old.ctime[o] != new.ctime[c]
            or (bool(self.mapped) and new.key(c) in self.mapped)
        )
        if content:
            self.scan.append(ScanItem(fid, path, new.dev[c], new.ino[c], new.size[c]))
        if (old.mode[o], old.uid[o], old.gid[o], old.size[o]) != (
            new.mode[c], new.uid[c], new.gid[c], new.size[c]
        ):
            self.meta.append(
                TreeOp(Op.META, path, fid, mode=new.mode[c], uid=new.uid[c], gid=new.gid[c],
                       size=new.size[c])
            )
        if content or old.mtime[o] != new.mtime[c]:
            self.times.append(TreeOp(Op.TIMES, path, fid, mtime_ns=new.mtime[c]))

    def _resolve(self) -> TreeDelta:
        old, new = self.old, self.new
        known = dict(self.left_key)
        linked: set[int] = set()  # fids with several paths, compared once
        for o, c, path in self.same:
            fid = new.fid[c]
            known[new.key(c)] = fid
            if fid in linked:
                continue
            linked.add(fid)
            assert old is not None
            self._file_changes(old, o, c, fid, path)
        moved_in: dict[int, list[bytes]] = {}
        created: dict[int, list[tuple[int, bytes]]] = {}
        for c, path in self.added_files:
            key = new.key(c)
            found = known.get(key)
            if found is None:
                fid = self.next_fid
                self.next_fid += 1
                known[key] = fid
                created[fid] = [(c, path)]
                new.fid[c] = fid
                continue
            fid = found
            if fid in created:
                created[fid].append((c, path))
            else:
                if fid not in moved_in and fid not in linked:
                    assert old is not None
                    self._file_changes(old, self.left_idx[fid], c, fid, path)
                moved_in.setdefault(fid, []).append(path)
            new.fid[c] = fid
        return self._ordered(moved_in, linked, created)

    def _ordered(
        self,
        moved_in: dict[int, list[bytes]],
        linked: set[int],
        created: dict[int, list[tuple[int, bytes]]],
    ) -> TreeDelta:
        new = self.new
        out: list[TreeOp] = []
        gone: list[TreeOp] = []
        dropped: list[int] = []
        for fid, paths in self.left.items():
            if fid in moved_in or fid in linked:
                out.extend(TreeOp(Op.UNLINK, p, fid) for p in paths)
            else:
                gone.extend(TreeOp(Op.UNLINK, p, fid) for p in paths)
                gone.append(TreeOp(Op.DROP, fid=fid))
                dropped.append(fid)
        gone.extend(TreeOp(Op.REMOVE, p) for p in self.gone_other)
        ops = out + gone
        ops.extend(TreeOp(Op.RMDIR, p) for p in reversed(self.gone_dirs))
        ops.extend(TreeOp(Op.MKDIR, p, mode=new.mode[c]) for p, c in self.added_dirs)
        for fid, paths in moved_in.items():
            ops.extend(TreeOp(Op.LINK, p, fid) for p in paths)
        for fid, entries in created.items():
            c, first = entries[0]
            ops.append(
                TreeOp(Op.CREATE, first, fid, mode=new.mode[c], uid=new.uid[c], gid=new.gid[c],
                       size=new.size[c])
            )
            ops.extend(TreeOp(Op.LINK, p, fid) for _, p in entries[1:])
            self.scan.append(ScanItem(fid, first, new.dev[c], new.ino[c], new.size[c]))
            self.times.append(TreeOp(Op.TIMES, first, fid, mtime_ns=new.mtime[c]))
        for c, path in self.added_other:
            ops.append(self._create_other(c, path))
            self.times.append(TreeOp(Op.TIMES, path, mtime_ns=new.mtime[c]))
        ops.extend(self.meta)
        return TreeDelta(ops=ops, scan=self.scan, times=self.times, dropped=dropped)

    def _create_other(self, c: int, path: bytes) -> TreeOp:
        new = self.new
        kind = new.kind[c]
        if kind == SYMLINK:
            return TreeOp(Op.SYMLINK, path, uid=new.uid[c], gid=new.gid[c], target=new.target[c])
        return TreeOp(
            Op.MKNOD, path, mode=_IFMT[kind] | new.mode[c], uid=new.uid[c], gid=new.gid[c],
            rdev=new.rdev.get(c, 0),
        )


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
