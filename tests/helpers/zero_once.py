"""Between-passes hook: zero LENGTH bytes of PATH at OFFSET, once (MARKER records it).

Usage: python zero_once.py PATH MARKER OFFSET LENGTH
"""

from __future__ import annotations

import os
import sys

from mfdkit import first_time


def main() -> None:
    path, marker, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if not first_time(marker):
        return
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
