"""An unmodified writer for the kernel-tracker tests, or the flusher that races it.

Usage: python ktrace_writer.py PATH MODE SEED

MODE is one of:
  pwrite  buffered 4 KiB pwrites, mostly into a hot set of pages, some anywhere
  mmap    the same stores through a shared mapping
  direct  the same pwrites with O_DIRECT, bypassing the page cache
  flush   no writes: force writeback of PATH in a loop, like the kernel's flusher

Every store writes a new counter, so a page missed by the tracker differs from
the copy. It prints "ready" once it has started; stop it with SIGSTOP/SIGKILL.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
import sys
import time

PAGE = 4096
HOT_PAGES = 64


def _stamp(counter: int, page: int) -> bytes:
    return struct.pack("<QQ", counter, page) * (PAGE // 16)


def _pages(size: int, rng: random.Random) -> int:
    n = size // PAGE
    if rng.random() < 0.7:
        return rng.randrange(min(HOT_PAGES, n))
    return rng.randrange(n)


def write_pwrite(path: str, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR)
    size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
    counter = 0
    print("ready", flush=True)
    while True:
        counter += 1
        page = _pages(size, rng)
        os.pwrite(fd, _stamp(counter, page), page * PAGE)
        if counter % 8 == 0:
            time.sleep(0.001)  # about 30 MiB/s on an idle core; the machine is shared


def write_mmap(path: str, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR)
    size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    counter = 0
    print("ready", flush=True)
    while True:
        counter += 1
        page = _pages(size, rng)
        # Stores of part of a page, not whole pages: the fault marks the folio dirty,
        # later stores to it while still dirty emit nothing.
        off = page * PAGE + rng.randrange(PAGE // 16) * 16
        m[off : off + 16] = struct.pack("<QQ", counter, page)
        if counter % 8 == 0:
            time.sleep(0.001)


def write_direct(path: str, rng: random.Random) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    counter = 0
    print("ready", flush=True)
    while True:
        counter += 1
        page = _pages(size, rng)
        buf[:] = _stamp(counter, page)
        os.pwritev(fd, [buf], page * PAGE)
        if counter % 8 == 0:
            time.sleep(0.001)


def flush(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    print("ready", flush=True)
    while True:
        libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(1 | 2 | 4))
        time.sleep(0.002)


def main() -> None:
    path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    if mode == "pwrite":
        write_pwrite(path, rng)
    elif mode == "mmap":
        write_mmap(path, rng)
    elif mode == "direct":
        write_direct(path, rng)
    elif mode == "flush":
        flush(path)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
