"""Between-passes hook: overwrite ALL of PATH in place with new random bytes, once.

Usage: python rewrite_once.py PATH MARKER SEED

The size stays the same; MARKER records that the rewrite happened.
"""

from __future__ import annotations

import os
import random
import sys


def main() -> None:
    path, marker, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # already done once
    os.close(fd)
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
