"""Others' bios queued but not yet seen completing, found by sector in O(log n).

A bio queued before a pass start's marker may complete after it, and its data
then belongs to the later window too, so the tracker keeps every foreign write
until its completion shows up. On a disk that DEST shares with the source (recv
on the same host), thousands of bios arrive per pass; matching each completion
against a plain list cost tens of milliseconds of downtime in the final pass.
"""

from __future__ import annotations

import bisect

from multifd_cli.send.ktrace.bio import Bio


class Inflight:
    """Queued bios indexed by (device, start sector), the oldest dropped past `cap`."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._keys: list[tuple[int, int, int]] = []  # (dev, sector, seq), sorted
        self._bios: dict[int, Bio] = {}  # seq -> bio
        self._seq = 0
        self._longest = 0  # sectors of the longest bio held: bounds the search

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, b: Bio) -> None:
        self._seq += 1
        bisect.insort(self._keys, (b.dev, b.sector, self._seq))
        self._bios[self._seq] = b
        self._longest = max(self._longest, b.sectors)
        if len(self._keys) > self._cap:
            # A bio-based disk never completes a request: keep the newest half.
            keep = sorted(self._bios)[-(self._cap // 2):]
            self._bios = {s: self._bios[s] for s in keep}
            self._keys = sorted((b.dev, b.sector, s) for s, b in self._bios.items())
            self._longest = max((b.sectors for b in self._bios.values()), default=0)

    def complete(self, ev: Bio) -> bool:
        """Drop every held bio that `ev` overlaps; True if there was one."""
        lo = bisect.bisect_left(self._keys, (ev.dev, ev.sector - self._longest, -1))
        hi = bisect.bisect_left(self._keys, (ev.dev, ev.sector + ev.sectors, -1))
        hits = [k for k in range(lo, hi) if self._bios[self._keys[k][2]].overlaps(ev)]
        for k in reversed(hits):
            del self._bios[self._keys.pop(k)[2]]
        return bool(hits)
