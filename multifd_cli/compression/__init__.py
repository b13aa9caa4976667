"""Per-packet payload compression: codecs, their wire ids, and ``--compress`` parsing.

Built-ins (wire id: name, levels, default): 0: none; 1: zlib 0..9, 1;
2: lz4 0..12, 0 (0 = fast mode, 1..12 = HC); 3: zstd 1..22, 1.
Third-party codecs register through the ``multifd_cli.compressors`` entry-point
group with wire ids 128..255 (see registry.py).
"""

from __future__ import annotations

from multifd_cli.compression.base import PLUGIN_WIRE_ID_MIN, Buffer, Compressor
from multifd_cli.compression.codecs import (
    Lz4Compressor,
    NoCompression,
    ZlibCompressor,
    ZstdCompressor,
)
from multifd_cli.compression.registry import (
    ENTRY_POINT_GROUP,
    CompressionSpec,
    by_wire_id,
    compressor_class,
    get_compressor,
    names,
    parse_spec,
    register,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_WIRE_ID_MIN",
    "Buffer",
    "CompressionSpec",
    "Compressor",
    "Lz4Compressor",
    "NoCompression",
    "ZlibCompressor",
    "ZstdCompressor",
    "by_wire_id",
    "compressor_class",
    "get_compressor",
    "names",
    "parse_spec",
    "register",
    "unregister",
]
