"""Between-passes hook: grow or shrink PATH to NEWSIZE bytes, once (MARKER records it).

Usage: python resize_once.py PATH MARKER NEWSIZE SEED

Growing appends fresh random bytes (from SEED); shrinking truncates.
"""

from __future__ import annotations

import os
import random
import sys

from mfdkit import first_time, write_random_bytes


def main() -> None:
    path, marker, new_size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if not first_time(marker):
        return
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if new_size <= size:
            f.truncate(new_size)
        else:
            write_random_bytes(f, new_size - size, rng)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
