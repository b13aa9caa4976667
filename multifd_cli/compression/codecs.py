"""The built-in codecs: none, zlib, lz4 and zstd.

lz4 and zstandard are imported on first construction, not at import time, so
``multifd --help`` and sessions that do not compress never pay for them, and a
missing package is reported as a UsageError that says what to install.

No codec writes its own checksum: every page already carries a hash in the
packet, checked after decompression, so a second checksum would only cost time.
zlib keeps its built-in Adler-32 because its format has no way to drop it.
"""

from __future__ import annotations

import zlib
from types import ModuleType
from typing import Any, ClassVar

from multifd_cli.compression.base import Buffer, Compressor
from multifd_cli.errors import ProtocolError, UsageError


def _import_optional(module: str, package: str, codec: str) -> ModuleType:
    """Import an optional dependency, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(
            f"{codec} compression needs the {package!r} package: pip install {package}"
        ) from e


class NoCompression(Compressor):
    """Payload stored as is; the length check is all there is to verify."""

    name: ClassVar[str] = "none"
    wire_id: ClassVar[int] = 0

    def compress(self, data: Buffer) -> bytes:
        return bytes(data)

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        if len(data) != raw_size:
            raise ProtocolError(
                f"uncompressed payload length: got {len(data)}, expected {raw_size}"
            )
        return bytes(data)


class ZlibCompressor(Compressor):
    """Standard zlib streams (RFC 1950), for peers without lz4 or zstd.

    Default level 1, not zlib's own 6: compressing is only worth it if it beats
    the network, and on Python source level 1 ran ~3.5x faster (106 vs 30 MB/s)
    for output ~25% larger (ratio 0.29 vs 0.23). Level 0 stores.
    """

    name: ClassVar[str] = "zlib"
    wire_id: ClassVar[int] = 1
    min_level: ClassVar[int] = 0
    max_level: ClassVar[int] = 9
    default_level: ClassVar[int] = 1

    def compress(self, data: Buffer) -> bytes:
        # One-shot zlib.compress() rather than copying a pristine compressobj
        # template: on 512 KiB they were within noise of each other (the
        # deflate work dominates state setup), and on 4 KiB zlib.compress was
        # ~20% faster because it skips the copy and the compress()+flush() join.
        return zlib.compress(data, self.level)

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        d = zlib.decompressobj()
        # max_length 0 would mean "unlimited", so ask for one byte more than
        # allowed: that bounds the output and tells "too long" from "exact".
        out = d.decompress(data, raw_size + 1)
        if len(out) > raw_size:
            raise ProtocolError(
                f"zlib decompressed size: got more than {raw_size} bytes, expected {raw_size}"
            )
        if not d.eof:
            raise ProtocolError("zlib stream: got a truncated stream, expected a complete one")
        if d.unused_data:
            raise ProtocolError(
                f"zlib stream: got {len(d.unused_data)} bytes after the end, expected 0"
            )
        return out


class Lz4Compressor(Compressor):
    """LZ4 block format, without the size prefix: the packet header has the raw size.

    Level 0 is LZ4's default fast mode. Levels 1..12 select the high-compression
    (HC) mode at that level; 12 is LZ4HC's maximum, and the library silently
    treats anything above it as 12, so higher values are refused rather than
    pretending to mean something.
    """

    name: ClassVar[str] = "lz4"
    wire_id: ClassVar[int] = 2
    min_level: ClassVar[int] = 0
    max_level: ClassVar[int] = 12
    default_level: ClassVar[int] = 0

    def __init__(self, level: int | None = None) -> None:
        super().__init__(level)
        self._block: Any = _import_optional("lz4.block", "lz4", self.name)
        if self.level == 0:
            self._kwargs: dict[str, Any] = {"mode": "default"}
        else:
            self._kwargs = {"mode": "high_compression", "compression": self.level}

    def compress(self, data: Buffer) -> bytes:
        out: bytes = self._block.compress(data, store_size=False, **self._kwargs)
        return out

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        # uncompressed_size is the size of the buffer lz4 allocates and may not
        # overrun; a block that decodes to less is caught by the length check.
        out: bytes = self._block.decompress(data, uncompressed_size=raw_size)
        return out


class ZstdCompressor(Compressor):
    """One zstd frame per unit, with the content size in the frame header.

    Default level 1: zstd's fastest regular level; on Python source it beat
    zlib:1 on both ratio (0.27 vs 0.29) and speed (~310 vs ~105 MB/s), and
    level 3 (the library's default) was ~20% slower for 6% smaller output.
    Negative ("fast") levels are not offered.
    """

    name: ClassVar[str] = "zstd"
    wire_id: ClassVar[int] = 3
    min_level: ClassVar[int] = 1
    max_level: ClassVar[int] = 22
    default_level: ClassVar[int] = 1

    def __init__(self, level: int | None = None) -> None:
        super().__init__(level)
        zstd: Any = _import_optional("zstandard", "zstandard", self.name)
        self._zstd = zstd
        # Both contexts are reused across calls (saving their allocation); each
        # compress() is a complete frame and each decompress() a fresh session,
        # so no history crosses units.
        self._cctx = zstd.ZstdCompressor(
            level=self.level, write_content_size=True, write_checksum=False
        )
        self._dctx = zstd.ZstdDecompressor()

    def compress(self, data: Buffer) -> bytes:
        out: bytes = self._cctx.compress(data)
        return out

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        size = self._zstd.frame_content_size(data)
        if size != raw_size:
            got = "unknown" if size == self._zstd.CONTENTSIZE_UNKNOWN else size
            raise ProtocolError(f"zstd frame content size: got {got}, expected {raw_size}")
        # With the content size known, zstandard decodes into a buffer of
        # exactly that size, so the output cannot grow past raw_size; the
        # decoder also fails if the blocks produce more or less than declared.
        # allow_extra_data=False rejects trailing bytes and a second frame.
        out: bytes = self._dctx.decompress(data, max_output_size=raw_size, allow_extra_data=False)
        return out
