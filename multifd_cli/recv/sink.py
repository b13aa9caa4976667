"""Writing the destination: an unnamed file that gets a name only when verified.

DEST is written through O_TMPFILE in its own directory, so even SIGKILL leaves
no half file with a name. Completion is fsync(file), link into place (or link to
a hidden name and rename over an existing DEST with --force), fsync(directory).
An fsync error fails the migration and is never retried: after a failed fsync
the kernel may already have dropped the dirty pages.

Destination puts the pieces together: the lock (destlock.py), the block files
(blockfiles.py), the naming (naming.py) and the metadata (metadata.py).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from functools import partial

from multifd_cli.common.fsutil import fsync_dir, rename_noreplace
from multifd_cli.common.tables import SharedTable, pages_of, zero_hash
from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.recv.blockfiles import BlockFile, BlockFiles, Writeback
from multifd_cli.recv.destlock import DestLock
from multifd_cli.recv.metadata import apply_default_mode, apply_metadata
from multifd_cli.recv.naming import Naming, publish_dir, publish_file
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
        self._lock = DestLock(self.path)
        self.files = BlockFiles(self.path, self._lock.hidden_name)
        self._writeback = Writeback()

    @property
    def shape(self) -> str:
        return self.files.shape

    @property
    def fd(self) -> int:
        return self.files.blocks[0].fd if self.files.blocks else -1

    @property
    def fds(self) -> tuple[int, ...]:
        return self.files.fds

    @property
    def shadow_fd(self) -> int:
        return self.files.shadow_fd

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
        """Make sure no other recv writes this DEST, and clear what a killed one left."""
        self._lock.acquire()

    def plan(self, blocks: list[tuple[str, int, int, int]]) -> None:
        """Pick the shape from LAYOUT's (name, size, allocated, kind) and check room."""
        is_device = os.path.exists(self.path) and stat.S_ISBLK(os.stat(self.path).st_mode)
        several = len(blocks) > 1 or any(kind != KIND_PAGES for _, _, _, kind in blocks)
        if is_device:
            if several:
                raise UsageError(f"{self.path} is a block device: it takes exactly one source")
            self.files.shape = "device"
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
            self.files.shape = "dir"
        else:
            self.files.shape = "file"
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
        self.files.blocks = [BlockFile(name, size, kind) for name, size, _, kind in blocks]

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
        if self.shape == "device":
            self.files.prepare_device()
        elif self.shape == "file" and (old := self.find_old_copy()) is not None:
            self.in_place = old
            self.files.open_old_copy(old)
        else:
            self.files.create_unnamed()
        return self.fds

    def resize(self, block: int, size: int) -> None:
        self.files.resize(block, size)

    def background_flush(self) -> None:
        """Start writing back what the last pass wrote, so the final fsync is short."""
        self._writeback.start(self.fds)

    @property
    def flush_us(self) -> int:
        """How long the last background flush took (EPOCH_ACK); 0 before the first."""
        return self._writeback.last_us

    def hidden_name(self) -> str:
        """A fresh hidden name beside DEST that the next recv of DEST cleans up."""
        return self._lock.hidden_name()

    # -- completion ----------------------------------------------------------------------
    def finalize(self, metadata: dict[int, Metadata] | None = None) -> None:
        """fsync, name it, fsync the directory. Any error is final."""
        metadata = metadata or {}
        self._writeback.wait()
        try:
            if self.shape == "device":
                self.files.land_device_head()  # everything else is durable before the head
            for i, b in enumerate(self.files.blocks):
                if i in metadata and self.shape != "device":  # never restyle a device node
                    apply_metadata(b.fd, metadata[i])
                elif self.shape != "device" and self.in_place is None:
                    apply_default_mode(b.fd)
                os.fsync(b.fd)
        except OSError as e:
            raise IOFailure(f"fsync of the destination failed: {e.strerror}") from None
        naming: Naming | None = None
        try:
            if self.shape == "file":
                naming = self._finish_file()
            elif self.shape == "dir":
                naming = self._publish_dir(self.path, replace=self.force)
            fsync_dir(self.dir)
        except BaseException:
            if naming is not None:
                naming.undo()  # an existing DEST is untouched on failure
            raise
        if naming is not None:
            naming.commit()

    def _finish_file(self) -> Naming | None:
        if self.in_place is None:
            return self._publish(self.path, replace=self.force)
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

    def _publish(self, target: str, *, replace: bool) -> Naming:
        """Name the one block's file `target`; the caller commits or undoes."""
        files = self.files
        naming = publish_file(files.blocks[0].fd, files.tmp_names.get(0),
                              self._lock.hidden_name(), target, replace=replace)
        files.take_hidden(0)
        return naming

    def _publish_dir(self, target: str, *, replace: bool) -> Naming:
        """Name every block inside a staging directory, then put it in place in one step."""
        files = self.files
        members = [
            (b.name, b.fd, partial(files.take_hidden, i))
            for i, b in enumerate(files.blocks)
        ]
        return publish_dir(members, self._lock.hidden_name(), target, replace=replace)

    def discard(self) -> None:
        """On failure: keep the copy as DEST.partial only if asked; else it vanishes."""
        if not self.files.opened:
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
                    self._publish(self.path + ".partial", replace=True).commit()
                log.info("kept the incomplete copy as %s.partial", self.path)
            except Exception as e:  # noqa: BLE001 - failing already; say so and go on
                log.warning("could not keep %s.partial: %s", self.path, e)
        self.files.remove_hidden()

    def close(self) -> None:
        self.files.close()
        self._lock.release()
