"""Per-page and per-chunk tables shared by main and its channels without locks.

Each table lives in a memfd created before the channels fork, so every process
maps the same pages. A slot has exactly one writer at a time: the channel that
was handed the range containing it in the current epoch. Main only reads them,
and resizes them only while every channel waits at the barrier; channels
notice the new size at their next work item and remap.
"""

from __future__ import annotations

import functools
import mmap
import os
from array import array
from typing import Callable, Iterable, Literal

import xxhash

from multifd_cli.errors import IOFailure

TypeCode = Literal["Q", "I", "B"]

# Page hashes: xxh3-64 of exactly the bytes sent (or, for a zero page, of that
# many zero bytes). Chunks: one xxh3-64 over CHUNK bytes so that a pass over an
# unchanged file costs one hash per chunk instead of one per page.
CHUNK_BYTES = 64 << 10
page_hash = xxhash.xxh3_64_intdigest


@functools.lru_cache(maxsize=64)
def zero_hash(length: int) -> int:
    """Hash of `length` zero bytes, which is what a zero page or hole hashes to."""
    return page_hash(bytes(length))


@functools.lru_cache(maxsize=8)
def zero_bytes(length: int) -> bytes:
    return bytes(length)


def chunk_pages(page_size: int) -> int:
    """Pages per chunk: 64 KiB suits a 1 MiB L2, and a chunk is never below a page."""
    return max(1, CHUNK_BYTES // page_size)


class SharedTable:
    """A growable array of one C type ('Q', 'I' or 'B') in a memfd."""

    def __init__(self, name: str, typecode: TypeCode, capacity: int, fill: int = 0) -> None:
        self.typecode: TypeCode = typecode
        self.itemsize = {"Q": 8, "I": 4, "B": 1}[typecode]
        self.fd = os.memfd_create(f"multifd-{name}", os.MFD_CLOEXEC)
        self._mm: mmap.mmap | None = None
        self.view: memoryview = memoryview(b"")
        self.capacity = 0
        self._fill = fill
        self.ensure(max(1, capacity))

    def _map(self) -> None:
        size = os.fstat(self.fd).st_size
        self.view.release()
        if self._mm is not None:
            self._mm.close()
        try:
            self._mm = mmap.mmap(self.fd, size)
        except OSError as e:
            raise IOFailure(
                f"cannot map a table of {size} bytes: {e.strerror} "
                "(a larger --page-size makes it smaller)"
            ) from None
        self.view = memoryview(self._mm).cast(self.typecode)
        self.capacity = size // self.itemsize

    def ensure(self, n: int) -> None:
        """Grow to hold `n` items (main only, at the barrier); new slots get `fill`."""
        if n <= self.capacity:
            return
        old = self.capacity
        new = max(n, 2 * old)
        os.ftruncate(self.fd, new * self.itemsize)
        self._map()
        if self._fill:
            self.fill(old, new, self._fill)

    def refresh(self) -> None:
        """Remap if another process grew the table (channels, before a work item)."""
        if os.fstat(self.fd).st_size // self.itemsize != self.capacity:
            self._map()

    def fill(self, start: int, stop: int, value: int) -> None:
        stop = min(stop, self.capacity)
        if stop <= start:
            return
        item = value.to_bytes(self.itemsize, "little")
        raw = self.view.cast("B")
        raw[start * self.itemsize : stop * self.itemsize] = item * (stop - start)
        raw.release()

    def raw(self, start: int, stop: int) -> memoryview:
        """Little-endian bytes of items [start, stop), for digests."""
        return self.view.cast("B")[start * self.itemsize : stop * self.itemsize]

    def close(self) -> None:
        self.view.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        os.close(self.fd)


def pages_of(size: int, page_size: int) -> int:
    return (size + page_size - 1) // page_size


def table_digest(blocks: Iterable[tuple[int, SharedTable, int]]) -> bytes:
    """xxh3-128 over each block's size and page-hash table, in layout order.

    `blocks` holds (size, table, page size) per block; a blob's "pages" are
    packet-size chunks.
    """
    h = xxhash.xxh3_128()
    for size, table, page_size in blocks:
        h.update(size.to_bytes(8, "little"))
        view = table.raw(0, pages_of(size, page_size))
        h.update(view)
        view.release()
    return bytes(h.digest())


class FileTables:
    """The page tables of a directory source's files, by file id, as one channel of
    either side keeps them (docs/protocol.md, "Directory trees").

    Each channel owns the files whose id is its index modulo the channel count, on
    both sides, so no table is shared between processes; a file id is never reused.
    A file's entry is one array of u64: slot 0 the file's size as this side last
    knew it, then one page hash per page. One array per file keeps a small file's
    cost near a hundred bytes.
    """

    def __init__(self) -> None:
        self.tables: dict[int, array[int]] = {}

    def __len__(self) -> int:
        return len(self.tables)

    def entry(self, fid: int) -> array[int]:
        t = self.tables.get(fid)
        if t is None:
            t = self.tables[fid] = array("Q", (0,))
        return t

    def forget(self, fids: Iterable[int]) -> None:
        for fid in fids:
            self.tables.pop(fid, None)

    def digest(self, page_size: int, size_of: Callable[[int], int | None] | None = None,
               files: Iterable[tuple[int, int | None]] | None = None) -> bytes:
        """xxh3-128 over the files that hold data, in file id order: id and size as u64,
        then the page hashes.

        recv passes size_of (each file's size now, or None for one that is gone) and
        covers the files it holds tables for. send passes FILES, (id, size) of every
        file of the final walk, so a file no pass ever read gets no table, marks the
        digest as missing pages, and cannot verify."""
        h = xxhash.xxh3_128()
        if files is None:
            files = ((fid, self.tables[fid][0] if size_of is None else size_of(fid))
                     for fid in sorted(self.tables))
        for fid, size in files:
            if not size:  # gone, or empty: no pages, and recv may never have heard of it
                continue
            n = pages_of(size, page_size)
            h.update(fid.to_bytes(8, "little") + size.to_bytes(8, "little"))
            t = self.tables.get(fid)
            if t is None or len(t) - 1 < n:  # pages that never came: it cannot match
                h.update(b"missing")
                continue
            h.update(memoryview(t)[1 : n + 1].cast("B"))
        return bytes(h.digest())


def tree_digest(channel_digests: Iterable[bytes]) -> bytes:
    """DIGEST of a tree session: xxh3-128 over the channels' digests in order."""
    return bytes(xxhash.xxh3_128_digest(b"".join(channel_digests)))
