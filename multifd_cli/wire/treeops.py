"""The vocabulary of a live directory tree that both sides share: entry types, the
operations of a tree delta, and the check every path from the peer must pass.

A tree delta is plain data (a sequence of TreeOp in phase order) so that a later
codec can frame it per epoch without knowing how it was computed or how it is
applied. send/ produces the ops (send.tree.TreeDelta), recv/ applies them
(recv.tree.TreeApplier); neither imports the other, so what they agree on lives here.

Regular files are named by a file id, assigned per (dev, ino) when send first sees
the inode, not by path: a rename within the tree is then a move of the id, and the
receiver keeps the file's page tables. Everything else (directories, symlinks, fifos,
devices) is named by its path, because it carries no pages worth keeping.
"""

from __future__ import annotations

import os
import stat
from enum import IntEnum
from typing import NamedTuple

from multifd_cli.errors import ProtocolError


class EntryType(IntEnum):
    """What a tree entry is. The values are part of the manifest's encoding."""

    FILE = 1
    DIR = 2
    SYMLINK = 3
    FIFO = 4
    CHR = 5
    BLK = 6
    SOCK = 7


_FMT_TO_TYPE = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFCHR: EntryType.CHR,
    stat.S_IFBLK: EntryType.BLK,
    stat.S_IFSOCK: EntryType.SOCK,
}


def entry_type(st_mode: int) -> EntryType:
    """The EntryType of an lstat() mode."""
    return _FMT_TO_TYPE[stat.S_IFMT(st_mode)]


class Op(IntEnum):
    """A tree operation; the comment names the phase it belongs to (see PHASES)."""

    UNLINK = 1  # 1 out / 2 gone: drop one path of a regular file (fid checks the inode)
    DROP = 2  # 2 gone: forget a file id; its last path was unlinked before
    REMOVE = 3  # 2 gone: a symlink, fifo or device node
    RMDIR = 4  # 3: an empty directory, deepest first
    MKDIR = 5  # 4: shallowest first
    LINK = 6  # 5 in / 6 new: give an existing file id one more path
    CREATE = 7  # 6 new: a new empty file id with its first path, mode, owner and size
    SYMLINK = 8  # 6 new
    MKNOD = 9  # 6 new: fifo or device node (mode carries the type)
    META = 10  # 7: mode, owner and (for files) size of a non-directory
    TIMES = 11  # after the epoch's pages: the mtime of a non-directory
    DIRMETA = 12  # at completion: a directory's mode, owner and mtime, deepest first
    XATTRS = 13  # after the epoch's pages, before TIMES: an entry's whole xattr set


#: The phases of one delta, in the order they are applied. Splitting "out" from "in"
#: is what makes swaps and cycles (a->b, b->a) sound: after phase 1 every moved file
#: lives only under its id name in the receiver's hidden id directory, so no move can
#: land on a path another move has yet to leave.
PHASES = (
    "out: unlink the old paths of files that move; their id name keeps the inode",
    "gone: unlink paths of vanished files and drop their ids; remove symlinks, fifos, devices",
    "rmdir: vanished directories, deepest first",
    "mkdir: new directories, shallowest first",
    "in: link moved files to their new paths",
    "new: create new files, extra hard links, symlinks, fifos and devices",
    "meta: mode, owner and size of changed non-directories",
)


#: The rank of each op in the legal order of one epoch: a receiver refuses an op whose
#: rank is below one it has already applied this epoch. LINK ranks with "in", and is
#: also legal among "new" (a new file's further hard links follow its CREATE).
RANK = {
    Op.UNLINK: 1,
    Op.DROP: 2,
    Op.REMOVE: 2,
    Op.RMDIR: 3,
    Op.MKDIR: 4,
    Op.LINK: 5,
    Op.CREATE: 6,
    Op.SYMLINK: 6,
    Op.MKNOD: 6,
    Op.META: 7,
    Op.XATTRS: 8,
    Op.TIMES: 9,
    Op.DIRMETA: 10,
}


def check_rank(op: Op, current: int) -> int:
    """The rank after OP when CURRENT was reached, or ProtocolError if OP comes too
    late in the epoch: an op out of phase order can land on a path another op has
    yet to free, which is how a swap would lose a file."""
    rank = RANK[op]
    if rank >= current or (op == Op.LINK and current == RANK[Op.CREATE]):
        return max(rank, current)
    raise ProtocolError(f"tree {op.name} out of order within the epoch")


class TreeOp(NamedTuple):
    """One operation. Unused fields keep their defaults, so a codec can encode only the
    fields an op uses. uid/gid of -1 mean "leave as is"; size -1 means unchanged.
    target is a symlink's target, or for XATTRS the entry's encoded xattr set
    (wire.treecodec.encode_xattrs), kept as bytes so that whoever sizes a TREE
    message by its ops' bytes counts the set too."""

    op: Op
    path: bytes = b""
    fid: int = -1
    mode: int = 0
    uid: int = -1
    gid: int = -1
    size: int = -1
    target: bytes = b""
    rdev: int = 0
    mtime_ns: int = 0


#: The xattr namespaces a tree carries with --preserve. user.* always; trusted.* and
#: security.* only when recv runs as root, as rsync -X copies them only for root
#: (without privilege they can be neither read nor set). system.* holds ACLs, which
#: are not part of -X.
USER_XATTRS = (b"user.",)
PRIVILEGED_XATTRS = (b"user.", b"trusted.", b"security.")


def xattr_carried(name: bytes, privileged: bool) -> bool:
    """Whether a tree carries the xattr NAME; PRIVILEGED is recv running as root
    (ACCEPT_OWNERS), which both sides know, so both leave out the same names."""
    return name.startswith(PRIVILEGED_XATTRS if privileged else USER_XATTRS)


def skipped_warning(what: str, paths: list[bytes], limit: int = 20) -> str | None:
    """One warning line naming every skipped entry (up to LIMIT, then a count)."""
    if not paths:
        return None
    shown = ", ".join(os.fsdecode(p) for p in paths[:limit])
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return f"skipped {len(paths)} {what}: {shown}{more}"


def split_path(path: bytes) -> list[bytes]:
    """The components of a relative tree path from the peer, or ProtocolError.

    A hostile sender could name "../x" or "/etc/x" to write outside the staging
    directory; nothing but plain, non-empty components is accepted. b"" is the root.
    """
    if path == b"":
        return []
    if path.startswith(b"/"):
        raise ProtocolError(f"tree path {path!r} is absolute")
    if b"\0" in path:
        raise ProtocolError(f"tree path {path!r} holds a NUL byte")
    parts = path.split(b"/")
    for part in parts:
        if part in (b"", b".", b".."):
            raise ProtocolError(f"tree path {path!r} leaves its directory or is not canonical")
    return parts


def path_depth(path: bytes) -> int:
    """Components in a tree path; the root is 0."""
    return 0 if not path else path.count(b"/") + 1
