#!/usr/bin/env python3
"""CPU seconds per GiB of the send side's tracker, with no socket behind it.

    tracker_cpu.py [--size 256M] [--dir /dev/shm]

Scans a random file twice per mode, a full pass (pass 1: hash and queue every
page) and a pass over an unchanged file (the chunk-hash scan), into a client
that only counts pages, and prints the best of three runs of process CPU time
per GiB next to what `preadv` alone costs for the same reads. CPU time, not
wall time, so that other work on a shared machine moves it less.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from multifd_cli.send.clients import PagedClient
from multifd_cli.send.tracker import READ_BYTES, HashTracker, SourceTables

PS = 4096
GiB = 1 << 30


class CountingSink:
    """Stands in for a channel: counts the pages it is handed."""

    def __init__(self) -> None:
        self.pages = 0

    def send_pages(self, block: int, normal: list[int], zero: list[int], hashes: list[int],
                   payload: list[memoryview | bytes]) -> None:
        self.pages += len(normal) + len(zero)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M", help="file size, with K/M/G (default 256M)")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    a = ap.parse_args()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": GiB}
    size = int(a.size[:-1]) * unit[a.size[-1].upper()] if a.size[-1].isalpha() else int(a.size)
    path = a.dir / f"tracker-cpu-{os.getpid()}.bin"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        for full in (True, False):
            tables = SourceTables.create("bench", size, PS)
            tracker = HashTracker(PS, lambda: None)
            tracker.holes = False
            best = float("inf")
            for _ in range(3):
                sink = CountingSink()
                client = PagedClient(sink, PS, 128)
                t = time.process_time()
                tracker.scan(fd, 0, tables, 0, size // PS, size, full, client)
                client.flush()
                best = min(best, time.process_time() - t)
            buf = memoryview(bytearray(READ_BYTES))
            t = time.process_time()
            for off in range(0, size, READ_BYTES):
                os.preadv(fd, [buf], off)
            pread = time.process_time() - t
            tables.close()
            what = "full pass " if full else "no changes"
            print(f"{what}: {best * GiB / size:.3f} CPU-s/GiB (preadv alone {pread * GiB / size:.3f})")
    finally:
        os.close(fd)
        path.unlink()


if __name__ == "__main__":
    main()
