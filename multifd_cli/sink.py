"""Writing the destination: an unnamed file that gets a name only when verified.

DEST is written through O_TMPFILE in its own directory, so even SIGKILL leaves
no half file with a name. Completion is fsync(file), link into place (or link to
a hidden name and rename over an existing DEST with --force), fsync(directory).
An fsync error fails the migration and is never retried: after a failed fsync
the kernel may already have dropped the dirty pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass

from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.tables import SharedTable, pages_of, zero_hash

log = logging.getLogger("multifd")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
HOLE_BIT = 1 << 31  # in a stamp: the page is known to be a hole in this file

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
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


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the filesystem can't."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise IOFailure(f"punching a hole at offset {offset}: {os.strerror(err)}")


@dataclass
class DestTables:
    """What the destination wrote and verified: a hash and an epoch stamp per page."""

    page_hash: SharedTable
    stamp: SharedTable

    @classmethod
    def create(cls, name: str, size: int, page_size: int) -> DestTables:
        n = pages_of(size, page_size)
        t = cls(SharedTable(f"{name}-dhash", "Q", n), SharedTable(f"{name}-stamp", "I", n))
        t.resize(0, size, page_size)
        return t

    def resize(self, old_size: int, new_size: int, page_size: int) -> None:
        """Follow the source's size. Pages that only now exist are holes: they hash
        as zeros and carry stamp 0. Pages past a shrunken end are forgotten. The
        page straddling either end is stale until the source resends it, which it
        does because it invalidated that chunk."""
        n_old = pages_of(old_size, page_size)
        n_new = pages_of(new_size, page_size)
        self.page_hash.ensure(n_new)
        self.stamp.ensure(n_new)
        if n_new < n_old:
            self.stamp.fill(n_new, self.stamp.capacity, 0)
            return
        full_end = new_size // page_size
        self.page_hash.fill(n_old, full_end, zero_hash(page_size))
        if full_end < n_new and full_end >= n_old:
            self.page_hash.view[full_end] = zero_hash(new_size - full_end * page_size)
        self.stamp.fill(n_old, n_new, 0)

    def refresh(self) -> None:
        self.page_hash.refresh()
        self.stamp.refresh()

    def close(self) -> None:
        self.page_hash.close()
        self.stamp.close()


class Destination:
    """One destination file from first check to verified, durable, named copy."""

    def __init__(self, path: str, *, force: bool, keep_partial: bool, resume: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.resume = resume
        # With --resume, the old copy (DEST.partial if kept, else DEST) is
        # written in place: the one exception to the unnamed-file rule.
        self.in_place: str | None = None
        self.dir = os.path.dirname(self.path)
        self.name = os.path.basename(self.path)
        self.force = force
        self.keep_partial = keep_partial
        self.fd = -1
        self._tmp_name: str | None = None  # only where O_TMPFILE is unsupported
        self._lock_fd = -1
        self._sync_thread: threading.Thread | None = None
        self._sync_error: OSError | None = None
        self._sync_lock = threading.Lock()

    # -- before the session --------------------------------------------------------
    def check(self) -> None:
        """Refuse a DEST we must not touch, before anything listens."""
        if not self.name:
            raise UsageError(f"destination {self.path!r} is not a file name")
        if not os.path.isdir(self.dir):
            raise UsageError(f"destination directory {self.dir} does not exist")
        if not os.access(self.dir, os.W_OK):
            raise UsageError(f"destination directory {self.dir} is not writable")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"destination {self.path} is a directory")
        if self.resume:
            return
        if not self.force:
            raise UsageError(f"destination {self.path} exists; use --force to replace it")

    def lock(self) -> None:
        """flock a per-DEST lock file, so two recv processes never share a DEST.

        The lock file lives in a runtime directory, keyed by DEST's real path, and
        is never removed: removing lock files races with their next user.
        """
        lock_dir = os.path.join(tempfile.gettempdir(), f"multifd-locks-{os.getuid()}")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        key = hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()[:32]
        fd = os.open(os.path.join(lock_dir, key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another multifd recv is writing {self.path}") from None
        self._lock_fd = fd

    def check_space(self, needed: int) -> None:
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise IOFailure(
                f"not enough space in {self.dir}: need {needed} bytes, {free} are free"
            )

    # -- during the session ----------------------------------------------------------
    def find_old_copy(self) -> str | None:
        """With --resume: DEST.partial if a failed run kept one, else DEST, else None."""
        if not self.resume:
            return None
        for candidate in (self.path + ".partial", self.path):
            if os.path.isfile(candidate):
                return candidate
        return None

    def create(self, size: int) -> int:
        """Open the unnamed file and size it; no preallocation, so it stays sparse."""
        flags = os.O_RDWR | os.O_CLOEXEC
        self.in_place = self.find_old_copy()
        if self.in_place is not None:
            try:
                self.fd = os.open(self.in_place, flags)
            except OSError as e:
                raise IOFailure(f"cannot open {self.in_place} to resume: {e.strerror}") from None
            log.info("resuming into %s", self.in_place)
            self.resize(size)
            return self.fd
        try:
            self.fd = os.open(self.dir, flags | os.O_TMPFILE, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise IOFailure(f"cannot create a file in {self.dir}: {e.strerror}") from None
            # No O_TMPFILE here: a hidden name, removed on failure. Only SIGKILL
            # can leave it behind, and never under DEST's name.
            self._tmp_name = os.path.join(self.dir, f".{self.name}.multifd-{uuid.uuid4().hex[:8]}")
            self.fd = os.open(self._tmp_name, flags | os.O_CREAT | os.O_EXCL, 0o600)
        self.resize(size)
        return self.fd

    def resize(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise IOFailure(f"cannot size the destination to {size} bytes: {e.strerror}") from None

    def background_flush(self) -> None:
        """Start writing back what the last pass wrote, so the final fsync is short."""
        with self._sync_lock:
            if self._sync_thread is not None and self._sync_thread.is_alive():
                return
            self._sync_thread = threading.Thread(target=self._datasync, daemon=True)
            self._sync_thread.start()

    def _datasync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self._sync_error = e

    # -- completion ----------------------------------------------------------------------
    def finalize(self, mode: int = 0o644) -> None:
        """fsync, name it, fsync the directory. Any error is final."""
        if self._sync_thread is not None:
            self._sync_thread.join()
        if self._sync_error is not None:
            raise IOFailure(f"writing back the destination failed: {self._sync_error.strerror}")
        try:
            if self.in_place is None:
                os.fchmod(self.fd, mode & ~_umask())
            os.fsync(self.fd)
        except OSError as e:
            raise IOFailure(f"fsync of the destination failed: {e.strerror}") from None
        if self.in_place is None:
            self._publish(self.path, replace=self.force)
        elif self.in_place != self.path:
            if os.path.lexists(self.path) and not self.force:
                raise IOFailure(f"{self.path} exists; resumed copy left as {self.in_place} (--force replaces)")
            try:
                os.replace(self.in_place, self.path)
            except OSError as e:
                raise IOFailure(f"cannot rename {self.in_place} to {self.path}: {e.strerror}") from None
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise IOFailure(f"fsync of directory {self.dir} failed: {e.strerror}") from None

    def _publish(self, target: str, *, replace: bool) -> None:
        try:
            if self._tmp_name is not None:
                if not replace and os.path.lexists(target):
                    raise FileExistsError(errno.EEXIST, "File exists")
                os.replace(self._tmp_name, target)
                self._tmp_name = None
                return
            if not replace:
                link_fd(self.fd, target)
                return
            hidden = os.path.join(self.dir, f".{self.name}.multifd-{uuid.uuid4().hex[:8]}")
            link_fd(self.fd, hidden)
            try:
                os.replace(hidden, target)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(hidden)
                raise
        except FileExistsError:
            raise IOFailure(f"{target} appeared during the migration; not replacing it") from None
        except OSError as e:
            raise IOFailure(f"cannot name the destination {target}: {e.strerror}") from None

    def discard(self) -> None:
        """On failure: keep the copy as DEST.partial only if asked; else it vanishes."""
        if self.fd < 0:
            return
        if self.in_place is not None:
            log.info("%s keeps what was copied so far; run recv --resume again", self.in_place)
            return
        if self.keep_partial:
            try:
                self._publish(self.path + ".partial", replace=True)
                log.info("kept the incomplete copy as %s.partial", self.path)
            except Exception as e:  # noqa: BLE001 - failing already; say so and go on
                log.warning("could not keep %s.partial: %s", self.path, e)
        if self._tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_name)
            self._tmp_name = None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
