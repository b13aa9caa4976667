#!/usr/bin/env python3
"""Per-file memory of send's and recv's main processes for a directory tree (issue 12).

    tree_memory.py [--files 100000[,200000...]] [--per-dir 100] [--size 100] [--runs 1]
                   [--workdir DIR]

Migrates a tree of FILES files of SIZE bytes (PER_DIR to a directory) and a 10-file
tree over loopback TCP, and prints for each side

    (peak RSS of the main process, big tree - same, 10-file tree) / FILES

That figure also holds what does not grow with the tree (one TREE message's batch
of operations in pass 1 is about 256 KiB of payload (OPS_BYTES) and its TreeOps); with several
FILES sizes it also prints the marginal cost between two sizes,
(peak RSS at FILES2 - peak RSS at FILES1) / (FILES2 - FILES1), which leaves it out.

The figure is ru_maxrss of the main process alone (getrusage(RUSAGE_SELF), read
inside it just before it exits): the channel processes are separate processes and
are not what is measured. GNU time's %M is printed alongside for reference; it is the
largest of the main process and the children it reaped, so a channel can raise it.

The trees go to /dev/shm by default, so recv's fsyncs do not dominate the run time;
the memory figure does not depend on the filesystem. The source rests 2.5 s after it
is written, so that multifd's mtime shortcut applies and pass 2 is an unchanged pass
over the whole tree (both walks held at once: the peak the issue is about).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Runs multifd's CLI in this process and records its own peak RSS (KiB) in the file
# named by argv[1]. The CLI leaves through os._exit; forked channels do too, so only
# the process that started the CLI writes the figure.
WRAP = r"""
import os, resource, sys
out = sys.argv.pop(1)
main_pid = os.getpid()
real_exit = os._exit
def record():
    if os.getpid() == main_pid:
        with open(out, "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
def leave(code):
    record()
    real_exit(code)
os._exit = leave
sys.argv[0] = "multifd"
from multifd_cli.cli import main
try:
    main()
finally:
    record()
"""

REST_S = 2.5


def make_tree(root: Path, files: int, per_dir: int, size: int) -> None:
    """FILES files of SIZE bytes, PER_DIR to a directory."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = b"x" * size
    d = root
    for i in range(files):
        if i % per_dir == 0:
            d = root / f"d{i // per_dir:05d}"
            d.mkdir()
        (d / f"f{i:07d}").write_bytes(data)


def migrate(src: Path, dst: Path, work: Path) -> dict[str, Any]:
    """One migration; peak RSS in KiB of each main process (self) and under GNU time."""
    shutil.rmtree(dst, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    py = sys.executable
    out: dict[str, Any] = {}
    recv_rss, send_rss = work / "recv.rss", work / "send.rss"
    recv_time, send_time = work / "recv.time", work / "send.time"
    for f in (recv_rss, send_rss):
        f.unlink(missing_ok=True)
    recv = subprocess.Popen(
        ["/usr/bin/time", "-o", str(recv_time), "-f", "%M", py, "-c", WRAP, str(recv_rss),
         "recv", "--json", "--log-level", "warning", "--listen", "tcp:127.0.0.1:0", str(dst)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert recv.stdout is not None
        uri = json.loads(recv.stdout.readline())["uri"]
        t = time.perf_counter()
        send = subprocess.run(
            ["/usr/bin/time", "-o", str(send_time), "-f", "%M", py, "-c", WRAP, str(send_rss),
             "send", "--json", "--log-level", "warning", str(src), "--to", uri],
            stdout=subprocess.PIPE, text=True, env=env, timeout=1800)
        out["s"] = time.perf_counter() - t
        recv.wait(600)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    if send.returncode or recv.returncode:
        raise SystemExit(f"migration failed: send exit {send.returncode}, recv exit "
                         f"{recv.returncode}\n{send.stdout[-2000:]}")
    passes = [json.loads(line) for line in send.stdout.splitlines() if '"pass"' in line]
    out["passes"] = [{k: p.get(k) for k in ("pass", "entries", "files_read", "tree_ops")}
                     for p in passes if p.get("event") == "pass"]
    for side, rss, timed in (("send", send_rss, send_time), ("recv", recv_rss, recv_time)):
        out[f"{side}_kb"] = int(rss.read_text())
        out[f"{side}_time_kb"] = int(timed.read_text().split()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", default="100000", help="comma-separated sizes")
    ap.add_argument("--per-dir", type=int, default=100)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workdir", default="/dev/shm")
    a = ap.parse_args()
    sizes = [int(x) for x in a.files.split(",")]
    work = Path(tempfile.mkdtemp(prefix="multifd-treemem-", dir=a.workdir))
    try:
        small = work / "small"
        make_tree(small, 10, a.per_dir, a.size)
        for n in sizes:
            make_tree(work / f"big{n}", n, a.per_dir, a.size)
        time.sleep(REST_S)
        per: dict[str, list[float]] = {}
        for _ in range(a.runs):
            base = migrate(small, work / "small.dst", work)
            runs = {}
            for n in sizes:
                runs[n] = run = migrate(work / f"big{n}", work / "big.dst", work)
                row: dict[str, Any] = {"files": n, "s": round(run["s"], 2), "passes": run["passes"]}
                for key in ("send_kb", "send_time_kb", "recv_kb", "recv_time_kb"):
                    row[key] = run[key]
                    row[f"{key}_10files"] = base[key]
                    name = f"{key[:-3]} B/file at {n}"
                    row[name] = round((run[key] - base[key]) * 1024 / n, 1)
                    per.setdefault(name, []).append(row[name])
                print(json.dumps(row), flush=True)
            for n1, n2 in zip(sizes, sizes[1:]):
                for key in ("send_kb", "recv_kb"):
                    name = f"{key[:-3]} marginal B/file {n1}->{n2}"
                    per.setdefault(name, []).append((runs[n2][key] - runs[n1][key]) * 1024 / (n2 - n1))
        print("main process = ru_maxrss of the main process alone; *_time = GNU time %M")
        for name, xs in per.items():
            xs.sort()
            print(f"{name}: median {xs[len(xs) // 2]:.0f} (min {xs[0]:.0f}, max {xs[-1]:.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
