"""Writing the destination: an unnamed file that gets a name only when verified.

DEST is written through O_TMPFILE in its own directory, so even SIGKILL leaves
no half file with a name. Completion is fsync(file), link into place (or link to
a hidden name and rename over an existing DEST with --force), fsync(directory).
An fsync error fails the migration and is never retried: after a failed fsync
the kernel may already have dropped the dirty pages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass

from multifd_cli.common.fsutil import (
    exchange,
    fsync_dir,
    link_fd,
    rename_noreplace,
)
from multifd_cli.common.tables import SharedTable, pages_of, zero_hash
from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.wire import KIND_PAGES, Metadata

log = logging.getLogger("multifd")

HOLE_BIT = 1 << 31  # in a stamp: the page is known to be a hole in this file


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


HEADER_GUARD = 1 << 20  # on a device, the first MiB is written last


@dataclass
class BlockFile:
    """One block's open destination: where it goes and the fd the channels write."""

    name: str
    size: int
    kind: int
    fd: int = -1


class Destination:
    """The destination from the first check to a verified, durable, named copy.

    Three shapes, chosen by what arrives in LAYOUT:
    - a file: one block, written into an unnamed O_TMPFILE linked to DEST at the end
      (or, with --resume, an old copy updated in place);
    - a directory: several blocks and/or blobs, each an unnamed file until the end,
      when they are linked into a staging directory that replaces DEST in one rename;
    - a block device: written in place, never truncated or renamed, its first MiB
      zeroed at the start and written last, so an interrupted copy never looks like
      a valid filesystem.
    """

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
        self.shape = "file"
        self.blocks: list[BlockFile] = []
        self.shadow_fd = -1  # device only: the first MiB, held back until completion
        self._tmp_names: dict[int, str] = {}  # only where O_TMPFILE is unsupported
        self._lock_fd = -1
        self._sync_thread: threading.Thread | None = None
        self._sync_error: OSError | None = None
        self._sync_lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self.blocks[0].fd if self.blocks else -1

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(b.fd for b in self.blocks)

    @property
    def new_file(self) -> bool:
        """True when every block starts as an all-hole file this run created."""
        return self.shape != "device" and self.in_place is None

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
            if os.path.islink(self.path) and not self.force:
                raise UsageError(
                    f"destination {self.path} is a dangling symlink; use --force to replace it"
                ) from None
            return
        except OSError as e:
            raise UsageError(f"destination {self.path}: {e.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            if not self.force:
                raise UsageError(f"{self.path} is a block device; use --force to overwrite it")
            return
        if self.resume:
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"--resume: {self.path} is not a regular file")
            if os.path.isfile(self.path + ".partial") and not self.force:
                raise UsageError(
                    f"{self.path} and {self.path}.partial both exist: --resume would update "
                    "the .partial and then have to replace DEST; add --force for that"
                )
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
        key = hashlib.sha256(os.fsencode(os.path.realpath(self.path))).hexdigest()[:32]
        fd = os.open(os.path.join(lock_dir, key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another multifd recv is writing {self.path}") from None
        self._lock_fd = fd
        self._remove_strays()

    def _remove_strays(self) -> None:
        """Remove what a killed recv of this DEST left: a copy in the making under a
        hidden name (where O_TMPFILE is missing, or between naming steps) or a
        staging directory. Safe under DEST's lock: no other recv uses these names."""
        prefix = f".{self.name}.multifd-"
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for n in names:
            if n.startswith(prefix) and len(n) == len(prefix) + 8:
                log.info("removing %s, left by an earlier recv of %s", n, self.path)
                _remove(os.path.join(self.dir, n))

    def plan(self, blocks: list[tuple[str, int, int, int]]) -> None:
        """Pick the shape from LAYOUT's (name, size, allocated, kind) and check room."""
        is_device = os.path.exists(self.path) and stat.S_ISBLK(os.stat(self.path).st_mode)
        several = len(blocks) > 1 or any(kind != KIND_PAGES for _, _, _, kind in blocks)
        if is_device:
            if several:
                raise UsageError(f"{self.path} is a block device: it takes exactly one source")
            self.shape = "device"
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                capacity = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            if blocks[0][1] > capacity:
                raise IOFailure(
                    f"{self.path} holds {capacity} bytes, the source has {blocks[0][1]}"
                )
        elif several:
            if self.resume:
                raise UsageError("--resume works on one file, not on a directory DEST")
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise UsageError(f"{self.path} is a file; several sources need a directory DEST")
            self.shape = "dir"
        else:
            self.shape = "file"
            if os.path.isdir(self.path):
                raise UsageError(f"{self.path} is a directory; one source needs a file DEST")
        if self.shape != "device":
            old = self.find_old_copy() if self.shape == "file" else None
            need = 0
            for _, size, allocated, _ in blocks:
                need += min(size, allocated)
            if old:
                need = max(0, need - os.path.getsize(old))
            self.check_space(need)
        self.blocks = [BlockFile(name, size, kind) for name, size, _, kind in blocks]

    def check_space(self, needed: int) -> None:
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise IOFailure(
                f"not enough space in {self.dir}: need {needed} bytes, {free} are free"
            )

    def find_old_copy(self) -> str | None:
        """With --resume: DEST.partial if a failed run kept one, else DEST, else None."""
        if not self.resume:
            return None
        for candidate in (self.path + ".partial", self.path):
            if os.path.isfile(candidate):
                return candidate
        return None

    # -- during the session ----------------------------------------------------------
    def create(self) -> tuple[int, ...]:
        """Open every block's file and size it; no preallocation, so it stays sparse."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if self.shape == "device":
            b = self.blocks[0]
            try:
                b.fd = os.open(self.path, flags)
                self.shadow_fd = os.memfd_create("multifd-device-head", os.MFD_CLOEXEC)
                head = min(HEADER_GUARD, b.size)
                os.ftruncate(self.shadow_fd, head)
                # Until the end, the device must not look like a valid filesystem.
                os.pwrite(b.fd, bytes(head), 0)
                os.fsync(b.fd)
            except OSError as e:
                raise IOFailure(f"cannot prepare {self.path}: {e.strerror}") from None
            return self.fds
        if self.shape == "file":
            self.in_place = self.find_old_copy()
            if self.in_place is not None:
                try:
                    self.blocks[0].fd = os.open(self.in_place, flags)
                except OSError as e:
                    raise IOFailure(f"cannot open {self.in_place} to resume: {e.strerror}") from None
                log.info("resuming into %s", self.in_place)
                self.resize(0, self.blocks[0].size)
                return self.fds
        for i, b in enumerate(self.blocks):
            try:
                b.fd = os.open(self.dir, flags | os.O_TMPFILE, 0o600)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise IOFailure(f"cannot create a file in {self.dir}: {e.strerror}") from None
                # No O_TMPFILE here: a hidden name, removed on failure. Only SIGKILL
                # can leave it behind, and never under DEST's name.
                name = self._hidden()
                try:
                    b.fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600)
                except OSError as e2:
                    raise IOFailure(f"cannot create a file in {self.dir}: {e2.strerror}") from None
                self._tmp_names[i] = name
            self.resize(i, b.size)
        return self.fds

    def resize(self, block: int, size: int) -> None:
        b = self.blocks[block]
        b.size = size
        if self.shape == "device":
            return  # a device is never truncated; its size was checked up front
        try:
            os.ftruncate(b.fd, size)
        except OSError as e:
            raise IOFailure(f"cannot size {b.name} to {size} bytes: {e.strerror}") from None

    def background_flush(self) -> None:
        """Start writing back what the last pass wrote, so the final fsync is short."""
        with self._sync_lock:
            if self._sync_thread is not None and self._sync_thread.is_alive():
                return
            self._sync_thread = threading.Thread(target=self._datasync, daemon=True)
            self._sync_thread.start()

    def _datasync(self) -> None:
        try:
            for fd in self.fds:
                os.fdatasync(fd)
        except OSError as e:
            self._sync_error = e

    # -- completion ----------------------------------------------------------------------
    def finalize(self, metadata: dict[int, Metadata] | None = None) -> None:
        """fsync, name it, fsync the directory. Any error is final."""
        metadata = metadata or {}
        if self._sync_thread is not None:
            self._sync_thread.join()
        if self._sync_error is not None:
            raise IOFailure(f"writing back the destination failed: {self._sync_error.strerror}")
        try:
            if self.shape == "device":
                head = os.pread(self.shadow_fd, HEADER_GUARD, 0)
                os.fsync(self.fd)  # everything else is durable before the head lands
                os.pwrite(self.fd, head, 0)
            for i, b in enumerate(self.blocks):
                if i in metadata and self.shape != "device":  # never restyle a device node
                    apply_metadata(b.fd, metadata[i])
                elif self.shape != "device" and self.in_place is None:
                    os.fchmod(b.fd, 0o644 & ~_umask())
                os.fsync(b.fd)
        except OSError as e:
            raise IOFailure(f"fsync of the destination failed: {e.strerror}") from None
        naming: _Naming | None = None
        try:
            if self.shape == "file":
                naming = self._finish_file()
            elif self.shape == "dir":
                naming = self._publish_dir(self.path, replace=self.force)
            self._fsync_dir(self.dir)
        except BaseException:
            if naming is not None:
                naming.undo()  # an existing DEST is untouched on failure
            raise
        if naming is not None:
            naming.commit()

    def _finish_file(self) -> _Naming | None:
        if self.in_place is None:
            return self._publish(0, self.path, replace=self.force)
        if self.in_place != self.path:
            try:
                if self.force:
                    os.replace(self.in_place, self.path)
                else:
                    rename_noreplace(self.in_place, self.path)
            except FileExistsError:
                raise IOFailure(
                    f"{self.path} exists; resumed copy left as {self.in_place} (--force replaces)"
                ) from None
            except OSError as e:
                raise IOFailure(f"cannot rename {self.in_place} to {self.path}: {e.strerror}") from None
        return None

    def _hidden(self) -> str:
        """A name for a copy in the making; the next recv of this DEST removes strays."""
        return os.path.join(self.dir, f".{self.name}.multifd-{uuid.uuid4().hex[:8]}")

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fsync_dir(path)

    def _publish(self, block: int, target: str, *, replace: bool) -> _Naming:
        """Name block's file `target`; the caller commits or undoes."""
        fd = self.blocks[block].fd
        st = os.fstat(fd)
        aside = self._tmp_names.get(block)
        naming = _Naming(aside or self._hidden(), target, (st.st_dev, st.st_ino),
                         keep_aside=aside is not None)
        try:
            if aside is None:
                link_fd(fd, naming.aside)
            naming.place(replace)
            self._tmp_names.pop(block, None)
        except FileExistsError:
            naming.undo()
            raise IOFailure(f"{target} appeared during the migration; not replacing it") from None
        except OSError as e:
            naming.undo()
            raise IOFailure(f"cannot name the destination {target}: {e.strerror}") from None
        except BaseException:
            naming.undo()
            raise
        return naming

    def _publish_dir(self, target: str, *, replace: bool) -> _Naming:
        """Name every block inside a staging directory, then put it in place in one step."""
        staging = self._hidden()
        naming: _Naming | None = None
        try:
            os.mkdir(staging, 0o755)
            st = os.lstat(staging)
            naming = _Naming(staging, target, (st.st_dev, st.st_ino), keep_aside=False)
            dirs = {staging}
            for i, b in enumerate(self.blocks):
                path = os.path.join(staging, b.name)
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                dirs.add(parent)
                tmp = self._tmp_names.pop(i, None)
                if tmp is None:
                    link_fd(b.fd, path)
                else:
                    os.rename(tmp, path)
            for d in sorted(dirs, key=len, reverse=True):
                self._fsync_dir(d)
            naming.place(replace)
        except BaseException as e:
            if naming is not None:
                naming.undo()
            else:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, FileExistsError):
                raise IOFailure(f"{target} appeared during the migration; not replacing it") from None
            if isinstance(e, OSError):
                raise IOFailure(
                    f"cannot put the destination directory in place: {e.strerror}"
                ) from None
            raise
        return naming

    def discard(self) -> None:
        """On failure: keep the copy as DEST.partial only if asked; else it vanishes."""
        if not self.blocks or self.blocks[0].fd < 0:
            return
        if self.shape == "device":
            log.info("%s: its first MiB stays zeroed, so it does not look like a valid copy", self.path)
            return
        if self.in_place is not None:
            log.info("%s keeps what was copied so far; run recv --resume again", self.in_place)
            return
        if self.keep_partial:
            try:
                if self.shape == "dir":
                    self._publish_dir(self.path + ".partial", replace=True).commit()
                else:
                    self._publish(0, self.path + ".partial", replace=True).commit()
                log.info("kept the incomplete copy as %s.partial", self.path)
            except Exception as e:  # noqa: BLE001 - failing already; say so and go on
                log.warning("could not keep %s.partial: %s", self.path, e)
        for name in self._tmp_names.values():
            with contextlib.suppress(OSError):
                os.unlink(name)
        self._tmp_names.clear()

    def close(self) -> None:
        for b in self.blocks:
            if b.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(b.fd)
                b.fd = -1
        if self.shadow_fd >= 0:
            os.close(self.shadow_fd)
            self.shadow_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _Naming:
    """Put a finished copy, already named `aside`, at `target`.

    What was at `target` survives (swapped to `aside`) until commit(), so a
    failure up to and including the directory fsync can undo() the whole
    step. Where our copy is, is read from inodes, not from which step ran:
    undo() is right whatever step a signal interrupted.
    """

    def __init__(self, aside: str, target: str, key: tuple[int, int], keep_aside: bool) -> None:
        self.aside = aside
        self.target = target
        self.key = key  # (st_dev, st_ino) of our copy
        self.keep_aside = keep_aside  # `aside` is our only name for the copy: undo keeps it

    def _ours(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.key

    def place(self, replace: bool) -> None:
        if not replace:
            rename_noreplace(self.aside, self.target)
            return
        try:
            exchange(self.aside, self.target)
        except FileNotFoundError:
            rename_noreplace(self.aside, self.target)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.replace(self.aside, self.target)  # no RENAME_EXCHANGE: cannot be undone

    def undo(self) -> None:
        """Put back what was at `target` (if anything); our copy returns to `aside`,
        or goes if `aside` was only a name made for this step."""
        with contextlib.suppress(OSError):
            if self._ours(self.target):
                if not os.path.lexists(self.aside):
                    os.rename(self.target, self.aside)
                elif not self._ours(self.aside):
                    exchange(self.aside, self.target)  # the old copy goes back
                else:
                    _remove(self.target)  # a second name of ours
            if self._ours(self.aside) and not self.keep_aside:
                _remove(self.aside)

    def commit(self) -> None:
        """Drop what the exchange swapped out."""
        if os.path.lexists(self.aside) and not self._ours(self.aside):
            _remove(self.aside)


def _remove(path: str) -> None:
    """Remove what an exchange swapped out, a directory or a file."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def apply_metadata(fd: int, m: Metadata) -> None:
    """--preserve: mode, owner (as root), extended attributes, then mtime last."""
    if os.geteuid() == 0:
        os.fchown(fd, m.uid, m.gid)  # first: chown clears setuid/setgid bits
    os.fchmod(fd, m.mode & 0o7777)
    for name, value in m.xattrs:
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            log.warning("cannot set xattr %s: %s", name.decode(errors="replace"), e.strerror)
    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
