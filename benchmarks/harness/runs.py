"""The runs that cases compare: one multifd migration, the naive copy, and the
interleaving of variants that keeps a noisy machine from favouring one of them.
"""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from harness import GNU_TIME, NAIVE, BenchError, Sample
from harness.procs import CHILD, Proc, await_rest, cp_cmd, sync, unlink


def multifd_migrate(src: Path, dst: Path, *, channels: int = 2, compress: str | None = None,
                    extra: Sequence[str] = (), disk: bool = False,
                    writer: Sequence[str] | None = None, timeout: float = 600,
                    resume_from: Path | None = None) -> Sample:
    """One migration of src to a new dst; returns wall times, JSON counters and RSS.

    With `writer`, that command is started (and warmed up for 0.5 s) after recv listens
    and before send starts, passed as --pause-pid, and killed (SIGCONT first) afterwards.
    With `resume_from`, dst is first made a copy of that file (untimed, `cp`) and recv runs
    with --resume, updating it in place.
    """
    unlink(dst)
    if resume_from is not None:
        subprocess.run(cp_cmd(resume_from, dst), check=True)
    if writer is None:
        await_rest(src)
    if disk:
        sync()
    recv = Proc([*CHILD.multifd, "recv", "--json", "--log-level", "warning",
                 *(["--resume"] if resume_from is not None else []), str(dst)], rss=True)
    recv_start = recv.t0
    wproc: Proc | None = None
    try:
        uri = json.loads(recv.first_line())["uri"]
        cmd = [*CHILD.multifd, "send", str(src), "--to", uri, "--json", "--log-level", "warning",
               "--channels", str(channels), *extra]
        if compress:
            cmd += ["--compress", compress]
        if writer is not None:
            wproc = Proc(writer)
            time.sleep(0.5)
            if not wproc.running:
                raise BenchError(f"writer died: {wproc.stderr_tail()}")
            cmd += ["--pause-pid", str(wproc.pid)]
        t0 = time.perf_counter()
        send = Proc(cmd, t0=t0, rss=True)
        try:
            wall = send.wait(timeout)
        except BenchError:
            recv.kill()
            raise
        recv.t0 = t0
        recv_wall = recv.wait(60)
    finally:
        recv.kill()
        if wproc is not None:
            wproc.signal(signal.SIGCONT)
            wproc.kill()
    sev = send.events()
    s, r = completed_pair(send, recv)
    if dst.stat().st_size != src.stat().st_size:
        raise BenchError(f"size mismatch: {dst} is {dst.stat().st_size} bytes")
    passes = [e for e in sev if e.get("event") == "pass"]
    assert send.end is not None
    return {
        "s": wall, "recv_s": recv_wall, "from_recv_start_s": send.end - recv_start,
        "total_time_ms": s.get("total_time_ms"), "recv_total_time_ms": r.get("total_time_ms"),
        "downtime_ms": s.get("downtime_ms"), "passes": s.get("passes"),
        "expected_downtime_ms": s.get("expected_downtime_ms"),
        "transferred_bytes": s.get("transferred_bytes"), "paused": s.get("paused"),
        "normal_pages": s.get("normal_pages"), "zero_pages": s.get("zero_pages"),
        "send_rss_kb": send.maxrss_kb, "recv_rss_kb": recv.maxrss_kb,
        "pass_events": [{k: e.get(k) for k in ("pass", "dirty_bytes", "sent_bytes",
                                                "duration_ms", "final", "read_bytes", "tracker",
                                                "tracker_fallback", "expected_downtime_ms")}
                        for e in passes],
    }


def completed_pair(send: Proc, recv: Proc) -> tuple[Sample, Sample]:
    """The `completed` events of send and recv, which must carry the same digest."""
    sev, rev = send.events(), recv.events()
    done = [e for e in sev if e.get("event") == "completed"]
    rdone = [e for e in rev if e.get("event") == "completed"]
    if not done or not rdone:
        raise BenchError(f"no completed event: send {sev[-1:]} recv {rev[-1:]}")
    s, r = done[-1], rdone[-1]
    if s.get("digest") != r.get("digest"):
        raise BenchError(f"digest mismatch: send {s.get('digest')} recv {r.get('digest')}")
    return s, r


def rss_text(samples: Sequence[Sample]) -> str:
    """'send / recv' peak RSS in MiB (max over runs)."""
    s = [x["send_rss_kb"] for x in samples if x.get("send_rss_kb")]
    r = [x["recv_rss_kb"] for x in samples if x.get("recv_rss_kb")]
    if not s or not r:
        return "- (no GNU time)" if not GNU_TIME and samples and "send_rss_kb" in samples[0] else "-"
    return f"{max(s) / 1024:.0f} / {max(r) / 1024:.0f}"


def interleave(variants: dict[str, Callable[[], Sample]], rounds: int,
               log: Callable[[str], None]) -> dict[str, list[Sample]]:
    """Run each variant once per round. Two variants: A B A B ...; more: the order rotates."""
    names = list(variants)
    out: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if len(names) <= 2 else names[r % len(names):] + names[:r % len(names)]
        for n in order:
            sample = variants[n]()
            out[n].append(sample)
            log(f"  round {r + 1}/{rounds} {n}: {sample['s']:.3f} s")
    return out


def naive_copy(src: Path, dst: Path, channels: int = 2) -> Sample:
    unlink(dst)
    recv = Proc([sys.executable, str(NAIVE), "recv", str(dst), "--channels", str(channels)],
                rss=True)
    try:
        port = int(recv.first_line())
        t0 = time.perf_counter()
        send = Proc([sys.executable, str(NAIVE), "send", str(src), "--port", str(port),
                     "--channels", str(channels)], t0=t0, rss=True)
        s = send.wait(600)
        recv.t0 = t0
        r = recv.wait(60)
    finally:
        recv.kill()
    return {"s": max(s, r), "send_s": s, "recv_s": r,
            "send_rss_kb": send.maxrss_kb, "recv_rss_kb": recv.maxrss_kb}


_VERIFIED: set[Path] = set()


def verify_once(src: Path, dst: Path) -> None:
    """Compare a baseline's first copy with its source, untimed; later runs are trusted."""
    if dst in _VERIFIED:
        return
    if not filecmp.cmp(src, dst, shallow=False):
        raise BenchError(f"{dst} differs from {src}")
    _VERIFIED.add(dst)
