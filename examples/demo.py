#!/usr/bin/env python3
"""`make demo`: live-migrate a 256 MiB file that another process keeps writing.

It creates the file, starts a writer that dirties random 4 KiB pages at 32 MiB/s
inside a 64 MiB hot set, runs `multifd recv` and `multifd send --pause-pid` on
localhost, prints the passes and the downtime, and verifies that the copy equals
the source as it was when the writer was paused (send leaves it paused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MULTIFD = [sys.executable, "-m", "multifd_cli"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rate", default="32M")
    ap.add_argument("--hot-set", default="64M")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--downtime-limit", type=float, default=300)
    ap.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
    a = ap.parse_args()

    work = Path(a.dir or tempfile.mkdtemp(prefix="multifd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "source.img", work / "dest.img"
    dst.unlink(missing_ok=True)
    print(f"creating {a.size_mib} MiB of random data in {src}")
    with open(src, "wb") as f:
        for _ in range(a.size_mib):
            f.write(os.urandom(1 << 20))

    writer = subprocess.Popen(
        [sys.executable, str(HERE / "writer.py"), str(src), "--rate", a.rate, "--hot-set", a.hot_set]
    )
    recv = send = None
    try:
        time.sleep(0.3)
        print(f"writer pid {writer.pid}: {a.rate}/s of random pages in a {a.hot_set} hot set")
        recv = subprocess.Popen(
            [*MULTIFD, "recv", "--json", "--log-level", "warning", str(dst)],
            stdout=subprocess.PIPE, text=True,
        )
        assert recv.stdout is not None
        uri = json.loads(recv.stdout.readline())["uri"]
        send = subprocess.Popen(
            [*MULTIFD, "send", str(src), "--to", uri, "--json", "--log-level", "warning",
             "--channels", str(a.channels), "--pause-pid", str(writer.pid),
             "--downtime-limit", str(a.downtime_limit)],
            stdout=subprocess.PIPE, text=True,
        )
        out, _ = send.communicate(timeout=600)
        recv.wait(timeout=60)
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        print()
        print(f"{'pass':>4} {'dirty MiB':>10} {'sent MiB':>9} {'ms':>7} {'MB/s':>7} "
              f"{'expected downtime ms':>21}")
        for e in events:
            if e["event"] == "pass":
                exp = e["expected_downtime_ms"]
                print(f"{e['pass']:>4} {e['dirty_bytes'] / 2**20:>10.1f} {e['sent_bytes'] / 2**20:>9.1f} "
                      f"{e['duration_ms']:>7.0f} {e['bandwidth_bytes_per_s'] / 1e6:>7.0f} "
                      f"{'-' if exp is None else f'{exp:.0f}':>21}"
                      f"{'   <- final pass, writer paused' if e['final'] else ''}")
        last = events[-1] if events else {"event": "none"}
        if send.returncode != 0 or last["event"] != "completed":
            print(f"\nmigration failed: send exit {send.returncode}: {last}")
            return 1
        print(f"\ntotal {last['total_time_ms']:.0f} ms, downtime {last['downtime_ms']:.0f} ms "
              f"(limit {a.downtime_limit:g} ms), {last['passes']} passes, "
              f"{last['transferred_bytes'] / 2**20:.0f} MiB on the wire")
        same = sha256(src) == sha256(dst)
        print(f"verify: sha256(dest) {'==' if same else '!='} sha256(source at the pause): "
              f"{'OK' if same else 'MISMATCH'}")
        return 0 if same and recv.returncode == 0 else 1
    finally:
        for p in (send, recv):
            if p is not None and p.poll() is None:
                p.kill()
        writer.send_signal(signal.SIGCONT)
        writer.kill()
        writer.wait()
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
