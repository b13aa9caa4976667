"""Writing a `file:` image: the channels' sink (pwrite at each page's fixed
offset), and the hidden file that is renamed to IMAGE only once complete.

The format itself is in layout.py; docs/file-format.md is the reference.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import uuid
from typing import Sequence

from multifd_cli import wire as P
from multifd_cli.common.tables import SharedTable, pages_of
from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.image.layout import IMAGE_COMPLETE, ImageLayout

log = logging.getLogger("multifd")


class ImageSink:
    """A channel's PacketSink for `file:`: pages go to their fixed offsets.

    Presence is tracked in a shared u8-per-page table (one writer per page per
    epoch, like every table), and becomes the bitmap at completion.
    """

    def __init__(self, fd: int, layout: ImageLayout, present: Sequence[SharedTable]) -> None:
        self.fd = fd
        self.layout = layout
        self.present = present
        self.epoch = 0
        self.epoch_counts = P.Counts()
        self.wire_bytes = 0
        self.payload_bytes = 0

    def send_pages(self, block: int, normal_offsets: list[int], zero_offsets: list[int],
                   hashes: list[int], payload: list[memoryview | bytes]) -> None:
        b = self.layout.blocks[block]
        ps = self.layout.page_size
        bits = self.present[block].view
        data = memoryview(payload[0] if len(payload) == 1 else b"".join(payload))
        pos = 0
        for off in normal_offsets:
            if off // ps >= b.capacity:
                raise IOFailure(f"{b.name} grew past its size at the start; file: images have a fixed layout")
            n = min(ps, len(data) - pos)
            self._pwrite(data[pos : pos + n], b.data_offset + off)
            bits[off // ps] = 1
            pos += n
        for off in zero_offsets:
            if off // ps >= b.capacity:
                raise IOFailure(f"{b.name} grew past its size at the start; file: images have a fixed layout")
            if bits[off // ps]:
                from multifd_cli.common import fsutil  # loads libc: only when needed

                if not fsutil.punch_hole(self.fd, b.data_offset + off, ps):
                    self._pwrite(memoryview(bytes(ps)), b.data_offset + off)
                bits[off // ps] = 0
        self.wire_bytes += pos
        self.payload_bytes += pos
        self.epoch_counts += P.Counts(1, len(normal_offsets), len(zero_offsets))

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:
                raise IOFailure(f"writing the image at offset {offset}: {e.strerror}") from None
            data, offset = data[n:], offset + n

    def send_sync(self, epoch: int) -> P.Counts:
        counts, self.epoch_counts = self.epoch_counts, P.Counts()
        return counts

    def heartbeat_if_idle(self, interval: float) -> None:
        """Nothing listens to a file: no heartbeats."""


def _final_path(path: str) -> str:
    """Where the image gets its name: through a symlink, as opening it did."""
    return os.path.realpath(path)


def create_image(path: str, layout: ImageLayout) -> tuple[int, str]:
    """Write the incomplete header into a hidden file beside IMAGE and size it
    (sparsely); return its fd and hidden name.

    IMAGE itself is left alone until complete_image() renames the new image over
    it, so a send that fails keeps an existing, complete image intact. The hidden
    file is flocked for as long as its fd is open, so the next send can tell what
    a killed send left (unlocked: removed) from the image of one still running
    (locked: refused).
    """
    final = _final_path(path)
    directory, base = os.path.split(final)
    try:
        if os.path.isdir(final):  # or the rename at the very end would fail
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if os.path.exists(final) and not stat.S_ISREG(os.stat(final).st_mode):
            raise UsageError(f"image {path} exists and is not a regular file; not replacing it")
        _remove_strays(directory, base, path)
        fd, tmp = _create_locked(directory, base)
    except OSError as e:
        raise IOFailure(f"cannot create image {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, layout.end)
        os.pwrite(fd, layout.encode(), 0)
    except OSError as e:
        os.close(fd)
        discard_image(tmp)
        raise IOFailure(f"cannot create image {path}: {e.strerror}") from None
    return fd, tmp


def _stray_names(directory: str, base: str) -> list[str]:
    prefix = f".{base}.multifd-"
    return [n for n in os.listdir(directory) if n.startswith(prefix) and len(n) == len(prefix) + 8]


def _remove_strays(directory: str, base: str, path: str) -> None:
    """Remove hidden images that killed sends left; refuse if a live send holds one."""
    for name in _stray_names(directory, base):
        stray = os.path.join(directory, name)
        try:
            fd = os.open(stray, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"another multifd send is writing the image {path}") from None
            log.info("removing %s, left by an earlier send to %s", name, path)
            with contextlib.suppress(OSError):
                os.unlink(stray)
        finally:
            os.close(fd)


def _create_locked(directory: str, base: str) -> tuple[int, str]:
    """A new hidden file that is locked before it has a name, where O_TMPFILE
    allows; elsewhere it is locked right after O_EXCL created it."""
    tmp = os.path.join(directory, f".{base}.multifd-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            raise
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, tmp
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644 & ~_umask())
        from multifd_cli.common.fsutil import link_fd  # loads libc: only now, and only here

        link_fd(fd, tmp)
    except BaseException:
        os.close(fd)
        raise
    return fd, tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def complete_image(fd: int, tmp: str, path: str, layout: ImageLayout, sizes: Sequence[int],
                   present: Sequence[SharedTable], digest: bytes) -> None:
    """Bitmaps, fsync, then the header that says COMPLETE, fsync again; only then
    rename the hidden file to IMAGE, replacing an old image, and fsync the directory."""
    try:
        for b, size, table in zip(layout.blocks, sizes, present):
            n = pages_of(size, layout.page_size)
            flags = table.view[:n].tolist()
            bitmap = bytearray(-(-n // 8))
            for i, bit in enumerate(flags):
                if bit:
                    bitmap[i >> 3] |= 1 << (i & 7)
            os.pwrite(fd, bytes(bitmap), b.bitmap_offset)
            b.size = size
        os.fsync(fd)
        layout.flags = IMAGE_COMPLETE
        layout.digest = digest
        os.pwrite(fd, layout.encode(), 0)
        os.fsync(fd)
    except OSError as e:
        raise IOFailure(f"completing the image failed: {e.strerror}") from None
    final = _final_path(path)
    try:
        os.replace(tmp, final)
    except OSError as e:
        raise IOFailure(f"cannot name the image {path}: {e.strerror}") from None
    from multifd_cli.common.fsutil import fsync_dir  # loads libc: only now, and only here

    fsync_dir(os.path.dirname(final))


def discard_image(tmp: str) -> None:
    """Remove the hidden file of an image that was never completed."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)
