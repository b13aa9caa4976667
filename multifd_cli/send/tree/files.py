"""A send channel's side of a directory source: read the files a pass names, compare
their pages with what was last sent, and queue what changed.

Files are small and many, so a pass hands a channel batches of them (TreeWork) and
their pages share packets: a page's offset on the wire is
``(file id << TREE_SHIFT) | offset in the file``. The channel opens each file only
while it reads it, so no descriptor per file outlives its read.
"""

from __future__ import annotations

import os
from array import array
from typing import Callable

from multifd_cli import wire as P
from multifd_cli.common.tables import FileTables, page_hash, pages_of, zero_bytes
from multifd_cli.errors import IOFailure
from multifd_cli.send.clients import PagedClient
from multifd_cli.send.tracker import ScanResult
from multifd_cli.send.tree.diff import ScanItem
from multifd_cli.send.tree.scan import open_scanned

READ_BYTES = 1 << 20
UNKNOWN = (1 << 64) - 1  # a page hash slot no pass filled


class TreeReader:
    """Reads one channel's files of a directory source, pass after pass."""

    def __init__(self, root: bytes, page_size: int, tick: Callable[[], None]) -> None:
        self.root = root
        self.page_size = page_size
        self.files = FileTables()
        self._tick = tick
        self.unread: list[tuple[int, int]] = []  # files of the last batch not at their path

    def scan(self, block: int, items: tuple[ScanItem, ...], client: PagedClient) -> ScanResult:
        """Queue every changed page of ITEMS; a file that no longer holds the scanned
        inode is skipped (the next pass's delta says where it went)."""
        res = ScanResult()
        self.unread = []
        for item in items:
            fd = open_scanned(self.root, item.path, item.dev, item.ino)
            if fd is None:
                self.unread.append((item.dev, item.ino))
                continue
            try:
                self._scan_file(fd, block, item, client, res)
            except OSError as e:
                raise IOFailure(f"{os.fsdecode(item.path)}: {e.strerror}") from None
            finally:
                os.close(fd)
        return res

    def _scan_file(self, fd: int, block: int, item: ScanItem, client: PagedClient,
                   res: ScanResult) -> None:
        ps = self.page_size
        size = item.size
        table = self.files.entry(item.fid)
        table[0] = size
        n = pages_of(size, ps)
        if len(table) > n + 1:
            del table[n + 1 :]
        base = item.fid << P.TREE_SHIFT
        for lo, hi in read_spans(item, ps):
            if len(table) < lo // ps + 1:
                # Pages before this range that no pass read (cannot happen while the
                # kernel tracker reads a file whole first): a hash that matches nothing.
                table.extend([UNKNOWN] * (lo // ps + 1 - len(table)))
            self._scan_span(fd, block, base, lo, hi, table, client, res)

    def _scan_span(self, fd: int, block: int, base: int, pos: int, end: int,
                   table: array[int], client: PagedClient, res: ScanResult) -> None:
        ps = self.page_size
        while pos < end:
            want = min(READ_BYTES, end - pos)
            data = os.pread(fd, want, pos)
            res.read_bytes += len(data)
            if len(data) < want:
                # Shorter than the walk saw: it shrank since. Send it as the walk saw it
                # (zeros past the end); the next pass sees the new size and fixes it.
                res.short_read = True
                data += zero_bytes(want - len(data))
            view = memoryview(data)
            for off in range(0, want, ps):
                page = view[off : off + ps]
                i = (pos + off) // ps + 1  # slot 0 holds the size
                h = page_hash(page)
                if i < len(table) and table[i] == h:
                    continue
                if i < len(table):
                    table[i] = h
                else:
                    table.append(h)  # pages are read in order, so i == len(table)
                if page == zero_bytes(len(page)):
                    client.queue_zero(block, base + pos + off)
                    res.zero_pages += 1
                else:
                    client.queue_page(block, base + pos + off, page, h)
                    res.dirty_pages += 1
            client.detach()
            pos += want
            self._tick()


def read_spans(item: ScanItem, page_size: int) -> list[tuple[int, int]]:
    """The page-aligned byte ranges of ITEM a pass reads: all of it, or the ranges the
    kernel tracker named (rounded out to whole pages, cut at the walk's size)."""
    size = item.size
    if item.ranges is None:
        return [(0, size)] if size else []
    out: list[tuple[int, int]] = []
    for s, e in sorted(item.ranges):
        lo, hi = s // page_size * page_size, min(size, -(-e // page_size) * page_size)
        if lo >= hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out
