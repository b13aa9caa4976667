"""Writes that bypass the page cache: block-layer events mapped back to file offsets.

An O_DIRECT writer dirties no folio, so the folio event never sees it. The
block layer does: block_bio_queue when the write is submitted and
block_rq_complete when it is on the device. A pass reads through the page
cache, so only a completed write is sure to be seen by a read; a write queued
before the marker but completed after it is reported again by its completion
event, which lands in a later window.

Send's own writeback at each pass start also reaches the block layer. Its bios
are filtered out in the kernel by thread id, and a completion is reported only
when it overlaps a write someone else queued, so buffered writes are not
reported a second time one pass later.

A block-device source needs no FIEMAP: its offsets are its own sectors. Its
buffered writes dirty the device's own page cache, whose inode number is the
device number, so the folio event covers those.

Both events carry the whole disk's device and whole-disk sectors (a partition's
bios are remapped before they are traced), while FIEMAP gives physical offsets
relative to the filesystem's own device, the partition. So the partition's start
(/sys/class/block/NAME/start, in 512-byte sectors) is added before matching.

FIEMAP is trusted only where extents hold still: an extent that is shared
(reflinked), encoded, inline or of unknown location makes the path refuse, and
the caller keeps the hash tracker for that source.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import re
import struct
from dataclasses import dataclass

SECTOR = 512
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("<QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct(
    "<QQQQQIIII"
)  # logical, physical, length, 2 reserved, flags, 3 reserved
_BATCH = 256
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_DELALLOC = 0x4
# Extents whose disk location a write could change or that have none of their own.
_UNSTABLE = {
    0x2: "of unknown location",
    0x8: "encoded",
    0x80: "encrypted",
    0x200: "inline",
    0x400: "packed with other files",
    0x2000: "shared (reflinked): copy-on-write moves them",
}

QUEUE_EVENT = "block/block_bio_queue"
COMPLETE_EVENT = "block/block_rq_complete"
_QUEUE = re.compile(r"^(\d+),(\d+) (\S*) (\d+) \+ (\d+) \[")
_COMPLETE = re.compile(r"^(\d+),(\d+) (\S*) \(.*?\) (\d+) \+ (\d+) ")


class DirectUnavailable(Exception):
    """The block-layer path cannot cover this source; the message says why."""


@dataclass(frozen=True)
class Bio:
    ts_us: int
    dev: int  # os.makedev form
    sector: int
    sectors: int
    completion: bool
    pid: int  # the thread that queued it (for a completion, whoever ran the interrupt)

    def overlaps(self, other: Bio) -> bool:
        return (
            self.dev == other.dev
            and self.sector < other.sector + other.sectors
            and other.sector < self.sector + self.sectors
        )


def parse_bio(ts_us: int, pid: int, body: str, completion: bool) -> Bio | None:
    """A write's disk range from a queue or completion line; None for reads and flushes."""
    m = (_COMPLETE if completion else _QUEUE).match(body)
    if m is None:
        raise ValueError(body)
    rwbs, n = m.group(3), int(m.group(5))
    # W: write (WZ: write zeroes); D: discard, which unmaps blocks like a punch.
    if n == 0 or not ("W" in rwbs or rwbs.startswith("D")):
        return None
    dev = os.makedev(int(m.group(1)), int(m.group(2)))
    return Bio(ts_us, dev, int(m.group(4)), n, completion, pid)


def kernel_dev(dev: int) -> int:
    """The dev_t encoding the tracepoints' `dev` field filters on (major << 20 | minor)."""
    return (os.major(dev) << 20) | os.minor(dev)


@dataclass(frozen=True)
class Disk:
    """Where a filesystem device's sectors sit on the disk the block events name."""

    disk_dev: int
    start_sector: int


def disk_of(fs_dev: int) -> Disk:
    """The whole disk under a filesystem's device and the partition's start on it."""
    base = f"/sys/dev/block/{os.major(fs_dev)}:{os.minor(fs_dev)}"
    if not os.path.isdir(base):
        raise DirectUnavailable(
            f"device {os.major(fs_dev)}:{os.minor(fs_dev)} is not a block device"
        )
    real = os.path.realpath(base)
    if not os.path.exists(os.path.join(real, "partition")):
        return Disk(fs_dev, 0)
    with open(os.path.join(real, "start")) as f:
        start = int(f.read())
    with open(os.path.join(os.path.dirname(real), "dev")) as f:
        major, minor = f.read().strip().split(":")
    return Disk(os.makedev(int(major), int(minor)), start)


def fiemap(fd: int) -> list[tuple[int, int, int]]:
    """(logical, physical, length) in bytes for every extent; refuses unstable ones."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _BATCH)
        _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * i
            )
            start = logical + length
            last = bool(flags & FIEMAP_EXTENT_LAST)
            if flags & FIEMAP_EXTENT_DELALLOC:
                # Dirty pages with no block yet (and so "unknown"): no bio can reach them
                # until writeback allocates, and FIEMAP is re-read after that.
                continue
            for bit, why in _UNSTABLE.items():
                if flags & bit:
                    raise DirectUnavailable(f"an extent is {why}")
            out.append((logical, physical, length))
        if last:
            return out


class ExtentMap:
    """Disk byte ranges of one file, sorted, for mapping block events back to offsets."""

    def __init__(self, fd: int, disk: Disk) -> None:
        self.fd = fd
        self.disk = disk
        self._starts: list[int] = []
        self._extents: list[tuple[int, int, int]] = []  # disk start, disk end, logical

    def refresh(self) -> None:
        """Re-read FIEMAP: writes into holes or unwritten space allocate new extents."""
        base = self.disk.start_sector * SECTOR
        ext = sorted((base + p, base + p + n, lo) for lo, p, n in fiemap(self.fd))
        self._extents = ext
        self._starts = [e[0] for e in ext]

    def map(self, bio: Bio) -> list[tuple[int, int]]:
        """File byte ranges a disk write touched."""
        lo = bio.sector * SECTOR
        hi = lo + bio.sectors * SECTOR
        out = []
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        while i < len(self._extents) and self._extents[i][0] < hi:
            ds, de, logical = self._extents[i]
            s, e = max(lo, ds), min(hi, de)
            if s < e:
                out.append((logical + s - ds, logical + e - ds))
            i += 1
        return out


class DeviceMap:
    """A block-device source: its byte offsets are its sectors, past its partition start."""

    def __init__(self, fd: int, disk: Disk) -> None:
        self.fd = fd
        self.disk = disk

    def refresh(self) -> None:
        """Nothing moves on a device."""

    def map(self, bio: Bio) -> list[tuple[int, int]]:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        lo = (bio.sector - self.disk.start_sector) * SECTOR
        hi = lo + bio.sectors * SECTOR
        lo, hi = max(lo, 0), min(hi, size)
        return [(lo, hi)] if lo < hi else []


def refine(folios: list[tuple[int, int]], written: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Narrow each folio extent to the blocks that writeback put on disk.

    A large folio's event names only its start, but writeback writes only its
    dirty blocks, and every block dirtied since the event is written back by the
    end of the pass start's writeback (by us, the flusher or another fsync). An
    extent no write falls in keeps its whole span: that is the safe answer
    whenever the data went somewhere else (a journal, say).
    `written` must be sorted and merged.
    """
    starts = [s for s, _ in written]
    out: list[tuple[int, int]] = []
    for fs, fe in folios:
        i = max(bisect.bisect_right(starts, fs) - 1, 0)
        hits = []
        while i < len(written) and written[i][0] < fe:
            s, e = max(fs, written[i][0]), min(fe, written[i][1])
            if s < e:
                hits.append((s, e))
            i += 1
        out.extend(hits or [(fs, fe)])
    return out
