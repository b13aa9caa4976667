"""Which parts of a packet are worth compressing: a cheap probe per segment.

Already-compressed data (media, archives, encrypted volumes, or the random
quarter of the benchmark's mixed data) costs a codec nearly full price and
comes out no smaller: lz4 spent 0.45 CPU-s per GiB of it here. Compressing a
4 KiB sample of each 64 KiB segment costs about a sixteenth of that and tells
the segments apart, so the channel sends incompressible ones raw, uncompressed.
A sample that misjudges only costs ratio (or CPU), never correctness: every
packet still says how its payload is encoded.
"""

from __future__ import annotations

from multifd_cli.compression.base import Buffer, Compressor

PROBE_PAGES = 16  # pages per probed segment: 64 KiB of 4 KiB pages
PROBE_SAMPLE = 4096  # bytes compressed from the start of each segment
#: A sample that does not shrink below this fraction marks its segment incompressible.
PROBE_KEEP_BELOW = 0.9


def incompressible_segments(comp: Compressor, data: Buffer, segment: int) -> list[bool]:
    """For each `segment`-byte slice of `data` (the last may be shorter): True if a
    sample of it did not shrink enough to be worth compressing."""
    mv = memoryview(data).cast("B")
    flags = []
    for lo in range(0, len(mv), segment):
        sample = mv[lo : lo + min(segment, PROBE_SAMPLE)]
        flags.append(len(comp.compress(sample)) >= PROBE_KEEP_BELOW * len(sample))
    return flags
