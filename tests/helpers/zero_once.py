"""Between-passes hook: zero LENGTH bytes of PATH at OFFSET, once (MARKER records it).

Usage: python zero_once.py PATH MARKER OFFSET LENGTH
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    path, marker, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # already done once
    os.close(fd)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
