"""One snapshot of a source directory tree per pass, in a compact form.

A tree may hold a million files, and the issue allows about 200 bytes per file on
each side besides page tables. A Python object per entry (an os.stat_result is ~200
bytes alone) would spend that budget before a path is stored, so a Snapshot keeps
parallel typed arrays, one slot per entry, and names packed into one bytearray.
A path is never stored whole: each entry has its parent's index and its own name.

The walk lstat()s every entry and never follows a symlink. The children of one
directory are appended together, so they are one contiguous index range, and a
parent always has a smaller index than its children.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence

from multifd_cli.common.manifest import DEFAULT_OPTIONS, ManifestBuilder, ManifestOptions
from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.wire.treeops import EntryType

FILE = int(EntryType.FILE)
DIR = int(EntryType.DIR)
SYMLINK = int(EntryType.SYMLINK)
_KINDS = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: int(EntryType.FIFO),
    stat.S_IFCHR: int(EntryType.CHR),
    stat.S_IFBLK: int(EntryType.BLK),
}


#: The next wider array type of an unsigned column whose value did not fit.
_WIDER = {"B": "H", "H": "I", "I": "Q"}
#: Snapshot's columns that start narrow and widen (in the order add() fills them).
NARROW = ("uid", "gid", "size", "dev", "ino", "nlink", "name_end")


class Snapshot:
    """The state of a tree at one walk. Index 0 is the root, whose path is b"".

    Send holds two snapshots at once while it diffs a pass, so every column is as
    narrow as its common values allow. The unsigned columns in NARROW start narrow
    and widen, the whole column at once, the first time a value does not fit: a uid
    over 65,535 makes uid 4 bytes, a file of 4 GiB makes size 8 bytes, an inode
    number or a total of names over 4 GiB make ino or name_end 8 bytes. nlink is 1
    byte until some directory has more than 253 subdirectories, or a file more than
    255 links. dev stays the device number (send/ktrace matches it with the kernel's):
    4 bytes hold every major below 4096 with a minor below 2**20; a larger dev_t
    widens the column to 8. mtime and ctime stay 8-byte nanoseconds: the diff compares them exactly.
    fid is 4 bytes: file ids stop at wire MAX_FILE_ID (2**24 - 1), and source.py
    fails the run with exit 7 past it, long before a 4-byte id could overflow.
    """

    def __init__(self, root: bytes, started_ns: int = 0) -> None:
        self.root = root
        # When the walk began, by the wall clock that stamps ctimes (see diff's RACY_NS).
        self.started_ns = started_ns
        self.kind = array("B")
        self.mode = array("H")
        self.uid = array("H")
        self.gid = array("H")
        self.size = array("I")
        self.mtime = array("q")
        self.ctime = array("q")
        self.dev = array("I")
        self.ino = array("I")
        self.nlink = array("B")
        self.parent = array("i")
        self.fid = array("i")  # assigned by the diff; -1 until then and for non-files
        self.names = bytearray()
        self.name_end = array("I")
        # Rare per-entry values live in dicts keyed by index, not in a slot per entry.
        self.target: dict[int, bytes] = {}
        self.rdev: dict[int, int] = {}
        self.children: dict[int, tuple[int, int]] = {}  # dir index -> (first, count)
        self.sockets: list[bytes] = []

    def __len__(self) -> int:
        return len(self.kind)

    def add(self, name: bytes, parent: int, st: os.stat_result, kind: int) -> int:
        """Append one entry; returns its index."""
        n = len(self.kind)
        self.names += name
        try:
            self.uid.append(st.st_uid)
            self.gid.append(st.st_gid)
            self.size.append(st.st_size)
            self.dev.append(st.st_dev)
            self.ino.append(st.st_ino)
            self.nlink.append(st.st_nlink)
            self.name_end.append(len(self.names))
        except OverflowError:
            self._append_widening(n, (st.st_uid, st.st_gid, st.st_size, st.st_dev, st.st_ino,
                                      st.st_nlink, len(self.names)))
        self.kind.append(kind)
        self.mode.append(st.st_mode & 0o7777)
        self.mtime.append(st.st_mtime_ns)
        self.ctime.append(st.st_ctime_ns)
        self.parent.append(parent)
        self.fid.append(-1)
        return n

    def _append_widening(self, n: int, values: Sequence[int]) -> None:
        """Append entry N's NARROW values, widening each column one does not fit.
        Columns before the one that overflowed already hold entry N: trimmed first."""
        for col, value in zip(NARROW, values):
            a: array[int] = getattr(self, col)
            del a[n:]
            while not _fits(a.typecode, value):
                a = array(_WIDER[a.typecode], a)  # KeyError: over 64 bits, not from lstat
            a.append(value)
            setattr(self, col, a)

    def name(self, i: int) -> bytes:
        start = self.name_end[i - 1] if i else 0
        return bytes(self.names[start : self.name_end[i]])

    def path(self, i: int) -> bytes:
        """The entry's path relative to the root (b"" for the root)."""
        parts = []
        while i > 0:
            parts.append(self.name(i))
            i = self.parent[i]
        return b"/".join(reversed(parts))

    def child_range(self, i: int) -> range:
        first, count = self.children.get(i, (0, 0))
        return range(first, first + count)

    def key(self, i: int) -> tuple[int, int]:
        """(st_dev, st_ino): the entry's inode."""
        return self.dev[i], self.ino[i]

    def per_entry(self) -> int:
        """Bytes one more entry costs in the fixed-width columns (names aside)."""
        return sum(a.itemsize for a in self._columns())

    def _columns(self) -> tuple[array[int], ...]:
        return (self.kind, self.mode, self.uid, self.gid, self.size, self.mtime, self.ctime,
                self.dev, self.ino, self.nlink, self.parent, self.fid, self.name_end)

    def nbytes(self) -> int:
        """Bytes held by the per-entry arrays (what grows with the tree)."""
        return sum(a.itemsize * len(a) for a in self._columns()) + len(self.names)

    def walk(self, i: int = 0, path: bytes = b"") -> Iterator[tuple[int, bytes]]:
        """(index, path) in canonical manifest order: pre-order, names sorted."""
        stack = [(i, path)]
        while stack:
            i, path = stack.pop()
            yield i, path
            kids = sorted(((self.name(c), c) for c in self.child_range(i)), reverse=True)
            for name, c in kids:
                stack.append((c, path + b"/" + name if path else name))


def _fits(typecode: str, value: int) -> bool:
    try:
        array(typecode, (value,))
    except OverflowError:
        return False
    return True


#: Which entries of a directory a walk takes: name -> the selection below it, where
#: None takes everything. A walk with no selection takes the whole tree.
Selection = dict[bytes, "Selection | None"]


def selection(paths: Iterable[bytes]) -> Selection:
    """The Selection that takes each of PATHS (relative to the root) whole, and the
    directories that lead to them."""
    sel: Selection = {}
    for path in paths:
        node: Selection | None = sel
        parts = path.split(b"/")
        for part in parts[:-1]:
            if node is None:
                break
            child = node.setdefault(part, {})
            node = child
        if node is not None:
            node[parts[-1]] = None
    return sel


def scan_tree(root: str | bytes | os.PathLike[str], *, one_file_system: bool = False,
              only: Selection | None = None) -> Snapshot:
    """Walk ROOT once with scandir and lstat and return its Snapshot.

    ONLY limits the walk to some entries and what lies below them (several SOURCE
    arguments under their common directory).

    Errors and their codes:
    - ROOT missing, not a directory, or a symlink loop: UsageError (exit 2). These are
      bad arguments, found before pass 1, so nothing was paused.
    - A subdirectory that cannot be read (EACCES, EIO): IOFailure (exit 7). The same
      condition can appear mid-run (a chmod during the migration), and one condition
      should have one code whatever pass finds it; exit 7 is "source I/O error".
    Entries that vanish between readdir and lstat are skipped: the tree is live, and
    the next pass sees the change anyway.
    """
    rootb = os.fsencode(root)
    try:
        st = os.stat(rootb)  # the root itself may be a symlink to a directory, as for rsync DIR/
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{os.fsdecode(rootb)}: a symlink loop") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UsageError(f"{os.fsdecode(rootb)}: no such directory") from None
        raise IOFailure(f"{os.fsdecode(rootb)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{os.fsdecode(rootb)}: not a directory")
    snap = Snapshot(rootb, time.time_ns())
    snap.add(b"", -1, st, DIR)
    _walk(snap, rootb, st.st_dev if one_file_system else None, only)
    return snap


def _walk(snap: Snapshot, rootb: bytes, only_dev: int | None, only: Selection | None) -> None:
    kinds = _KINDS
    add = snap.add
    stack: list[tuple[bytes, int, Selection | None]] = [(rootb, 0, only)]
    while stack:
        dpath, di, sel = stack.pop()
        first = len(snap)
        try:
            with os.scandir(dpath) as it:
                for entry in it:
                    below = None
                    if sel is not None:
                        if entry.name not in sel:
                            continue
                        below = sel[entry.name]
                    try:
                        st = entry.stat(follow_symlinks=False)
                        kind = kinds.get(stat.S_IFMT(st.st_mode))
                        if kind is None:
                            snap.sockets.append(_rel(rootb, entry.path))
                            continue
                        target = os.readlink(entry.path) if kind == SYMLINK else None
                    except FileNotFoundError:
                        continue  # vanished since readdir
                    i = add(entry.name, di, st, kind)
                    if target is not None:
                        snap.target[i] = target
                    elif kind == DIR:
                        if only_dev is None or st.st_dev == only_dev:
                            stack.append((entry.path, i, below))
                    elif kind != FILE:
                        snap.rdev[i] = st.st_rdev
        except (FileNotFoundError, NotADirectoryError):
            if di == 0:
                raise IOFailure(f"{os.fsdecode(rootb)}: the source directory vanished") from None
            continue  # a subdirectory removed or replaced since its parent was read
        except OSError as e:
            raise IOFailure(f"{os.fsdecode(dpath)}: cannot read directory: {e.strerror}") from None
        if len(snap) > first:
            snap.children[di] = (first, len(snap) - first)


def open_scanned(root: bytes, path: bytes, dev: int, ino: int) -> int | None:
    """Open a file a delta says to scan, read-only, or None when PATH no longer holds
    that inode: a live tree may have renamed or replaced it since the walk, and the
    next pass's delta says where it went. Under the pause nothing moves, so the final
    pass reads every file it names."""
    try:
        fd = os.open(os.path.join(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None  # replaced by a symlink
        raise IOFailure(f"{os.fsdecode(path)}: {e.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd


def _rel(rootb: bytes, path: bytes) -> bytes:
    return path[len(rootb) :].lstrip(b"/")


def snapshot_manifest(
    snap: Snapshot, options: ManifestOptions = DEFAULT_OPTIONS, *, keep: bool = False,
    xattrs: Sequence[int] | None = None,
) -> ManifestBuilder:
    """The manifest of a snapshot; equals walk_manifest() of an identical tree.
    XATTRS: each entry's xattr digest (TreeTracker.xattr_digests under --preserve);
    given, the manifest covers xattrs, as recv's does when CONFIG says CONFIG_XATTRS."""
    if xattrs is not None:
        options = options._replace(xattrs=True)
    builder = ManifestBuilder(options, keep=keep)
    for i, path in snap.walk():
        kind = EntryType(snap.kind[i])
        builder.add(
            path,
            kind,
            mode=snap.mode[i],
            size=snap.size[i],
            mtime_ns=snap.mtime[i],
            uid=snap.uid[i],
            gid=snap.gid[i],
            rdev=snap.rdev.get(i, 0),
            target=snap.target.get(i, b""),
            key=snap.key(i) if snap.nlink[i] > 1 else None,
            xattrs=xattrs[i] if xattrs is not None else 0,
        )
    return builder
