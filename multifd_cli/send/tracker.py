"""Dirty detection: which pages changed since they were last sent.

The default tracker hashes in two levels. A pass reads the range in large
reads, hashes each 64 KiB chunk, and only inside chunks whose hash changed does
it hash pages and compare them with the table of what was last sent. The page
hash recorded is of the very buffer that is then queued, so the table always
describes the bytes on the wire, never a second read.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from array import array
from dataclasses import dataclass
from itertools import compress
from typing import Callable

from multifd_cli.common.tables import (
    SharedTable,
    chunk_pages,
    page_hash,
    pages_of,
    zero_bytes,
    zero_hash,
)
from multifd_cli.errors import IOFailure
from multifd_cli.send.clients import PagedClient

READ_BYTES = 1 << 20  # one pread per MiB; a multiple of every chunk size
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of this


@dataclass
class SourceTables:
    """The tables of one source block, shared between send's main and channels."""

    page_hash: SharedTable  # u64 per page: hash of what was last sent
    chunk_hash: SharedTable  # u64 per chunk: hash of the chunk as last read
    chunk_valid: SharedTable  # u8 per chunk: 0 means "send every page in it"

    @classmethod
    def create(cls, name: str, size: int, page_size: int) -> SourceTables:
        n = pages_of(size, page_size)
        chunks = pages_of(n, chunk_pages(page_size))
        return cls(
            SharedTable(f"{name}-pages", "Q", n),
            SharedTable(f"{name}-chunks", "Q", chunks),
            SharedTable(f"{name}-valid", "B", chunks),
        )

    def tables(self) -> tuple[SharedTable, ...]:
        return (self.page_hash, self.chunk_hash, self.chunk_valid)

    def refresh(self) -> None:
        for t in self.tables():
            t.refresh()

    def resize(self, old_size: int, new_size: int, page_size: int) -> None:
        """Main, at the barrier: make room, and forget chunks whose bytes moved."""
        cp = chunk_pages(page_size)
        n = pages_of(new_size, page_size)
        chunks = pages_of(n, cp)
        self.page_hash.ensure(n)
        self.chunk_hash.ensure(chunks)
        self.chunk_valid.ensure(chunks)
        # The chunk holding either end-of-file changed length; everything past the
        # smaller end is new or gone. Those chunks are sent whole next time.
        first = min(old_size, new_size) // page_size // cp
        self.chunk_valid.fill(first, self.chunk_valid.capacity, 0)

    def close(self) -> None:
        for t in self.tables():
            t.close()


@dataclass
class ScanResult:
    dirty_pages: int = 0
    zero_pages: int = 0
    read_bytes: int = 0
    short_read: bool = False


class HashTracker:
    """Scans a page range of one block and queues what changed into a PagedClient."""

    def __init__(self, page_size: int, tick: Callable[[], None]) -> None:
        self.page_size = page_size
        self.cpages = chunk_pages(page_size)
        self.cbytes = self.cpages * page_size
        self.read_bytes = max(self.cbytes, READ_BYTES // self.cbytes * self.cbytes)
        # Page-aligned (an anonymous mapping), as O_DIRECT reads require.
        self._buf = mmap.mmap(-1, self.read_bytes + DIRECT_ALIGN)
        self._view = memoryview(self._buf)
        self.direct = False  # set when the source was opened with O_DIRECT
        self.holes = True  # SEEK_DATA/SEEK_HOLE work here (not on block devices)
        self._tick = tick

    def scan(
        self,
        fd: int,
        block: int,
        tables: SourceTables,
        start_page: int,
        end_page: int,
        size: int,
        full: bool,
        client: PagedClient,
        seeded: bool = False,
    ) -> ScanResult:
        """Queue every changed page of [start_page, end_page); `full` sends all pages.

        `seeded` means the page table holds hashes the destination already has
        (--resume): chunks are not trusted yet, but pages are compared.
        """
        ps = self.page_size
        cb = self.cbytes
        res = ScanResult()
        pos = start_page * ps
        end = min(end_page * ps, size)
        data_end = -1  # end of the data extent known to hold `pos` (sparse pass 1)
        while pos < end:
            if full and self.holes and pos >= data_end:
                pos, data_end = self._skip_holes(fd, block, tables, pos, end, size, client, res)
                if pos >= end:
                    break
            want = min(self.read_bytes, end - pos)
            # O_DIRECT reads whole aligned blocks; the bytes past `want` are dropped.
            ask = -(-want // DIRECT_ALIGN) * DIRECT_ALIGN if self.direct else want
            try:
                n = min(want, os.preadv(fd, [self._view[:ask]], pos))
            except OSError as e:
                raise IOFailure(f"reading the source at offset {pos}: {e.strerror}") from None
            res.read_bytes += n
            usable = n
            if n < want:
                # The file shrank under us: a short read means it ended, not zeros.
                # Pages not read whole are left for the next pass.
                res.short_read = True
                usable = n // ps * ps
                first_bad = (pos + usable) // cb
                tables.chunk_valid.fill(first_bad, pages_of(pages_of(end, ps), self.cpages), 0)
            if full:
                self._scan_full(block, tables, pos, usable, client, res, partial_tail=n < want)
            else:
                self._scan_buffer(
                    block, tables, pos, usable, full, client, res, partial_tail=n < want,
                    seeded=seeded,
                )
            client.detach()  # the next pread reuses the buffer the batch points into
            pos += want
            self._tick()
            if n < want:
                break
        return res

    def _scan_full(
        self,
        block: int,
        tables: SourceTables,
        base: int,
        length: int,
        client: PagedClient,
        res: ScanResult,
        partial_tail: bool,
    ) -> None:
        """Every page of the buffer goes: hash it all in one sweep, queue it in runs.

        The same tables as a chunk-by-chunk scan result, with one pass of Python per
        read instead of one per chunk: about a third less CPU on a full pass.
        """
        if not length:
            return
        ps = self.page_size
        cb = self.cbytes
        mv = self._view[:length]  # the buffer is longer: a short tail page ends here
        hs = [page_hash(mv[x : x + ps]) for x in range(0, length, ps)]
        k = len(hs)
        p0 = base // ps
        c0 = base // cb
        chs = array("Q", [page_hash(mv[a : a + cb]) for a in range(0, length, cb)])
        tables.chunk_hash.view[c0 : c0 + len(chs)] = chs
        valid = tables.chunk_valid.view
        valid[c0 : c0 + len(chs)] = b"\x01" * len(chs)
        if partial_tail and length % cb:
            valid[c0 + len(chs) - 1] = 0  # a chunk cut short by a shrinking file
        tables.page_hash.view[p0 : p0 + k] = array("Q", hs)
        zfull = zero_hash(ps)
        ztail = zero_hash(length - (k - 1) * ps)
        if zfull not in hs and hs[-1] != ztail:
            client.queue_run(block, base, mv, hs)
            res.dirty_pages += k
            return
        # Zero pages are described, not sent; the runs between them go as they are.
        # Candidates by hash (a C-level scan), each confirmed by its bytes, then
        # handled a run at a time: no Python step per page of the buffer.
        zeros = list(compress(range(k), map(zfull.__eq__, hs)))
        if ztail != zfull and hs[-1] == ztail:
            zeros.append(k - 1)
        zb = zero_bytes(ps)
        zeros = [i for i in zeros if (t := mv[i * ps : (i + 1) * ps].tobytes()) == zb[: len(t)]]
        # [first, end) of each run of consecutive zero pages
        firsts = [z for z, prev in zip(zeros, [-2, *zeros]) if z != prev + 1]
        ends = [z + 1 for z, nxt in zip(zeros, [*zeros[1:], -1]) if nxt != z + 1]
        start = 0
        for first, end in zip([*firsts, k], [*ends, k]):
            if first > start:
                client.queue_run(block, base + start * ps, mv[start * ps : min(first * ps, length)],
                                 hs[start:first])
                res.dirty_pages += first - start
            if end > first:
                client.queue_zeros(block, range(base + first * ps, base + end * ps, ps))
            start = end
        res.zero_pages += len(zeros)

    def _scan_buffer(
        self,
        block: int,
        tables: SourceTables,
        base: int,
        length: int,
        full: bool,
        client: PagedClient,
        res: ScanResult,
        partial_tail: bool,
        seeded: bool = False,
    ) -> None:
        ps = self.page_size
        cb = self.cbytes
        mv = self._view
        ph = tables.page_hash.view
        chh = tables.chunk_hash.view
        chv = tables.chunk_valid.view
        zfull = zero_hash(ps)
        for a in range(0, length, cb):
            cv = mv[a : min(a + cb, length)]
            clen = len(cv)
            ci = (base + a) // cb
            ch = page_hash(cv)
            valid = chv[ci]
            whole = full or (not valid and not seeded)
            if valid and not full and chh[ci] == ch:
                continue
            # A comprehension keeps the per-page work in C as far as Python allows.
            hs = [page_hash(cv[x : x + ps]) for x in range(0, clen, ps)]
            k = len(hs)
            pi = (base + a) // ps
            ztail = zero_hash(clen - (k - 1) * ps)
            maybe_zero = zfull in hs or hs[-1] == ztail
            if whole and not maybe_zero:
                ph[pi : pi + k] = array("Q", hs)
                client.queue_run(block, base + a, cv, hs)
                res.dirty_pages += k
            elif whole and clen == cb and ch == zero_hash(cb) and cv.tobytes() == zero_bytes(cb):
                # A whole zero chunk (common in disk images): describe its pages in
                # one go. tobytes() then == runs at memcmp speed, where
                # comparing the memoryview itself walks it item by item, 50x slower.
                ph[pi : pi + k] = array("Q", hs)
                client.queue_zeros(block, range(base + a, base + a + clen, ps))
                res.zero_pages += k
            else:
                old = ph[pi : pi + k].tolist()
                ph[pi : pi + k] = array("Q", hs)
                for i in range(k) if whole else [i for i in range(k) if hs[i] != old[i]]:
                    pv = cv[i * ps : (i + 1) * ps]
                    h = hs[i]
                    if h in (zfull, ztail) and pv.tobytes() == zero_bytes(len(pv)):
                        client.queue_zero(block, base + a + i * ps)
                        res.zero_pages += 1
                    else:
                        client.queue_page(block, base + a + i * ps, pv, h)
                        res.dirty_pages += 1
            chh[ci] = ch
            # A chunk cut short by a shrinking file was not checked whole.
            chv[ci] = 0 if (partial_tail and a + clen == length and clen < cb) else 1

    def _skip_holes(
        self,
        fd: int,
        block: int,
        tables: SourceTables,
        pos: int,
        end: int,
        size: int,
        client: PagedClient,
        res: ScanResult,
    ) -> tuple[int, int]:
        """Describe whole chunks inside a hole as zero pages without reading them."""
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            stop = min(end, data // self.cbytes * self.cbytes)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return pos, end  # no SEEK_DATA here: read everything
            data = stop = end  # a hole runs to the end of the file
        ps = self.page_size
        while pos < stop:
            ci = pos // self.cbytes
            cend = min(pos + self.cbytes, size)
            tables.chunk_hash.view[ci] = zero_hash(cend - pos)
            tables.chunk_valid.view[ci] = 1
            for off in range(pos, cend, ps):
                tables.page_hash.view[off // ps] = zero_hash(min(ps, size - off))
                client.queue_zero(block, off)
                res.zero_pages += 1
            pos = cend
            self._tick()
        if pos >= end:
            return pos, end
        try:
            data_end = os.lseek(fd, max(pos, data), os.SEEK_HOLE)
        except OSError:
            data_end = end
        return pos, max(data_end, pos + self.cbytes)


class DirtyLog:
    """The embedding API's tracker: the application says what it wrote.

    Call mark_dirty() after each write has completed (as KVM's dirty log
    records a write after it happens). Each pass takes the whole log at its
    start, so a write that lands during a pass is in the next pass's log, and
    a pass costs what was dirtied, not the size of the file.
    """

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self._lock = threading.Lock()
        self._chunks: dict[int, set[int]] = {}

    def mark_dirty(self, offset: int, length: int, block: int = 0) -> None:
        """Record that bytes [offset, offset + length) of `block` were written."""
        if length <= 0:
            return
        cb = chunk_pages(self.page_size) * self.page_size
        first, last = offset // cb, (offset + length - 1) // cb
        with self._lock:
            self._chunks.setdefault(block, set()).update(range(first, last + 1))

    def pending_bytes(self) -> int:
        """Bytes marked since the last take(), counted in whole chunks."""
        cb = chunk_pages(self.page_size) * self.page_size
        with self._lock:
            return cb * sum(len(c) for c in self._chunks.values())

    def take(self) -> dict[int, list[int]]:
        """Hand over and clear the log: sorted dirty chunk numbers per block."""
        with self._lock:
            chunks, self._chunks = self._chunks, {}
        return {b: sorted(c) for b, c in chunks.items()}
