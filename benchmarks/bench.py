#!/usr/bin/env python3
"""multifd benchmarks that stay honest on a noisy, shared 2-core machine.

    bench.py [--quick] [--pairs N] [--size 1G] [--only NAME,...] [--workdir DIR]

Rules every case follows:

* Every comparison is interleaved in one run: A B A B ... for N pairs (three or more
  variants run in rounds whose order rotates, A B C, B C A, C A B, ...). Tables show
  the median (with min and max) of each variant and the median of the per-pair
  ratios, never a lone time.
* Times are wall-clock times of the user-visible thing: for multifd, from starting
  `send` (recv already listening) to send's exit, which comes after recv has verified,
  fsynced and linked the copy into place.
* Data files are generated once per run (in --workdir on disk, and copies on
  /dev/shm for the tmpfs cases) and deleted at the end. Before every multifd run
  without a writer, the harness waits (untimed) until the source's mtime and ctime are
  2.5 s old, so multifd's mtime shortcut applies alike to every static run: one pass.
* Disk cases write back dirty pages with `sync` before each timed run (not timed).
  Page caches are NOT dropped (that needs root and disturbs everybody else on a shared
  machine): sources are read from the page cache by every variant alike.
* Peak RSS is GNU time's %M (ru_maxrss) for send and recv: the largest single process
  of each side (main or one channel), not the sum of the channel processes.
* The load other processes put on the machine during each case is measured from
  /proc/stat minus this run's own CPU time, and reported.
* Nothing is installed by this script. Peers that are missing get a row saying how to
  install them: `apt-get install socat rsync zstd`; the qemu case needs
  qemu-system-x86_64 (`apt-get update && apt-get install -y qemu-system-x86`).
* The tree cases copy 100,000 small files (about 3 GiB; 10,000 with --quick);
  MULTIFD_BENCH_TREE_FILES and MULTIFD_BENCH_TREE_MAX_KIB change the tree of
  tree-static and tree-scan, MULTIFD_BENCH_TREE_LIVE_FILES (10,000) that of tree-live.
  tree-pg needs PostgreSQL, root and a cgroup v2 mount.

Results go to benchmarks/results/bench-YYYYmmdd-HHMMSS.{md,json} and latest.{md,json};
the markdown is printed.

This file is only the command line and the run. Each case is a module of cases/
(listed in cases/__init__.py); what they share is in harness/: stats (medians and
per-pair ratios), procs (timed children), runs (one migration, interleaving), data,
report and snapshot (the copy of multifd_cli/ that is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from cases import CASES
from harness import REPO, BenchError, GiB, MiB
from harness.data import Data
from harness.procs import CpuMeter, kill_leftovers, unlink
from harness.report import (
    CaseResult,
    Ctx,
    fs_type,
    git_commit,
    multifd_version,
    render,
    write_results,
)
from harness.runs import multifd_migrate
from harness.snapshot import use_snapshot
from harness.stats import human_size, parse_size


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Interleaved, paired benchmarks of multifd against cp, a naive Python "
                    "copy and peers.",
        epilog="Cases: " + ", ".join(CASES))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 256 MiB files and 3 pairs (unless given)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs / rounds per comparison "
                    "(default 5, --quick 3)")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="size of the large files (default 1G, --quick 256M)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where disk data files go (default: a new directory under /var/tmp); "
                         "tmpfs copies go under /dev/shm")
    a = ap.parse_args(argv)
    a.pairs = a.pairs if a.pairs is not None else (3 if a.quick else 5)
    a.size = a.size if a.size is not None else (256 * MiB if a.quick else GiB)
    if a.pairs < 1 or a.size < MiB:
        ap.error("--pairs must be ≥ 1 and --size ≥ 1M")
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    lower = {k.lower(): k for k in CASES}
    bad = [x for x in a.only if x.lower() not in lower]
    if bad:
        ap.error(f"unknown case(s) {', '.join(bad)}; cases: {', '.join(CASES)}")
    a.only = [lower[x.lower()] for x in a.only] or list(CASES)
    return a


def run(a: argparse.Namespace, argv: Sequence[str] | None, disk: Path, shm: Path,
        log: Callable[[str], None]) -> tuple[dict[str, Any], list[CaseResult]] | None:
    """Run the selected cases in the work dirs; None if multifd does not work at all."""
    code_digest = use_snapshot(disk / "code")
    data = Data(disk, shm, log)
    ctx = Ctx(a.size, a.pairs, a.quick, data, disk, shm, log)
    meta: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": "benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "multifd": multifd_version(), "commit": git_commit(),
        "code measured": f"snapshot of multifd_cli/ taken at start, sha256 {code_digest}",
        "python": f"{platform.python_version()} ({sys.executable})",
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"kernel {platform.release()}",
        "mode": ("quick" if a.quick else "full") + f", {a.pairs} pairs, size {human_size(a.size)}",
        "disk dir": f"{disk} ({fs_type(disk)})", "tmpfs dir": f"{shm} ({fs_type(shm)})",
        "uptime at start": subprocess.run(["uptime"], capture_output=True,
                                          text=True).stdout.strip(),
    }
    log(f"work dirs {disk} and {shm}; warming up (untimed)")
    wsrc = shm / "warmup.img"
    wsrc.write_bytes(os.urandom(8 * MiB))
    try:
        multifd_migrate(wsrc, shm / "warmup.dst")
    except BenchError as e:
        log(f"multifd does not work here, nothing measured: {e}")
        return None
    unlink(shm / "warmup.dst")
    unlink(wsrc)
    results: list[CaseResult] = []
    overall = CpuMeter()
    for name in a.only:
        res = CaseResult(name)
        log(f"case {name}")
        meter, t, load0 = CpuMeter(), time.monotonic(), os.getloadavg()[0]
        try:
            CASES[name](ctx, res)
        except BenchError as e:
            res.error = str(e)
            log(f"  FAILED: {e}")
        finally:
            kill_leftovers()
        res.seconds = time.monotonic() - t
        res.load = (load0, os.getloadavg()[0])
        res.others_cores = meter.others_cores()
        results.append(res)
    others = overall.others_cores()
    meta["other processes"] = (
        f"{others:.2f} of {os.cpu_count()} CPUs busy with other work on average during the cases"
        + (" — HIGH: expect noisy numbers; trust the paired ratios and their ranges more than "
           "single times" if others >= 0.5 else ""))
    meta["uptime at end"] = subprocess.run(["uptime"], capture_output=True,
                                           text=True).stdout.strip()
    return meta, results


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    made_workdir = a.workdir is not None and not a.workdir.exists()
    parent = a.workdir if a.workdir is not None else Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="multifd-bench-", dir=parent))
    shm_root = Path("/dev/shm")
    if not shm_root.is_dir():
        shm_root = disk
        log("no /dev/shm: tmpfs cases run on disk")
    try:
        shm = Path(tempfile.mkdtemp(prefix="multifd-bench-", dir=shm_root))
        try:
            out = run(a, argv, disk, shm, log)
        finally:
            kill_leftovers()
            shutil.rmtree(shm, ignore_errors=True)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        if made_workdir:
            with contextlib.suppress(OSError):
                parent.rmdir()
    if out is None:
        return 2
    meta, results = out
    meta["total time"] = f"{time.monotonic() - start:.0f} s"
    md = render(meta, results)
    blob = {"meta": meta, "cases": {r.name: {
        "title": r.title, "setup": r.setup, "summary": r.summary, "error": r.error,
        "seconds": r.seconds, "loadavg": r.load, "others_cores": r.others_cores, "raw": r.raw,
    } for r in results}}
    paths = write_results(md, blob, stamp)
    print(md)
    log("wrote " + ", ".join(str(p.relative_to(REPO)) for p in paths))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
