"""One bandwidth limit shared by every channel of a side (--max-bandwidth).

A token bucket in an anonymous shared mapping, guarded by one lock, so that
channels with more work simply take more of the same budget. Main can change
the rate at any time (lifted to unlimited for the downtime, or by `multifd set`).
"""

from __future__ import annotations

import mmap
import multiprocessing
import time

BURST_S = 0.05  # a full bucket holds this many seconds of the rate


class SharedRateLimit:
    def __init__(self, rate: float = 0.0) -> None:
        self._mm = mmap.mmap(-1, 3 * 8)  # shared across fork: rate, tokens, last refill
        self._v = memoryview(self._mm).cast("d")
        self._lock = multiprocessing.get_context("fork").Lock()  # shared with forked channels
        self._v[1] = 0.0
        self._v[2] = time.monotonic()
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._v[0]

    def set_rate(self, rate: float) -> None:
        """Bytes per second for all channels together; 0 lifts the limit."""
        with self._lock:
            self._v[0] = float(rate)
            self._v[1] = 0.0
            self._v[2] = time.monotonic()

    def consume(self, nbytes: int) -> None:
        """Take `nbytes` from the bucket, sleeping off any debt outside the lock."""
        with self._lock:
            rate = self._v[0]
            if rate <= 0:
                return
            now = time.monotonic()
            tokens = min(rate * BURST_S, self._v[1] + (now - self._v[2]) * rate) - nbytes
            self._v[1] = tokens
            self._v[2] = now
        if tokens < 0:
            time.sleep(-tokens / rate)
