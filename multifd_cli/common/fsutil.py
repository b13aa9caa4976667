"""Filesystem calls both sides need and the os module lacks: linkat of an O_TMPFILE,
renameat2 exchange/noreplace, hole punching, writeback hints, directory fsync.

Loading libc through ctypes costs start-up time, so import this module only
where one of these calls is about to be made.
"""

from __future__ import annotations

import ctypes
import errno
import os

from multifd_cli.errors import IOFailure

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# The process's own symbols include libc's; ctypes.util.find_library("c") would
# find the same library by running ldconfig, ~13 ms of every recv's start-up.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000


def link_fd(fd: int, target: str) -> None:
    """Give an O_TMPFILE file a name. os.link() can't: it does not follow the
    /proc/self/fd magic link, so linkat() is called directly."""
    dst = os.fsencode(target)
    # AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc route works for anyone.
    if _libc.linkat(fd, b"", AT_FDCWD, dst, AT_EMPTY_PATH) == 0:
        return
    if _libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, dst, AT_SYMLINK_FOLLOW) == 0:
        return
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), target)


SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range back now, without waiting for it,
    so the fsync at completion has little left to do (no-op where unsupported)."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the filesystem can't."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise IOFailure(f"punching a hole at offset {offset}: {os.strerror(err)}")


RENAME_EXCHANGE = 2
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def exchange(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)


RENAME_NOREPLACE = 1


def rename_noreplace(a: str, b: str) -> None:
    """Rename, failing with EEXIST if `b` exists: never replace what appeared there."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(err, os.strerror(err), b)
    if os.path.isdir(a):  # no renameat2 flags here: the best a directory can get
        if os.path.lexists(b):
            raise FileExistsError(errno.EEXIST, "File exists", b)
        os.rename(a, b)
    else:
        os.link(a, b)
        os.unlink(a)


def fsync_dir(path: str) -> None:
    """Make a rename or link in `path` durable."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise IOFailure(f"fsync of directory {path} failed: {e.strerror}") from None


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    """Make everything written to fd's filesystem durable: one call for a whole
    staging tree, where fsyncing each of a million files would take minutes and
    sync() would flush every filesystem on the host."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
