"""Extended attributes of a directory source under --preserve: which entries a pass
reads them from, and the XATTRS ops that keep the copy's sets equal to the source's.

Cost rule. Every change to an xattr moves the entry's ctime, and the walk has the
ctime already, so a pass reads xattrs only of entries that are new, whose ctime
moved since the last walk, or whose ctime was racily close to that walk's start
(diff.RACY_NS, as for content). An unchanged tree costs no listxattr at all.

State. The tracker keeps one xxh3-64 per entry of its snapshot (8 bytes, 0 for "no
xattrs"), and only under --preserve. That is the digest of the set last sent, so:
- a set is sent only when it differs from what recv has, not whenever ctime moves
  (a busy directory's ctime moves with every file created in it);
- the final manifest covers every entry's xattrs without reading any of them again
  under the pause.
The alternative, a bit per entry and "send whenever ctime moved and the entry has or
had xattrs", would save 7 bytes per entry but would have to read every entry's xattrs
under the pause to build the manifest, which would lengthen the downtime.

One exception sends more: a regular file with xattrs whose ctime moved gets its set
again even if equal, because recv's page writes and chown make the kernel drop the
copy's security.capability (as a write on the source would).

Sets are read after the epoch's pages, when the late ops are built, by path, and
checked against the walk's (dev, ino). What they read may be newer than the walk;
that only matters until the next pass, which reads them again because the change
moved the ctime. An entry that is no longer at its path by then (its directory was
renamed, which leaves its ctime alone) is remembered by (dev, ino) and read in the
next pass wherever it is. Under the pause nothing moves, so the last pass's sets
are exact.
"""

from __future__ import annotations

import errno
import logging
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence

from multifd_cli.common.manifest import read_xattrs, xattr_digest
from multifd_cli.errors import IOFailure
from multifd_cli.send.tree.scan import FILE, Snapshot
from multifd_cli.wire.messages import MAX_XATTR_VALUE, MAX_XATTRS
from multifd_cli.wire.treecodec import encode_xattrs
from multifd_cli.wire.treeops import Op, TreeOp, skipped_warning

log = logging.getLogger("multifd")

#: Most bytes of one entry's encoded set that send carries: with a TREE message of
#: about 1 MiB of ops besides, a set never pushes it past MAX_CONTROL_PAYLOAD.
SET_LIMIT = 1 << 20


class XattrReader:
    """Reads the carried xattrs of a tree's entries (wire.treeops.xattr_carried).

    privileged: recv runs as root (ACCEPT_OWNERS), so trusted.* and security.*
    travel too; known only once recv accepted, before the first pass's diff.
    """

    def __init__(self, root: bytes, privileged: bool) -> None:
        self.root = root
        self.privileged = privileged
        self.skipped: list[bytes] = []  # "path: name" over the limits, for one warning
        self.warned = False
        self.unread: set[tuple[int, int]] = set()  # (dev, ino) a pass could not read

    def read(self, snap: Snapshot, i: int, path: bytes) -> list[tuple[bytes, bytes]] | None:
        """Entry I's carried set, within the limits, or None when PATH no longer holds
        that entry (it moved or went since the walk; the next pass sees where)."""
        full = os.path.join(self.root, path) if path else self.root
        follow = i == 0  # the root may be a symlink to the tree, as for the walk
        try:
            pairs = read_xattrs(full, self.privileged, follow=follow)
            st = os.stat(full, follow_symlinks=follow)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # a directory on the path was replaced by a symlink
            raise IOFailure(f"{os.fsdecode(full)}: cannot read extended attributes: "
                            f"{e.strerror}") from None
        if (st.st_dev, st.st_ino) != snap.key(i):
            return None
        return self._within_limits(path, pairs)

    def _within_limits(self, path: bytes,
                       pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        kept: list[tuple[bytes, bytes]] = []
        total = 0
        for name, value in pairs:
            size = 6 + len(name) + len(value)
            if len(kept) >= MAX_XATTRS or len(value) > MAX_XATTR_VALUE or total + size > SET_LIMIT:
                self.skipped.append((path or b".") + b": " + name)
                continue
            kept.append((name, value))
            total += size
        return kept

    def warn(self) -> None:
        """One warning for the names over the limits, the first pass that met any."""
        if self.skipped and not self.warned:
            self.warned = True
            warning = skipped_warning("extended attributes over the size limits",
                                      self.skipped)
            log.warning("%s", warning)


class XattrPass:
    """The xattr part of one pass's delta: which entries to read, what each had.

    The diff calls carry() or check() once for every entry of the new snapshot;
    ops() then reads the checked ones and yields an XATTRS op (the whole set, which
    replaces the copy's) for each whose set differs. It fills `digests`, which the
    tracker keeps for the next pass and the manifest.
    """

    def __init__(self, reader: XattrReader, new: Snapshot, old: array[int] | None) -> None:
        self.reader = reader
        self.new = new
        self.old = old  # the last snapshot's digests, or None: read everything
        self.retry = reader.unread  # what the last pass could not read at its path
        reader.unread = set()
        self.digests = array("Q", bytes(8 * len(new)))
        self.checked = array("i")  # new indices to read (all of them when old is None)
        self.prev = array("Q")  # their digest as recv has it
        self.force = bytearray()  # a file whose ctime moved: send a non-empty set anyway

    def entry(self, c: int, o: int = -1, moved: bool = False, racy: bool = False) -> None:
        """New entry C, which was old entry O (-1: new to the replica). MOVED: its
        ctime moved; RACY: the last walk may have missed a change."""
        old = self.old
        if old is None:
            return  # ops() reads every entry: no list of them needed
        if o < 0:
            self._check(c, 0, False)
        elif moved or racy or (self.retry and self.new.key(c) in self.retry):
            self._check(c, old[o], moved and self.new.kind[c] == FILE)
        else:
            self.digests[c] = old[o]

    def _check(self, c: int, prev: int, force: bool) -> None:
        self.checked.append(c)
        self.prev.append(prev)
        self.force.append(force)

    def reads(self) -> Sequence[int]:
        """The new indices whose xattrs ops() reads."""
        return range(len(self.new)) if self.old is None else self.checked

    def ops(self) -> Iterator[TreeOp]:
        """XATTRS ops, one per entry (one per file id) whose set recv must get."""
        new, reader = self.new, self.reader
        sent: set[int] = set()  # file ids already given their set this pass
        todo: Iterable[tuple[int, int, int]] = zip(self.checked, self.prev, self.force)
        if self.old is None:  # the first pass: everything is new to recv
            todo = ((c, 0, 0) for c in self.reads())
        for c, prev, force in todo:
            path = new.path(c)
            pairs = reader.read(new, c, path)
            if pairs is None:
                self.digests[c] = prev  # recv keeps what it had; the next pass reads again
                reader.unread.add(new.key(c))
                continue
            digest = xattr_digest(pairs)
            self.digests[c] = digest
            if digest == prev and not (force and digest):
                continue
            fid = new.fid[c] if new.kind[c] == FILE else -1
            if fid >= 0:
                if fid in sent:
                    continue
                sent.add(fid)
            yield TreeOp(Op.XATTRS, path, fid, target=encode_xattrs(pairs))
        reader.warn()
