#!/usr/bin/env python3
"""A writer that keeps dirtying random pages of a file at a set rate.

Used by the demo, the tests and the benchmark as the program that keeps running
while its file is migrated. It writes whole pages of fresh random bytes at
random page offsets inside a hot set at the start of the file.

    writer.py FILE --rate 32M --hot-set 64M [--threads 2] [--page-size 4096]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time


def size_arg(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("/S")
    return int(float(t.rstrip("KMG") or 0) * units[t[-1] if t[-1] in "KMG" else ""])


def write_loop(path: str, rate: int, hot: int, page: int, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    pages = max(1, hot // page)
    tick = 0.01
    per_tick = max(1, int(rate * tick) // page)
    next_t = time.monotonic()
    try:
        while not stop.is_set():
            for _ in range(per_tick):
                os.pwrite(fd, rng.randbytes(page), rng.randrange(pages) * page)
            next_t += tick
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # fell behind: don't burst to catch up
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rate", type=size_arg, default=32 << 20, help="bytes/s (e.g. 32M)")
    ap.add_argument("--hot-set", type=size_arg, default=64 << 20, help="bytes at the start")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    a = ap.parse_args()
    hot = min(a.hot_set, os.path.getsize(a.file))
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=write_loop,
            args=(a.file, a.rate // a.threads, hot, a.page_size, a.seed + i, stop),
            daemon=True,
        )
        for i in range(a.threads)
    ]
    for t in threads:
        t.start()
    try:
        if a.seconds:
            time.sleep(a.seconds)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    stop.set()


if __name__ == "__main__":
    main()
