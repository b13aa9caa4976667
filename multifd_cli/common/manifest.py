"""A tree's manifest: a canonical encoding of its shape and metadata, and its digest.

The completion digest covers page hashes; for a directory source it must cover the
tree too (paths, types, modes, sizes, symlink targets, hard-link groups, and where
selected mtimes and owners), or a copy with a missing empty directory or a lost mode
would verify. Send computes it from its final snapshot, recv by walking its staging
tree; both feed the same ManifestBuilder in the same canonical order, so equal trees
give equal digests.

Canonical order: depth-first pre-order from the root (path b""), the children of each
directory in bytewise order of their names. It needs only one directory's names
sorted at a time, never the whole tree's paths.

Hard-link groups are encoded as the ordinal of the group's first path in that order,
so the numbers do not depend on inode numbers, which differ between the two sides.

With --preserve (FLAG_XATTRS) each entry also carries the xxh3-64 of its xattr set in
the namespaces the tree carries (wire.treeops.xattr_carried), so a copy that lacks
or alters one fails verification instead of passing silently.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import xxhash

from multifd_cli.errors import IOFailure
from multifd_cli.wire.treecodec import encode_xattrs
from multifd_cli.wire.treeops import EntryType, entry_type, xattr_carried

MAGIC = b"MFDTREE\x01"
FLAG_MTIME = 0x01
FLAG_OWNER = 0x02
FLAG_DEVICES = 0x04
FLAG_XATTRS = 0x08

_ENTRY = struct.Struct(">HBHQqIIQq")
_XATTRS = struct.Struct(">Q")
_NO_LINK = -1
#: errnos that mean "this filesystem or entry holds no xattrs", not a failure.
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP}


class ManifestOptions(NamedTuple):
    """What the digest covers beyond shape, modes and sizes.

    mtimes: file and directory mtimes (always for a directory source).
    owners: uid/gid; only where the receiver keeps them (it runs as root).
    devices: char/block device nodes; off when the receiver cannot create them, so
    that both sides leave out the same entries.
    xattrs: each entry's xattr digest (--preserve); which namespaces count follows
    owners, which is "recv runs as root" (wire.treeops.xattr_carried).
    """

    mtimes: bool = True
    owners: bool = False
    devices: bool = True
    xattrs: bool = False

    def flags(self) -> int:
        return (
            (FLAG_MTIME if self.mtimes else 0)
            | (FLAG_OWNER if self.owners else 0)
            | (FLAG_DEVICES if self.devices else 0)
            | (FLAG_XATTRS if self.xattrs else 0)
        )


DEFAULT_OPTIONS = ManifestOptions()


class ManifestEntry(NamedTuple):
    """One entry as the manifest sees it. link is the ordinal of the first entry of its
    hard-link group, or -1 where the file has no other path in the tree."""

    path: bytes
    kind: EntryType
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    rdev: int
    link: int
    target: bytes
    xattrs: int = 0


def xattr_digest(pairs: Iterable[tuple[bytes, bytes]]) -> int:
    """The xxh3-64 of an xattr set's canonical encoding; 0 for the empty set (never for
    another), so "has no xattrs" costs nothing to say."""
    data = encode_xattrs(pairs)
    return (xxhash.xxh3_64_intdigest(data) or 1) if data else 0


def read_xattrs(path: bytes | int, privileged: bool, *,
                follow: bool = False) -> list[tuple[bytes, bytes]]:
    """The carried (name, value) pairs of PATH (or an open descriptor), sorted.

    A filesystem without xattr support has none. A name removed between the listing
    and the read is left out: its removal moved the entry's ctime. Other errors
    (a vanished entry, EACCES) are the caller's to judge, as OSError.
    """
    try:
        if isinstance(path, int):
            names = os.listxattr(path)
        else:
            names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return []
        raise
    pairs = []
    for text in names:
        name = os.fsencode(text)
        if not xattr_carried(name, privileged):
            continue
        try:
            if isinstance(path, int):
                value = os.getxattr(path, name)
            else:
                value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        pairs.append((name, value))
    pairs.sort()
    return pairs


class ManifestBuilder:
    """Encodes entries given in canonical order and hashes them.

    Feed each entry with its identity key (any hashable that equals for two paths of
    the same inode, or None when the file has a single path); the builder turns keys
    into link ordinals. Keep `entries` only in tests: a million-file tree would hold
    them all.
    """

    def __init__(self, options: ManifestOptions = DEFAULT_OPTIONS, *, keep: bool = False) -> None:
        self.options = options
        self._hash = hashlib.sha256()
        self._hash.update(MAGIC + bytes([options.flags()]))
        self._first: dict[object, int] = {}
        self.count = 0
        self.entries: list[ManifestEntry] | None = [] if keep else None
        self.encoded: bytearray | None = bytearray(MAGIC + bytes([options.flags()])) if keep else None

    def add(
        self,
        path: bytes,
        kind: EntryType,
        *,
        mode: int,
        size: int = 0,
        mtime_ns: int = 0,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: bytes = b"",
        key: object = None,
        xattrs: int = 0,
    ) -> None:
        """Add one entry; modes are masked to permission bits, irrelevant fields zeroed.
        xattrs is the entry's xattr_digest(), counted only with options.xattrs."""
        opts = self.options
        if kind in (EntryType.CHR, EntryType.BLK) and not opts.devices:
            return
        link = _NO_LINK
        if key is not None and kind == EntryType.FILE:
            link = self._first.setdefault(key, self.count)
            if link == self.count:
                link = _NO_LINK  # the first path of its group carries no link
        entry = ManifestEntry(
            path=path,
            kind=kind,
            mode=0 if kind == EntryType.SYMLINK else stat.S_IMODE(mode),
            size=size if kind == EntryType.FILE else len(target) if kind == EntryType.SYMLINK else 0,
            mtime_ns=mtime_ns if opts.mtimes else 0,
            uid=uid if opts.owners else 0,
            gid=gid if opts.owners else 0,
            rdev=rdev if kind in (EntryType.CHR, EntryType.BLK) else 0,
            link=link,
            target=target if kind == EntryType.SYMLINK else b"",
            xattrs=xattrs if opts.xattrs else 0,
        )
        data = encode_entry(entry, opts.xattrs)
        self._hash.update(data)
        if self.entries is not None and self.encoded is not None:
            self.entries.append(entry)
            self.encoded += data
        self.count += 1

    def digest(self) -> bytes:
        """The 32-byte digest of everything added so far, and of the count."""
        h = self._hash.copy()
        h.update(struct.pack(">Q", self.count))
        return h.digest()


def encode_entry(e: ManifestEntry, xattrs: bool = False) -> bytes:
    """The canonical bytes of one entry; paths and targets are length-prefixed, and
    with XATTRS the entry's xattr digest follows."""
    if len(e.path) > 0xFFFF or len(e.target) > 0xFFFF:
        raise IOFailure(f"tree path too long for the manifest: {e.path!r}")
    head = _ENTRY.pack(
        len(e.path), int(e.kind), e.mode, e.size, e.mtime_ns, e.uid, e.gid, e.rdev, e.link
    )
    tail = _XATTRS.pack(e.xattrs) if xattrs else b""
    return head + e.path + struct.pack(">H", len(e.target)) + e.target + tail


def walk_manifest(
    root: str | bytes | os.PathLike[str],
    options: ManifestOptions = DEFAULT_OPTIONS,
    *,
    skip_names: frozenset[bytes] = frozenset(),
    keep: bool = False,
    links_outside: int = 0,
) -> ManifestBuilder:
    """The manifest of a directory tree on disk, never following symlinks.

    recv uses it on its staging tree at completion. skip_names leaves out top-level
    names (the receiver's hidden id directory, if it lives inside the tree). Only
    files with more than one link are remembered for link groups, so memory stays
    proportional to hard-linked files. links_outside: how many links every regular
    file has outside ROOT (recv's staging files have one in its id directory), so
    that those files are not all remembered. With options.xattrs every entry's xattrs are
    read (one listxattr each, and a getxattr per name).
    """
    builder = ManifestBuilder(options, keep=keep)
    linked = 1 + links_outside
    for path, st, target, where in _walk(os.fsencode(root), skip_names):
        digest = 0
        if options.xattrs:
            digest = xattr_digest(read_xattrs(where, options.owners, follow=not path))
        builder.add(
            path,
            entry_type(st.st_mode),
            mode=st.st_mode,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            target=target,
            key=(st.st_dev, st.st_ino) if st.st_nlink > linked else None,
            xattrs=digest,
        )
    return builder


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(rootb: bytes,
          skip: frozenset[bytes]) -> Iterator[tuple[bytes, os.stat_result, bytes, bytes]]:
    """(path, lstat, symlink target, a path that names the entry) in canonical order,
    without recursion (trees can be deep), each directory read through its parent's
    descriptor: a path may be longer than PATH_MAX below the root and still be walked.
    The naming path goes through /proc/self/fd and the parent's descriptor, for the
    xattr calls, which take no dir_fd."""
    # The root may be a symlink to the tree, as send's SOURCE may; below it, nothing is followed.
    st = os.stat(rootb)
    yield b"", st, b"", rootb
    if not stat.S_ISDIR(st.st_mode):
        return
    frames: list[tuple[int, bytes, list[tuple[bytes, os.stat_result]]]] = []
    try:
        fd = os.open(rootb, _DIR & ~os.O_NOFOLLOW)
        frames.append((fd, b"", _children(fd, skip)))
        while frames:
            fd, rel, kids = frames[-1]
            if not kids:
                os.close(fd)
                frames.pop()
                continue
            name, st = kids.pop()
            path = rel + b"/" + name if rel else name
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
            yield path, st, target, b"/proc/self/fd/%d/%s" % (fd, name)
            if stat.S_ISDIR(st.st_mode):
                child = os.open(name, _DIR, dir_fd=fd)
                frames.append((child, path, _children(child, frozenset())))
    finally:
        for fd, _, _ in frames:
            os.close(fd)


def _children(fd: int, skip: frozenset[bytes]) -> list[tuple[bytes, os.stat_result]]:
    """A directory's entries but sockets (never part of a tree copy), last name first,
    so that pop() takes them in ascending order."""
    with os.scandir(fd) as it:
        kids = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
    kids = [(n, st) for n, st in kids if n not in skip and not stat.S_ISSOCK(st.st_mode)]
    kids.sort(reverse=True)
    return kids
