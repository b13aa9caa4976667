"""Apply tree deltas to a staging tree on the receiving side.

Every regular file lives under its id name (hex file id) in a hidden id directory on
the same filesystem as the staging tree, and each of its tree paths is a hard link to
that inode. So a file's pages can be written by id without knowing its path, a move
is an unlink plus a link (the id name keeps the inode alive in between, which is what
makes swaps and cycles sound), and nothing about a file is held in memory here.

Descriptors are bounded: files are opened on demand through an LRU cache and closed
on eviction, because a tree may hold a million files and RLIMIT_NOFILE is often 1024.
Directory descriptors used to resolve paths are cached the same way.

The delta comes from the peer and is not trusted: every path is split and checked
(no "..", no absolute path), and each component is opened with O_NOFOLLOW, so no
symlink inside the tree can redirect an operation outside the staging directory.

Per epoch recv does ``begin_epoch()``, ``apply(ops)``, writes the epoch's pages
through ``file_fd(fid)``, then ``apply(times)``. At completion: ``apply(dir ops)``
(DIRMETA), compare ``walk_manifest(staging).digest()`` with send's, then
``release_ids()`` and move the staging tree into place. Recv channels in other
processes can keep FdCaches of their own over the same id directory: a file id is
never reused, so a descriptor of a dropped id only ever writes to an unlinked inode.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable

from multifd_cli.common.manifest import read_xattrs
from multifd_cli.errors import IOFailure, ProtocolError
from multifd_cli.wire.treecodec import decode_xattrs
from multifd_cli.wire.treeops import Op, TreeOp, check_rank, split_path, xattr_carried

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
# A delta that does not fit the replica: the sender is broken or hostile.
_MISMATCH = {errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.ELOOP}


def id_name(fid: int) -> bytes:
    """The name of file id FID in the id directory."""
    return b"%x" % fid


class FdCache:
    """A bounded LRU of read-write descriptors of file ids."""

    def __init__(self, ids_fd: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an fd cache needs room for one descriptor")
        self.ids_fd = ids_fd
        self.capacity = capacity
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.opens = 0  # how often a descriptor was opened; tests check the cache works

    def __len__(self) -> int:
        return len(self._fds)

    def get(self, fid: int) -> int:
        """An open descriptor of FID, opening it (and evicting another) if needed."""
        fd = self._fds.get(fid)
        if fd is not None:
            self._fds.move_to_end(fid)
            return fd
        return self._keep(fid, self._open(id_name(fid)))

    def create(self, fid: int) -> int:
        """Create FID's id file, empty and owner-only, and keep its descriptor."""
        fd = os.open(id_name(fid), _FILE_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.ids_fd)
        return self._keep(fid, fd)

    def forget(self, fid: int) -> None:
        fd = self._fds.pop(fid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _keep(self, fid: int, fd: int) -> int:
        self.opens += 1
        self._fds[fid] = fd
        while len(self._fds) > self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _open(self, name: bytes) -> int:
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=self.ids_fd)
        except PermissionError:
            if os.geteuid() == 0:
                raise
        # Without root, a file whose mode lacks u+rw (a 0400 source file) cannot be
        # opened for writing; an open descriptor keeps its access after the mode is
        # put back, so lift the mode just for the open.
        mode = stat.S_IMODE(os.stat(name, dir_fd=self.ids_fd, follow_symlinks=False).st_mode)
        os.chmod(name, mode | 0o600, dir_fd=self.ids_fd)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.ids_fd)
        finally:
            os.chmod(name, mode, dir_fd=self.ids_fd)
        return fd


class _DirCache:
    """A bounded LRU of O_PATH descriptors of staging directories, by path."""

    def __init__(self, root_fd: int, capacity: int) -> None:
        self.root_fd = root_fd
        self.capacity = capacity
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """The descriptor of PATH's directory and PATH's last component."""
        parts = split_path(path)
        if not parts:
            raise ProtocolError("tree operation on the root where only a directory's is allowed")
        return self.dir(parts[:-1]), parts[-1]

    def dir(self, parts: list[bytes]) -> int:
        if not parts:
            return self.root_fd
        key = b"/".join(parts)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        parent = self.dir(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                raise ProtocolError(f"tree path {key!r} is not a directory in the replica") from None
            raise
        self._fds[key] = fd
        while len(self._fds) > self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def invalidate(self, path: bytes) -> None:
        """Forget PATH and everything below it (after an rmdir)."""
        below = path + b"/"
        for key in [k for k in self._fds if k == path or k.startswith(below)]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class TreeApplier:
    """Applies TreeOps to a staging tree (root_fd) whose files live in ids_fd.

    Both descriptors are ordinary directory descriptors (not O_PATH) on the same
    filesystem; the caller owns and closes them. keep_owner defaults to running as
    root, as cp -a does; can_mknod to root too (device nodes need CAP_MKNOD).
    Fifos are always created: mkfifo needs no privilege. Device nodes that cannot
    be created, and sockets, are collected in `skipped` for one warning.
    """

    def __init__(
        self,
        root_fd: int,
        ids_fd: int,
        *,
        fd_cache: int = 128,
        dir_cache: int = 32,
        keep_owner: bool | None = None,
        can_mknod: bool | None = None,
    ) -> None:
        self.root_fd = root_fd
        self.ids_fd = ids_fd
        self.files = FdCache(ids_fd, fd_cache)
        self.dirs = _DirCache(root_fd, dir_cache)
        root = os.geteuid() == 0
        self.keep_owner = root if keep_owner is None else keep_owner
        self.can_mknod = root if can_mknod is None else can_mknod
        self.skipped: list[bytes] = []
        self._skipped: set[bytes] = set()
        self._rank = 0

    def begin_epoch(self) -> None:
        """A new epoch's ops start again from the first phase."""
        self._rank = 0

    def file_fd(self, fid: int) -> int:
        """A read-write descriptor of file id FID for its pages; owned by the cache,
        valid until the next call into this applier."""
        try:
            return self.files.get(fid)
        except FileNotFoundError:
            raise ProtocolError(f"pages for file id {fid}, which the tree does not hold") from None
        except OSError as e:
            raise IOFailure(f"file id {fid}: {e.strerror}") from None

    def apply(self, ops: Iterable[TreeOp]) -> None:
        """Apply OPS in order. IOFailure for the destination's own failures (a name
        too long for its filesystem, ENOSPC), ProtocolError for a delta that does not
        fit the replica or breaks the phase order (wire.treeops.RANK) of the epoch
        since begin_epoch()."""
        for op in ops:
            if not isinstance(op.op, Op):
                raise ProtocolError(f"unknown tree operation {op.op!r}")
            self._rank = check_rank(op.op, self._rank)
            try:
                self._apply(op)
            except OSError as e:
                where = os.fsdecode(op.path) if op.path else f"file id {op.fid}"
                if e.errno == errno.ENAMETOOLONG:
                    raise IOFailure(f"{where}: name too long for the destination filesystem") from None
                if e.errno in _MISMATCH:
                    raise ProtocolError(
                        f"tree {op.op.name} of {where} does not fit the replica: {e.strerror}"
                    ) from None
                raise IOFailure(f"{where}: {e.strerror}") from None

    def close(self) -> None:
        self.files.close()
        self.dirs.close()

    def release_ids(self) -> None:
        """Unlink every id name, at completion; the tree's own paths keep the files."""
        self.files.close()
        for name in os.listdir(self.ids_fd):
            os.unlink(name, dir_fd=self.ids_fd)

    def _apply(self, op: TreeOp) -> None:
        kind = op.op
        if kind == Op.DIRMETA:
            self._dirmeta(op)
            return
        if kind == Op.DROP:
            self.files.forget(op.fid)
            os.unlink(id_name(op.fid), dir_fd=self.ids_fd)
            return
        if op.path in self._skipped:
            if kind == Op.REMOVE:  # the path is free again for what comes next
                self._skipped.discard(op.path)
            return
        if kind == Op.XATTRS:
            self._xattrs(op)
            return
        pfd, name = self.dirs.parent(op.path)
        if kind == Op.UNLINK:
            self._check_is(pfd, name, op)
            os.unlink(name, dir_fd=pfd)
        elif kind == Op.REMOVE:
            if stat.S_ISREG(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                raise ProtocolError(f"tree REMOVE of {op.path!r}: a file id's path")
            os.unlink(name, dir_fd=pfd)
        elif kind == Op.RMDIR:
            self.dirs.invalidate(op.path)
            os.rmdir(name, dir_fd=pfd)
        elif kind == Op.MKDIR:
            # Owner-writable until completion, when DIRMETA sets the real mode.
            os.mkdir(name, 0o700, dir_fd=pfd)
        elif kind == Op.LINK:
            os.link(id_name(op.fid), name, src_dir_fd=self.ids_fd, dst_dir_fd=pfd,
                    follow_symlinks=False)
        elif kind == Op.CREATE:
            fd = self.files.create(op.fid)
            self._file_meta(fd, op)
            os.link(id_name(op.fid), name, src_dir_fd=self.ids_fd, dst_dir_fd=pfd,
                    follow_symlinks=False)
        elif kind == Op.SYMLINK:
            os.symlink(op.target, name, dir_fd=pfd)
            if self.keep_owner:
                os.chown(name, op.uid, op.gid, dir_fd=pfd, follow_symlinks=False)
        elif kind == Op.MKNOD:
            self._mknod(pfd, name, op)
        elif kind == Op.META:
            self._meta(pfd, name, op)
        elif kind == Op.TIMES:
            ns = (op.mtime_ns, op.mtime_ns)
            if op.fid >= 0:
                os.utime(self.files.get(op.fid), ns=ns)
            else:
                os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
        else:
            raise ProtocolError(f"unknown tree operation {kind!r}")

    def _check_is(self, pfd: int, name: bytes, op: TreeOp) -> None:
        """UNLINK names the file id it expects at the path; a mismatch means the
        delta and the replica disagree, and unlinking would lose the wrong file."""
        at = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        mine = os.stat(id_name(op.fid), dir_fd=self.ids_fd, follow_symlinks=False)
        if (at.st_dev, at.st_ino) != (mine.st_dev, mine.st_ino):
            raise ProtocolError(f"tree UNLINK of {op.path!r}: not file id {op.fid} there")

    def _file_meta(self, fd: int, op: TreeOp) -> None:
        if op.size >= 0:
            os.ftruncate(fd, op.size)
        os.fchmod(fd, op.mode & 0o7777)
        if self.keep_owner and op.uid >= 0:
            os.fchown(fd, op.uid, op.gid)
            os.fchmod(fd, op.mode & 0o7777)  # chown clears setuid/setgid bits

    def _mknod(self, pfd: int, name: bytes, op: TreeOp) -> None:
        fmt = stat.S_IFMT(op.mode)
        if fmt == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK) and self.can_mknod:
            os.mknod(name, fmt | 0o600, op.rdev, dir_fd=pfd)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            self.skipped.append(op.path)
            self._skipped.add(op.path)
            return
        else:
            raise ProtocolError(f"tree MKNOD of {op.path!r} with mode {op.mode:o}")
        self._meta(pfd, name, op)

    def _meta(self, pfd: int, name: bytes, op: TreeOp) -> None:
        if op.fid >= 0:
            self._file_meta(self.files.get(op.fid), op)
            return
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if self.keep_owner and op.uid >= 0:
            os.chown(name, op.uid, op.gid, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):  # a symlink's mode is always 0777 on Linux
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                raise ProtocolError(f"tree META of {op.path!r} names no file id")
            os.chmod(name, op.mode & 0o7777, dir_fd=pfd)

    def _xattrs(self, op: TreeOp) -> None:
        """Make the entry's set in the carried namespaces exactly OP's: remove what is
        not in it, set what is. A name this destination refuses (no xattr support,
        no privilege, a value too big for its filesystem) is IOFailure (exit 7), at
        the pass that first carries it, before the source is paused: rsync -X calls
        that a partial transfer, and a copy that silently lacks it would fail the
        manifest at completion anyway."""
        pairs = decode_xattrs(op.target)
        for name, _ in pairs:
            if not xattr_carried(name, self.keep_owner):
                raise ProtocolError(f"tree XATTRS of {op.path!r}: {name!r} is not carried")
        if op.fid >= 0:
            self._set_xattrs(self.files.get(op.fid), op, pairs)
        elif not op.path:
            self._set_xattrs(self.root_fd, op, pairs)
        else:
            pfd, name = self.dirs.parent(op.path)
            # xattr calls take no dir_fd; this path resolves through the checked parent
            # descriptor and does not follow a symlink at its end.
            self._set_xattrs(b"/proc/self/fd/%d/%s" % (pfd, name), op, pairs)

    def _set_xattrs(self, where: int | bytes, op: TreeOp,
                    pairs: list[tuple[bytes, bytes]]) -> None:
        wanted = dict(pairs)
        follow = isinstance(where, int)  # a descriptor is the entry itself
        name = b""
        try:
            for name, _ in read_xattrs(where, self.keep_owner, follow=follow):
                if name not in wanted:
                    if isinstance(where, int):
                        os.removexattr(where, name)
                    else:
                        os.removexattr(where, name, follow_symlinks=False)
            for name, value in pairs:
                self._setxattr(where, name, value)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            shown = os.fsdecode(op.path) if op.path else "the tree's root"
            what = f"extended attribute {os.fsdecode(name)}" if name else "extended attributes"
            raise IOFailure(f"{shown}: the destination cannot keep {what} (--preserve): "
                            f"{e.strerror}") from None

    def _setxattr(self, where: int | bytes, name: bytes, value: bytes) -> None:
        if not isinstance(where, int):
            os.setxattr(where, name, value, follow_symlinks=False)
            return
        try:
            os.setxattr(where, name, value)
        except PermissionError:
            if self.keep_owner:
                raise
            # Without root, user.* of a file whose mode lacks u+w cannot be set; lift
            # the mode just for the call, as FdCache._open does for the open.
            mode = stat.S_IMODE(os.fstat(where).st_mode)
            os.fchmod(where, mode | 0o200)
            try:
                os.setxattr(where, name, value)
            finally:
                os.fchmod(where, mode)

    def _dirmeta(self, op: TreeOp) -> None:
        if op.path:
            pfd, name = self.dirs.parent(op.path)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
        else:
            fd = os.dup(self.root_fd)
        try:
            if self.keep_owner and op.uid >= 0:
                os.fchown(fd, op.uid, op.gid)
            os.fchmod(fd, op.mode & 0o7777)
            os.utime(fd, ns=(op.mtime_ns, op.mtime_ns))
        finally:
            os.close(fd)
