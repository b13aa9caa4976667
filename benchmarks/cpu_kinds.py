#!/usr/bin/env python3
"""Where one migration's CPU goes, by kind: codec, interpreter, kernel, hashing.

    cpu_kinds.py SRC [--multifd PATH] [--dest /dev/shm/cpu-kinds.out] [-- SEND ARGS...]

Starts `multifd recv` and `multifd send SRC` on loopback, with `perf record -e
cpu-clock -a -F 1000` around the send (recv is already listening), then sums
the samples of every `multifd` (or `python`) process by shared object and symbol into a few
kinds and prints CPU-seconds per kind. The machine-wide sampling counts
multifd's own processes only, not perf or other work; perf's overhead inflates
every kind a little, so compare kinds within one run, not runs against wall
times. Needs `perf` (linux-perf) and root or perf_event_paranoid <= 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def kind(dso: str, sym: str) -> str:
    if "LZ4_compress" in sym:
        return "lz4 compress"
    if "LZ4_decompress" in sym:
        return "lz4 decompress"
    if "zstd" in dso or dso.startswith("backend_c") or sym.startswith("ZSTD_"):
        return "zstd"
    if "libz." in dso or dso.startswith("zlib."):
        return "zlib"
    if "libpython" in dso:
        return "python interpreter"
    if "xxhash" in dso:
        return "xxh3"
    if "kernel" in dso:
        return "kernel (copies, sockets, page cache)"
    if dso.startswith("libc"):
        return "libc (memcpy, malloc)"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--multifd", default=shutil.which("multifd") or "multifd")
    ap.add_argument("--dest", default="/dev/shm/cpu-kinds.out")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    send_args = argv[cut + 1 :]  # after --: extra `multifd send` options
    if not shutil.which("perf"):
        sys.exit("cpu_kinds.py: perf not found (apt-get install linux-perf)")
    dest = Path(a.dest)
    dest.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        recv = subprocess.Popen([a.multifd, "recv", "--json", "--log-level", "warning", str(dest)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            uri = json.loads(recv.stdout.readline())["uri"]
            subprocess.run(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "-a", "-o", data, "--",
                 a.multifd, "send", a.src, "--to", uri, "--log-level", "warning", *send_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
            )
            recv.wait(60)
        finally:
            if recv.poll() is None:
                recv.kill()
        report = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "comm,dso,sym", "-n", "-q",
             "-g", "none"],
            capture_output=True, text=True, check=True,
        ).stdout
    dest.unlink(missing_ok=True)
    samples: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        f = line.split()
        if len(f) < 5 or f[2] not in ("multifd", "python", "python3"):
            continue
        samples[kind(f[3], f[-1])] += int(f[1])
    total = sum(samples.values())
    for k, n in samples.most_common():
        print(f"{n / 1000:6.2f} CPU-s  {n / total * 100:5.1f} %  {k}")
    print(f"{total / 1000:6.2f} CPU-s  total of multifd's processes")


if __name__ == "__main__":
    main()
