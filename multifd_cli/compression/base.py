"""The contract every codec follows, built-in or third-party.

A packet's payload is compressed as one *unit*: `compress()` must produce bytes
that `decompress()` can decode with nothing but the unit itself and the raw size
the packet header announces. Channels run in parallel and packets can be
retransmitted or dropped with their epoch, so no history may be carried from
one unit to the next.

`decompress()` sees bytes from the network. It is a template method: it checks
the raw size, calls the subclass hook `_decompress()`, turns any library
exception into a ProtocolError and checks the output length, so even a careless
plugin cannot let a corrupt payload crash a channel with a stray exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Union

from multifd_cli.errors import ProtocolError, UsageError

Buffer = Union[bytes, bytearray, memoryview]

#: The CONFIG message carries the level as a signed byte.
LEVEL_MIN = -128
LEVEL_MAX = 127

#: Wire ids 0..127 belong to multifd itself; third-party codecs use 128..255.
PLUGIN_WIRE_ID_MIN = 128
WIRE_ID_MAX = 255


class Compressor(ABC):
    """One codec at one level, used by one channel (instances are not thread-safe).

    Subclasses set the class attributes and implement `compress()` and
    `_decompress()`. Library contexts may be kept on the instance and reused
    across calls, but each call must stand alone.
    """

    #: Name used in ``--compress NAME[:LEVEL]``; lower case, no ``:``.
    name: ClassVar[str]
    #: One byte in every packet header. Built-ins use 0..127, plugins 128..255.
    wire_id: ClassVar[int]
    min_level: ClassVar[int] = 0
    max_level: ClassVar[int] = 0
    default_level: ClassVar[int] = 0
    #: True for a policy that picks a real codec per packet (``auto``): its wire
    #: id may name it in CONFIG, but never in a packet header.
    adaptive: ClassVar[bool] = False

    def __init__(self, level: int | None = None) -> None:
        self.level: int = self.check_level(level)

    @classmethod
    def check_level(cls, level: int | None) -> int:
        """Return the level to use, or raise UsageError if outside this codec's range."""
        if level is None:
            return cls.default_level
        if isinstance(level, bool) or not isinstance(level, int):
            raise UsageError(f"{cls.name} level must be an integer, not {level!r}")
        if not cls.min_level <= level <= cls.max_level:
            raise UsageError(
                f"{cls.name} level {level} is out of range {cls.min_level}..{cls.max_level}"
            )
        return level

    @classmethod
    def has_levels(cls) -> bool:
        """True if the codec has more than one level, so a ``:LEVEL`` suffix means something."""
        return cls.min_level != cls.max_level

    @abstractmethod
    def compress(self, data: Buffer) -> bytes:
        """Compress `data` into one unit that decodes on its own."""

    @abstractmethod
    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        """Decode one unit; never produce (or allocate) much more than `raw_size` bytes.

        May raise ProtocolError with a precise message, or any library
        exception, which `decompress()` turns into a ProtocolError.
        """

    def decompress(self, data: Buffer, raw_size: int) -> bytes:
        """Decode one unit of exactly `raw_size` bytes, or raise ProtocolError.

        The bound comes from the packet header, which was checked against the
        page layout, so a decompression bomb fails after at most `raw_size`
        bytes of output.
        """
        if raw_size < 0:
            raise ProtocolError(f"{self.name} raw size: got {raw_size}, expected >= 0")
        try:
            out = self._decompress(data, raw_size)
        except ProtocolError:
            raise
        except Exception as e:  # hostile input: every library failure is the peer's fault
            raise ProtocolError(
                f"{self.name} payload: got undecodable data ({type(e).__name__}: {e}), "
                f"expected a {self.name} unit of {raw_size} bytes"
            ) from e
        if len(out) != raw_size:
            raise ProtocolError(
                f"{self.name} decompressed size: got {len(out)}, expected {raw_size}"
            )
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        # Library contexts cannot be pickled; rebuild from the class and level
        # so a compressor can be handed to a channel's worker process.
        return (type(self), (self.level,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level})"

    def __str__(self) -> str:
        return f"{self.name}:{self.level}" if self.has_levels() else self.name
