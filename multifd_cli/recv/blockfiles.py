"""The destination's open files: one per block, created unnamed, sized to the source.

The channels pwrite these fds (inherited when they fork); main creates them,
follows the source's size changes, and makes them durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from multifd_cli.errors import IOFailure

log = logging.getLogger("multifd")

HEADER_GUARD = 1 << 20  # on a device, the first MiB is written last


@dataclass
class BlockFile:
    """One block's open destination: where it goes and the fd the channels write."""

    name: str
    size: int
    kind: int
    fd: int = -1


class BlockFiles:
    """The block files from creation to close, in one of three shapes:
    "file" (one block), "dir" (several blocks or blobs) or "device".

    Where O_TMPFILE is missing, a file is created under a hidden name instead,
    remembered here until it is published or removed.
    """

    def __init__(self, path: str, hidden_name: Callable[[], str]) -> None:
        self.path = path
        self.dir = os.path.dirname(path)
        self.hidden_name = hidden_name
        self.shape = "file"
        self.blocks: list[BlockFile] = []
        self.shadow_fd = -1  # device only: the first MiB, held back until completion
        self.tmp_names: dict[int, str] = {}  # block -> its hidden name, if it has one

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(b.fd for b in self.blocks)

    @property
    def opened(self) -> bool:
        return bool(self.blocks) and self.blocks[0].fd >= 0

    def prepare_device(self) -> None:
        """Open the device, and zero its first MiB: until the end, it must not
        look like a valid filesystem. Writes there go to a memfd meanwhile."""
        b = self.blocks[0]
        try:
            b.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.shadow_fd = os.memfd_create("multifd-device-head", os.MFD_CLOEXEC)
            head = min(HEADER_GUARD, b.size)
            os.ftruncate(self.shadow_fd, head)
            os.pwrite(b.fd, bytes(head), 0)
            os.fsync(b.fd)
        except OSError as e:
            raise IOFailure(f"cannot prepare {self.path}: {e.strerror}") from None

    def open_old_copy(self, old: str) -> None:
        """--resume: write the old copy in place, sized to the source."""
        try:
            self.blocks[0].fd = os.open(old, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise IOFailure(f"cannot open {old} to resume: {e.strerror}") from None
        log.info("resuming into %s", old)
        self.resize(0, self.blocks[0].size)

    def create_unnamed(self) -> None:
        """Every block a new file without a name; no preallocation, so it stays sparse."""
        flags = os.O_RDWR | os.O_CLOEXEC
        for i, b in enumerate(self.blocks):
            try:
                b.fd = os.open(self.dir, flags | os.O_TMPFILE, 0o600)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise IOFailure(f"cannot create a file in {self.dir}: {e.strerror}") from None
                # No O_TMPFILE here: a hidden name, removed on failure. Only SIGKILL
                # can leave it behind, and never under DEST's name.
                name = self.hidden_name()
                try:
                    b.fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600)
                except OSError as e2:
                    raise IOFailure(f"cannot create a file in {self.dir}: {e2.strerror}") from None
                self.tmp_names[i] = name
            self.resize(i, b.size)

    def resize(self, block: int, size: int) -> None:
        b = self.blocks[block]
        b.size = size
        if self.shape == "device":
            return  # a device is never truncated; its size was checked up front
        try:
            os.ftruncate(b.fd, size)
        except OSError as e:
            raise IOFailure(f"cannot size {b.name} to {size} bytes: {e.strerror}") from None

    def land_device_head(self) -> None:
        """The device's first MiB goes last, once everything else is durable."""
        head = os.pread(self.shadow_fd, HEADER_GUARD, 0)
        os.fsync(self.blocks[0].fd)
        os.pwrite(self.blocks[0].fd, head, 0)

    def take_hidden(self, block: int) -> str | None:
        """Hand over a block's hidden name (it is being published)."""
        return self.tmp_names.pop(block, None)

    def remove_hidden(self) -> None:
        for name in self.tmp_names.values():
            with contextlib.suppress(OSError):
                os.unlink(name)
        self.tmp_names.clear()

    def close(self) -> None:
        for b in self.blocks:
            if b.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(b.fd)
                b.fd = -1
        if self.shadow_fd >= 0:
            os.close(self.shadow_fd)
            self.shadow_fd = -1


class Writeback:
    """fdatasync in a thread after each pass, so the final fsync, which falls
    inside the downtime, finds little left to write. Its error is kept and
    raised at completion: a failed fsync is never retried. How long the last one
    took goes to the source in EPOCH_ACK."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self._lock = threading.Lock()
        self.last_us = 0  # duration of the last flush that finished; 0 before the first

    def start(self, fds: tuple[int, ...], sync: Callable[[int], None] = os.fdatasync) -> None:
        """Start one, unless the last one is still running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._datasync, args=(fds, sync), daemon=True)
            self._thread.start()

    def _datasync(self, fds: tuple[int, ...], sync: Callable[[int], None]) -> None:
        t0 = time.monotonic()
        try:
            for fd in fds:
                sync(fd)
        except OSError as e:
            self._error = e
        self.last_us = round((time.monotonic() - t0) * 1e6)

    def join(self) -> None:
        """Wait for the last one, whatever became of it (before closing its fds)."""
        if self._thread is not None:
            self._thread.join()

    def wait(self) -> None:
        """Join the last one; raise its error."""
        self.join()
        if self._error is not None:
            raise IOFailure(f"writing back the destination failed: {self._error.strerror}")
