"""`--compress auto`: each channel picks none, lz4 or zstd per packet from what
it measures, so incompressible data goes raw without burning CPU and a slow
link gets the stronger codec.

For every option the channel keeps a running estimate of the compressed ratio
and the CPU seconds per raw byte, and of the link's bytes per second (the time
sends take, rate limiting included). It sends each packet with the option that
minimises the expected seconds per raw byte,

    cpu_per_byte + ratio / link_bytes_per_s,

and every PROBE_EVERY packets it tries the next option instead, so estimates
never go stale. Every packet still names its codec in its header, so the
receiver needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from multifd_cli.compression.base import Buffer, Compressor
from multifd_cli.errors import UsageError

#: CONFIG's compression byte for ``auto``: "each packet names its own codec".
#: The same number as the wire module's COMPRESSION_AUTO (a test pins the two).
AUTO_CONFIG_ID = 127

ALPHA = 0.2  # weight of a new sample in the running estimates
PROBE_EVERY = 16


@dataclass
class CodecOption:
    codec: Compressor | None  # None sends raw
    ratio: float
    cpu_per_byte: float

    def cost(self, link: float) -> float:
        return self.cpu_per_byte + self.ratio / link


class AdaptivePolicy:
    def __init__(self, codecs: list[Compressor], cap: Callable[[], float] = lambda: 0.0) -> None:
        # Optimistic starting points; the first probes replace them.
        self.options = [CodecOption(None, 1.0, 0.0)] + [
            CodecOption(c, 0.5, 1 / 500e6) for c in codecs
        ]
        # The link is judged from bytes and seconds averaged separately: one
        # send that fits in a socket buffer (or a rate limiter's burst) must not
        # make the link look infinitely fast.
        self._link_bytes = 1e9 * 0.01
        self._link_secs = 0.01
        self.cap = cap  # this channel's share of --max-bandwidth, 0 when unlimited
        self._count = 0
        self._probe = 0

    @property
    def link(self) -> float:
        """Bytes per second this channel's sends achieve."""
        measured = self._link_bytes / self._link_secs
        cap = self.cap()
        return min(measured, cap) if cap > 0 else measured

    def choose(self) -> CodecOption:
        self._count += 1
        if self._count % PROBE_EVERY == 0:
            self._probe = (self._probe + 1) % len(self.options)
            return self.options[self._probe]
        return min(self.options, key=lambda o: o.cost(self.link))

    def observe_codec(self, option: CodecOption, raw: int, packed: int, seconds: float) -> None:
        if raw <= 0:
            return
        option.ratio += ALPHA * (min(1.0, packed / raw) - option.ratio)
        option.cpu_per_byte += ALPHA * (seconds / raw - option.cpu_per_byte)

    def observe_link(self, nbytes: int, seconds: float) -> None:
        if nbytes >= 4096 and seconds > 0:
            self._link_bytes += ALPHA * (nbytes - self._link_bytes)
            self._link_secs += ALPHA * (seconds - self._link_secs)

    def summary(self) -> dict[str, float]:
        return {
            (o.codec.name if o.codec else "none"): round(o.cost(self.link) * 1e9, 3)
            for o in self.options
        }


class Auto(Compressor):
    """``--compress auto``: an ordinary registry entry whose instances choose.

    Like borg's ``Auto``, it is looked up by name like any codec; unlike a codec
    it never compresses a unit itself. Each channel asks it for a policy, and
    every packet then carries the wire id of the codec the policy picked. The
    registry keeps it out of the wire-id table, so no packet can name it.
    """

    name: ClassVar[str] = "auto"
    wire_id: ClassVar[int] = AUTO_CONFIG_ID
    adaptive: ClassVar[bool] = True

    def policy(self, cap: Callable[[], float] = lambda: 0.0) -> AdaptivePolicy:
        """A fresh per-channel policy over none, lz4 and zstd:1."""
        from multifd_cli.compression.codecs import Lz4Compressor, ZstdCompressor

        return AdaptivePolicy([Lz4Compressor(), ZstdCompressor(1)], cap=cap)

    def compress(self, data: Buffer) -> bytes:
        raise UsageError("auto picks a codec per packet; it compresses nothing itself")

    def _decompress(self, data: Buffer, raw_size: int) -> bytes:
        raise UsageError("auto never appears in a packet, so nothing decompresses with it")
