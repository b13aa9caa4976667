"""The `file:` transport's image format: a self-describing image with a fixed offset for every
page, written by the channels in parallel with pwrite (like QEMU's mapped-ram).

Layout (docs/file-format.md is the reference, pinned by a golden-file test):

    0            header: IMAGE_HEADER, then one IMAGE_BLOCK + name per block
    ...          per block, each region aligned to IMAGE_ALIGN:
                   a bitmap, one bit per page: 1 = the page's bytes are in the image
                   the data region: page p of the block at data_offset + p * page_size

A live source works: a later pass rewrites a page at its fixed offset. Two
channels may write one offset in different passes, so the orchestrator's
epoch barrier (no work of pass k+1 before every channel finished pass k) is
what orders them on this side. The header says COMPLETE, with the digest, only
after every page and the bitmap are fsynced; the image is written under a hidden
name beside IMAGE and renamed to IMAGE only after that.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Sequence

from multifd_cli import wire as P
from multifd_cli.common.tables import pages_of
from multifd_cli.errors import IOFailure, ProtocolError, UsageError, VerifyError

IMAGE_MAGIC = b"MFDIMG\x00\x01"
IMAGE_VERSION = 1
IMAGE_COMPLETE = 0x1
IMAGE_ALIGN = 1 << 20
# magic, version, flags, page size, block count, bytes of header in use, digest
IMAGE_HEADER = struct.Struct("<8sIIIIQ16s")
# size, capacity in pages, bitmap offset, data offset, kind, name length; name follows
IMAGE_BLOCK = struct.Struct("<QQQQBH")


def _align(n: int) -> int:
    return -(-n // IMAGE_ALIGN) * IMAGE_ALIGN


@dataclass
class ImageBlock:
    name: str
    size: int
    capacity: int  # pages the data region holds
    bitmap_offset: int
    data_offset: int
    kind: int = P.KIND_PAGES


@dataclass
class ImageLayout:
    page_size: int
    blocks: list[ImageBlock]
    flags: int = 0
    digest: bytes = bytes(16)

    @classmethod
    def plan(cls, page_size: int, blocks: Sequence[tuple[str, int, int]]) -> ImageLayout:
        """Fixed offsets for (name, size, kind) blocks; the image is sized once."""
        header = IMAGE_HEADER.size + sum(IMAGE_BLOCK.size + len(n.encode()) for n, _, _ in blocks)
        pos = _align(header)
        out = []
        for name, size, kind in blocks:
            pages = pages_of(size, page_size)
            bitmap = pos
            pos = _align(pos + -(-pages // 8))
            out.append(ImageBlock(name, size, pages, bitmap, pos, kind))
            pos = _align(pos + pages * page_size)
        return cls(page_size, out)

    @property
    def end(self) -> int:
        b = self.blocks[-1]
        return _align(b.data_offset + b.capacity * self.page_size)

    def encode(self) -> bytes:
        parts = []
        for b in self.blocks:
            name = b.name.encode()
            parts.append(IMAGE_BLOCK.pack(b.size, b.capacity, b.bitmap_offset, b.data_offset,
                                          b.kind, len(name)) + name)
        body = b"".join(parts)
        head = IMAGE_HEADER.pack(IMAGE_MAGIC, IMAGE_VERSION, self.flags, self.page_size,
                                 len(self.blocks), IMAGE_HEADER.size + len(body), self.digest)
        return head + body

    @classmethod
    def decode(cls, data: bytes) -> ImageLayout:
        """Parse and check a header: every offset must lie inside the image's plan."""
        try:
            magic, version, flags, ps, n, used, digest = IMAGE_HEADER.unpack_from(data)
        except struct.error:
            raise ProtocolError("image header: got a file too short for one") from None
        if magic != IMAGE_MAGIC:
            raise ProtocolError(f"image magic: got {magic!r}, expected {IMAGE_MAGIC!r}")
        if version != IMAGE_VERSION:
            raise ProtocolError(f"image version: got {version}, expected {IMAGE_VERSION}")
        if not P.page_size_ok(ps):
            raise ProtocolError(f"image page size: got {ps}, expected a power of two")
        if not 1 <= n <= P.MAX_BLOCKS or used > len(data):
            raise ProtocolError(f"image blocks: got {n}, expected 1..{P.MAX_BLOCKS}")
        data = data[:used]  # the block entries lie inside the header bytes in use
        pos = IMAGE_HEADER.size
        blocks = []
        for i in range(n):
            if pos + IMAGE_BLOCK.size > used:
                raise ProtocolError(f"image blocks: got {n}, but the header holds only {i}")
            size, cap, bm, do, kind, nl = IMAGE_BLOCK.unpack_from(data, pos)
            pos += IMAGE_BLOCK.size
            if pos + nl > used:
                raise ProtocolError(f"image block {i}: got a name of {nl} bytes past the header's end")
            try:
                name = data[pos : pos + nl].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(
                    f"image block {i}: got a name that is not UTF-8, expected UTF-8"
                ) from None
            pos += nl
            P.check_block_name(name)
            if size > cap * ps or cap > P.MAX_BLOCK_SIZE // ps:
                raise ProtocolError(f"image block {name!r}: size {size} over its capacity")
            blocks.append(ImageBlock(name, size, cap, bm, do, kind))
        layout = cls(ps, blocks, flags, digest)
        # The offsets are not trusted: they must be exactly what plan() gives.
        expected = cls.plan(ps, [(b.name, b.capacity * ps, b.kind) for b in blocks])
        for got, want in zip(blocks, expected.blocks):
            if (got.bitmap_offset, got.data_offset) != (want.bitmap_offset, want.data_offset):
                raise ProtocolError(f"image block {got.name!r}: offsets do not follow the format")
        return layout


def read_layout(path: str) -> ImageLayout:
    """The image's checked header. The file must be as long as its layout: a cut
    image is refused here, before DEST is created or a channel started."""
    try:
        with open(path, "rb") as f:
            head = f.read(IMAGE_ALIGN)
            length = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e.strerror}") from None
    layout = ImageLayout.decode(head)
    if length < layout.end:
        raise IOFailure(f"image {path} is shorter than its header says: "
                        f"got {length} bytes, expected {layout.end}")
    return layout


def check_complete(layout: ImageLayout, path: str) -> None:
    if not layout.flags & IMAGE_COMPLETE:
        raise VerifyError(f"image {path} is incomplete: the migration into it did not finish")
