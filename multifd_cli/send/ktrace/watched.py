"""The sources a kernel tracker watches: their fds, page-cache inodes, stats and disk maps.

Everything here is about the files themselves; the trace is elsewhere. The
per-pass work is a stat and a writeback per source, and mapping the window's
block events back to byte offsets: it grows with the number of sources and
the events, never with the sources' size.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import stat
import sys
from typing import Callable, Sequence, cast

from multifd_cli.send.ktrace import bio, parse
from multifd_cli.send.ktrace.safety import SourceStat

WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4
# ext2 and ext3 are served by the ext4 driver, so ext4's no-page tracepoints cover
# them. xfs would need its own (zero-range and punch emit no ext4 event) and a test.
SUPPORTED_FS = ("ext4", "ext3", "ext2")
FS_IOC_GETFLAGS = 0x80086601
FS_JOURNAL_DATA_FL = 0x00004000

Spans = list[tuple[int, int]]


def mount_of(st: os.stat_result) -> tuple[str | None, set[str]]:
    """The filesystem type and superblock options of the mount a file lives on."""
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if pre.split()[2:3] == [want]:
                    fields = post.split()
                    return fields[0], set(fields[2].split(",")) if len(fields) > 2 else set()
    except OSError:
        pass
    return None, set()


def journals_data(fd: int, st: os.stat_result) -> bool:
    """Whether file data goes through the journal, so writeback bios miss its blocks."""
    if stat.S_ISBLK(st.st_mode):
        return False
    if "data=journal" in mount_of(st)[1]:
        return True
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError:
        return True  # cannot tell: do not narrow
    return bool(int.from_bytes(buf[:4], sys.byteorder) & FS_JOURNAL_DATA_FL)


def fs_reason(path: str) -> str | None:
    """Why the kernel's events cannot be trusted for this path; None if they can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat {path}: {e.strerror}"
    if stat.S_ISBLK(st.st_mode):
        try:
            bio.disk_of(st.st_rdev)
        except (bio.DirectUnavailable, OSError) as e:
            return f"block device {path}: {e}"
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"{path} is not a regular file"
    fstype, options = mount_of(st)
    if "dax" in options or "dax=always" in options:
        return "DAX mounts have no page cache, so no dirty events"
    if fstype in ("tmpfs", "ramfs", "hugetlbfs"):
        return f"{fstype} has no writeback, so it emits no dirty events"
    if fstype == "overlay":
        return "overlayfs: st_ino is not the page cache's inode"
    if fstype == "btrfs":
        return "btrfs is copy-on-write and its inode numbers repeat across subvolumes"
    if fstype not in SUPPORTED_FS:
        return f"{fstype or 'unknown filesystem'}: dirty events not verified there"
    if stat.S_ISREG(st.st_mode):
        try:
            bio.disk_of(st.st_dev)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                bio.fiemap(fd)
            finally:
                os.close(fd)
        except (bio.DirectUnavailable, OSError) as e:
            return f"O_DIRECT writes could not be mapped back to {path}: {e}"
    return None


def page_cache_ino(st: os.stat_result) -> int:
    """The inode the folio event names: a device's page cache is keyed by its number."""
    if stat.S_ISBLK(st.st_mode):
        return bio.kernel_dev(st.st_rdev)
    return st.st_ino


def source_stat(fd: int) -> SourceStat:
    """stat for the safety net; a device's size is where its end is, not st_size (0)."""
    st = os.fstat(fd)
    s = SourceStat.of(st)
    if stat.S_ISBLK(st.st_mode):
        s = dataclasses.replace(s, size=os.lseek(fd, 0, os.SEEK_END))
    return s


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except AttributeError:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


class WatchedSources:
    """Open sources, keyed by path and by the inode their page cache carries."""

    def __init__(self, paths: Sequence[str], direct: bool) -> None:
        self.fds: dict[str, int] = {}
        self.inodes: dict[int, list[str]] = {}  # page-cache inode -> paths (hard links share)
        self.stats: dict[str, SourceStat] = {}
        self.maps: dict[str, bio.ExtentMap | bio.DeviceMap] = {}
        self.narrow: set[str] = set()  # sources whose folio extents writeback may narrow
        self.direct_off: dict[str, str] = {}  # sources whose O_DIRECT writes go unseen, and why
        self._sfr = _sync_file_range()
        try:
            for p in paths:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                self.fds[p] = fd
                st = os.fstat(fd)
                self.inodes.setdefault(page_cache_ino(st), []).append(p)
                self.stats[p] = source_stat(fd)
                if direct:
                    self._map(p, fd, st)
        except BaseException:
            self.close()
            raise

    def _map(self, path: str, fd: int, st: os.stat_result) -> None:
        m: bio.ExtentMap | bio.DeviceMap
        try:
            if stat.S_ISBLK(st.st_mode):
                m = bio.DeviceMap(fd, bio.disk_of(st.st_rdev))
            else:
                m = bio.ExtentMap(fd, bio.disk_of(st.st_dev))
            m.refresh()
        except (bio.DirectUnavailable, OSError) as e:
            self.direct_off[path] = str(e)
            return
        self.maps[path] = m
        if not journals_data(fd, st):
            self.narrow.add(path)

    def disks(self) -> list[int]:
        return sorted({m.disk.disk_dev for m in self.maps.values()})

    def stat_all(self) -> dict[str, SourceStat]:
        return {p: source_stat(fd) for p, fd in self.fds.items()}

    def writeback(
        self, paths: Sequence[str] | None = None, offset: int = 0, length: int = 0
    ) -> None:
        """Write sources back and wait, so each folio in the range is clean again.

        All sources, whole, by default; length 0 means to the end.
        """
        for p in self.fds if paths is None else paths:
            fd = self.fds[p]
            # WRITE alone would skip folios already under writeback.
            flags = WAIT_BEFORE | WRITE | WAIT_AFTER
            if self._sfr is not None and self._sfr(fd, offset, length, flags) == 0:
                continue
            os.fdatasync(fd)

    def ranges(
        self,
        folios: dict[int, set[int]],
        reported: list[bio.Bio],
        written: list[bio.Bio] | None,
        extent: Callable[[int], tuple[int, int]],
        nopage: dict[int, str],
    ) -> dict[str, Spans]:
        """Per source: folio extents, narrowed to what writeback wrote, and O_DIRECT writes.

        `reported` are others' writes, read as they are. `written` is every bio
        that wrote back this window's folios, or None where narrowing is not
        sound (a mid-pass peek, before any writeback). A source whose extent map
        can no longer be trusted is put in `nopage`, which makes it hashed whole.
        """
        by_path: dict[str, Spans] = {}
        for ino, idx in folios.items():
            for p in self.inodes.get(ino, []):
                by_path[p] = [extent(i) for i in idx]
        direct: dict[str, Spans] = {}
        done: dict[str, Spans] = {}
        every = reported + (written or [])
        for p, m in self.maps.items() if every else ():
            # After the drain: a write into a hole allocated its extent before its bio.
            try:
                m.refresh()
            except (bio.DirectUnavailable, OSError) as e:
                nopage[os.fstat(m.fd).st_ino] = f"FIEMAP ({e})"
                continue
            disk = m.disk.disk_dev
            direct[p] = [r for b in reported if b.dev == disk for r in m.map(b)]
            if written is not None and p in self.narrow and p in by_path:
                done[p] = parse.merge_ranges([r for b in every if b.dev == disk for r in m.map(b)])
        out: dict[str, Spans] = {}
        for p in set(by_path) | set(direct):
            spans = by_path.get(p, [])
            if p in done:
                spans = bio.refine(spans, done[p])
            spans = spans + direct.get(p, [])
            if spans:
                out[p] = parse.merge_ranges(spans)
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
