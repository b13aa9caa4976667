"""What a kernel-tracker pass start costs, for N dirty pages in sources of several sizes.

Usage (root, on a disk filesystem):
  python tests/helpers/ktrace_cost.py DIR [SIZE_MIB ...]

For each size it fallocates a source in DIR, dirties N scattered pages with
pwrite, and times begin_pass (marker, writeback of those pages, drain) and the
reads of the ranges it reports; the median of 5 is printed. A hash scan of the
whole source from the page cache is timed once per size for comparison.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

import xxhash

from multifd_cli.send.ktrace import KernelTracker

PAGE = 4096
DIRTY = (0, 16, 256, 4096)
REPEAT = 5


def hash_scan(fd: int, size: int) -> float:
    t0 = time.perf_counter()
    off = 0
    while off < size:
        xxhash.xxh3_64_intdigest(os.pread(fd, 1 << 20, off))
        off += 1 << 20
    return time.perf_counter() - t0


def main() -> None:
    root = sys.argv[1]
    sizes = [int(s) for s in sys.argv[2:]] or [64, 1024, 4096]
    rng = random.Random(1)
    print(f"{'source':>8} {'dirty pages':>11} {'begin_pass ms':>13} {'read ms':>8} {'read MiB':>8}")
    for mib in sizes:
        path = os.path.join(root, f"ktrace-cost-{mib}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = mib << 20
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
            scan = min(hash_scan(fd, size) for _ in range(2))
            with KernelTracker([path]) as t:
                t.begin_pass()
                for n in DIRTY:
                    costs, reads, read_bytes = [], [], 0
                    for _ in range(REPEAT):
                        for _ in range(n):
                            os.pwrite(fd, b"d" * 64, rng.randrange(size // PAGE) * PAGE)
                        w = t.begin_pass()
                        assert not w.full, w.reason
                        t0 = time.perf_counter()
                        read_bytes = 0
                        for s, e in w.ranges.get(path, []):
                            e = min(e, size)
                            read_bytes += len(os.pread(fd, e - s, s))
                        reads.append(time.perf_counter() - t0)
                        costs.append(w.cost_s)
                    print(
                        f"{mib:>6}Mi {n:>11} {statistics.median(costs) * 1e3:>13.2f} "
                        f"{statistics.median(reads) * 1e3:>8.2f} {read_bytes / 2**20:>8.2f}"
                    )
            print(f"{mib:>6}Mi   hash scan of the whole source: {scan * 1e3:.1f} ms")
        finally:
            os.close(fd)
            os.unlink(path)


if __name__ == "__main__":
    main()
