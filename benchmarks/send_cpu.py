#!/usr/bin/env python3
"""CPU seconds per GiB of one send channel's whole path: read, hash, queue, compress, frame, send.

    send_cpu.py FILE [--codec none|lz4|zstd:1|...] [--size 256M] [--runs 5]

A full pass over the first SIZE bytes of FILE goes through the channel's own
code (HashTracker, PagedClient, ChannelSender with the codec's probe) into a
socketpair that a forked child drains. The process CPU time of this side only
is reported, best and median of RUNS, so that the receiving end and other work
on a shared machine move it less than a wall time. Run it on the bench's mixed
file (`make bench` leaves it under /dev/shm) to see zero pages and
incompressible segments handled.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from multifd_cli.compression import get_compressor
from multifd_cli.proc.workers import setup_child
from multifd_cli.send.channel import ChannelSender
from multifd_cli.send.clients import PagedClient
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.tracker import HashTracker, SourceTables

PS = 4096
GiB = 1 << 30


def one_run(fd: int, size: int, codec: str) -> float:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the drain: not counted
        a.close()
        buf = bytearray(1 << 20)
        while b.recv_into(buf):
            pass
        os._exit(0)
    b.close()
    tables = SourceTables.create("send-cpu", size, PS)
    tracker = HashTracker(PS, lambda: None)
    tracker.holes = False
    comp = None if codec == "none" else get_compressor(codec)
    client = PagedClient(ChannelSender(a, comp, SharedRateLimit(0)), PS, 128)
    t = time.process_time()
    tracker.scan(fd, 0, tables, 0, size // PS, size, True, client)
    client.flush()
    used = time.process_time() - t
    a.close()
    os.waitpid(pid, 0)
    tables.close()
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--size", default="256M", help="bytes from the start of FILE, with K/M/G")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    unit = {"K": 1 << 10, "M": 1 << 20, "G": GiB}
    size = int(a.size[:-1]) * unit[a.size[-1].upper()] if a.size[-1].isalpha() else int(a.size)
    size = min(size, os.path.getsize(a.file)) // PS * PS
    setup_child(os.getppid())  # the malloc settings a real channel runs with
    fd = os.open(a.file, os.O_RDONLY)
    try:
        runs = [one_run(fd, size, a.codec) * GiB / size for _ in range(a.runs)]
    finally:
        os.close(fd)
    print(f"{a.codec}: {min(runs):.3f} CPU-s per GiB best, {statistics.median(runs):.3f} median "
          f"({a.runs} runs of {size >> 20} MiB)")


if __name__ == "__main__":
    main()
