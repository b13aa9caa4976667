"""The pages of a directory tree, as one receive channel applies them.

A tree's page offset is ``(file id << TREE_SHIFT) | byte offset``: one packet carries
pages of many small files. Channel c of N owns exactly the files whose id is c modulo
N, on both ends, so this object alone keeps those files' page tables (FileTables) and
nothing is shared with other processes but the files themselves.

Files are written through the id directory that recv's main keeps beside the staging
tree (recv/tree.py): ``ids/<hex id>`` is a hard link of the file wherever the tree
holds it, so a page lands without knowing the file's path. Descriptors go through a
bounded cache: a tree may hold a million files and RLIMIT_NOFILE may be 256.

Main changes files between epochs (creates, truncates, drops), never during one: so a
file's size is read once per epoch, at its first page, and forgotten at the next
release.
"""

from __future__ import annotations

import os
from typing import Callable

from multifd_cli import wire as P
from multifd_cli.common.fsutil import punch_hole
from multifd_cli.common.tables import FileTables, page_hash, zero_bytes, zero_hash
from multifd_cli.compression import Compressor
from multifd_cli.errors import IOFailure, ProtocolError, VerifyError, expect
from multifd_cli.recv.tree import FdCache, id_name

OFFSET_MASK = (1 << P.TREE_SHIFT) - 1
FD_CACHE = 64  # descriptors per channel


class TreePages:
    """Checks, verifies and writes one channel's packets of a tree session."""

    def __init__(
        self,
        index: int,
        config: P.Config,
        ids_fd: int,
        decompressor: Callable[[int], Compressor],
        fd_cache: int = FD_CACHE,
    ) -> None:
        self.index = index
        self.channels = config.channels
        self.ps = config.page_size
        self.ids_fd = ids_fd
        self.cache = FdCache(ids_fd, fd_cache)
        self.decompressor = decompressor
        self.files = FileTables()
        self.sizes: dict[int, int] = {}  # file id -> its size in this epoch
        self.written = 0  # bytes written to files

    def begin_epoch(self) -> None:
        """Main may have created, resized or dropped files since the last epoch."""
        self.sizes.clear()

    def close(self) -> None:
        self.cache.close()

    # -- one packet ------------------------------------------------------------------------
    def apply(self, p: P.Packet) -> None:
        """Check a packet's offsets against this channel's files, verify each page's
        hash, write the pages and record their hashes."""
        h = p.header
        expect("tree packet block id", h.block, 0)
        normal = [self._page(o) for o in p.normal_offsets]
        raw = sum(n for _, _, n in normal)
        data: bytes | memoryview = p.payload
        if h.compression == 0 or h.flags & P.FLAG_RAW:
            expect("uncompressed payload length", h.payload_len, raw)
        elif h.payload_len > raw:
            raise ProtocolError(f"compressed payload: got {h.payload_len} bytes for {raw} raw bytes")
        elif raw:
            data = self.decompressor(h.compression).decompress(p.payload, raw)
        mv = memoryview(data)
        pos = 0
        run: list[tuple[int, int, int]] = []  # consecutive pages of one file
        for (fid, off, n), want in zip(normal, p.hashes):
            got = page_hash(mv[pos : pos + n])
            if got != want:
                raise VerifyError(
                    f"page at offset {off} of tree file id {fid}: hash {got:#018x}, "
                    f"expected {want:#018x}", channel=self.index,
                )
            self._record(fid, off, got)
            if run and (run[-1][0] != fid or run[-1][1] + self.ps != off):
                self._pwrite(run[0][0], mv[run[0][2] : pos], run[0][1])
                run = []
            run.append((fid, off, pos))
            pos += n
        if run:
            self._pwrite(run[0][0], mv[run[0][2] : pos], run[0][1])
        for fid, off, n in (self._page(o) for o in p.zero_offsets):
            self._record(fid, off, zero_hash(n))
            self._zero(fid, off, n)

    def _page(self, offset: int) -> tuple[int, int, int]:
        """(file id, byte offset, page length) of one wire offset, checked."""
        fid, off = offset >> P.TREE_SHIFT, offset & OFFSET_MASK
        if fid > P.MAX_FILE_ID or fid % self.channels != self.index:
            raise ProtocolError(
                f"tree file id {fid} on channel {self.index}: expected ids "
                f"{self.index} modulo {self.channels}"
            )
        size = self.sizes.get(fid)
        if size is None:
            size = self.sizes[fid] = os.fstat(self._fd(fid)).st_size
        if off % self.ps or off >= size:
            raise ProtocolError(
                f"page offset in tree file id {fid}: got {off}, expected a multiple of "
                f"{self.ps} below {size}"
            )
        return fid, off, min(self.ps, size - off)

    def _fd(self, fid: int) -> int:
        try:
            return self.cache.get(fid)
        except FileNotFoundError:
            raise ProtocolError(f"pages for tree file id {fid}, which the tree does not hold") from None
        except OSError as e:
            raise IOFailure(f"tree file id {fid}: {e.strerror}") from None

    def _record(self, fid: int, off: int, h: int) -> None:
        t = self.files.entry(fid)
        t[0] = self.sizes[fid]
        i = off // self.ps + 1  # slot 0 holds the size
        if i >= len(t):
            t.extend([0] * (i + 1 - len(t)))  # a page never received: a digest that fails
        t[i] = h

    def _pwrite(self, fid: int, chunk: memoryview, offset: int) -> None:
        fd = self._fd(fid)
        while len(chunk):
            try:
                n = os.pwrite(fd, chunk, offset)
            except OSError as e:
                raise IOFailure(
                    f"writing tree file id {fid} at offset {offset}: {e.strerror}"
                ) from None
            chunk = chunk[n:]
            offset += n
            self.written += n

    def _zero(self, fid: int, off: int, n: int) -> None:
        """A zero page may hold an earlier epoch's data: make it read as zeros."""
        if not punch_hole(self._fd(fid), off, n):
            self._pwrite(fid, memoryview(zero_bytes(n)), off)

    # -- completion --------------------------------------------------------------------------
    def digest(self) -> bytes:
        """This channel's share of DIGEST: its files as the id directory holds them now
        (a file dropped from the tree, or empty, is left out)."""
        return self.files.digest(self.ps, self._size_now)

    def _size_now(self, fid: int) -> int | None:
        try:
            return os.stat(id_name(fid), dir_fd=self.ids_fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
