"""Between-passes hook: grow or shrink PATH to NEWSIZE bytes, once (MARKER records it).

Usage: python resize_once.py PATH MARKER NEWSIZE SEED

Growing appends fresh random bytes (from SEED); shrinking truncates.
"""

from __future__ import annotations

import os
import random
import sys


def main() -> None:
    path, marker, new_size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # already done once
    os.close(fd)
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if new_size <= size:
            f.truncate(new_size)
        else:
            left = new_size - size
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
