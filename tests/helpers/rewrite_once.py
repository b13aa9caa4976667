"""Between-passes hook: overwrite ALL of PATH in place with new random bytes, once.

Usage: python rewrite_once.py PATH MARKER SEED

The size stays the same; MARKER records that the rewrite happened.
"""

from __future__ import annotations

import os
import random
import sys

from mfdkit import first_time, write_random_bytes


def main() -> None:
    path, marker, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if not first_time(marker):
        return
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        write_random_bytes(f, size, rng)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
