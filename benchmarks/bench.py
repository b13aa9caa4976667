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

Results go to benchmarks/results/bench-YYYYmmdd-HHMMSS.{md,json} and latest.{md,json};
the markdown is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import functools
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
WRITER = REPO / "examples" / "writer.py"
NAIVE = HERE / "naive.py"
MULTIFD = [sys.executable, "-m", "multifd_cli"]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
REST_S = 2.5
INSTALL_HINT = "apt-get install socat rsync zstd"

Sample = dict[str, Any]

# Children run with this environment and working directory: set by use_snapshot().
CHILD_ENV: dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFD_")}
CHILD_CWD: Path = REPO


class BenchError(Exception):
    """A run failed; the case is reported as failed and the next case runs."""


# ---------------------------------------------------------------------------
# Small helpers


def parse_size(text: str) -> int:
    """'1G', '256M', '512K' (powers of 1024) or a plain byte count."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": KiB, "M": MiB, "G": GiB}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:.{digits}f}"


def spread(xs: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """'median (min-max)'."""
    if not xs:
        return "-"
    return (f"{fmt(med(xs) * scale, digits)} ({fmt(min(xs) * scale, digits)}"
            f"–{fmt(max(xs) * scale, digits)})")


@dataclass
class RatioStats:
    """Per-pair ratios a[i] / b[i]; `below` counts pairs where a < b."""

    ratios: list[float]

    @property
    def median(self) -> float:
        return med(self.ratios)

    @property
    def below(self) -> int:
        return sum(r < 1 for r in self.ratios)

    def text(self, digits: int = 2) -> str:
        if not self.ratios:
            return "-"
        return (f"{self.median:.{digits}f} ({min(self.ratios):.{digits}f}–"
                f"{max(self.ratios):.{digits}f})")

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "per_pair": self.ratios}


def ratio(a: Sequence[float], b: Sequence[float]) -> RatioStats:
    return RatioStats([x / y for x, y in zip(a, b) if y > 0])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def sync(path: Path | None = None) -> None:
    """Write back dirty pages (untimed): all of them, or one file's."""
    subprocess.run(["sync", *([str(path)] if path else [])], check=True)


def await_rest(path: Path) -> float:
    """Sleep (untimed) until path's mtime and ctime are REST_S old; return the seconds slept.

    multifd trusts an unchanged size/mtime/ctime only when both are older than 2 s (the
    mtime shortcut), so a file at rest migrates in one pass; a file written a moment ago
    needs a confirmation pass. Every static copy here waits for that, so all runs alike
    measure the at-rest case rather than a mix of both.
    """
    st = path.stat()
    age = time.time() - max(st.st_mtime, st.st_ctime)
    wait = max(0.0, REST_S - age)
    time.sleep(wait)
    return wait


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on 127.0.0.1:port, without connecting to it."""
    want = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[1].endswith(want) and cols[3] == "0A":
                        return
        time.sleep(0.01)
    raise BenchError(f"nothing listens on port {port} after {timeout} s")


class CpuMeter:
    """CPU used by other processes (cores, averaged) while a case runs.

    Whole-machine busy time from /proc/stat minus this process's and its reaped
    children's CPU time; approximate (children still running are not counted yet).
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    def _busy(self) -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / self.hz

    @staticmethod
    def _own() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def others_cores(self) -> float:
        dt = time.monotonic() - self.t0
        if dt <= 0:
            return 0.0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / dt)


# ---------------------------------------------------------------------------
# Running processes: wall time from a common t0, peak RSS from GNU time

_LIVE: list[Proc] = []  # every process this run started and has not reaped


class Proc:
    """A child whose stdout lines, exit time and peak RSS are collected by threads.

    Each child leads its own process group, so kill() takes pipelines and channel
    processes with it. Only the waiter thread reaps the child; nothing here may call
    Popen.poll/wait/kill, which would reap it first.

    With rss=True the command runs under GNU time (`-f %M`): ru_maxrss of the command
    and its reaped descendants (the largest single process). Measuring it with wait4()
    from here would be wrong: Linux carries the pre-exec high-water mark (the forked
    copy of this harness) over exec.
    """

    def __init__(self, cmd: Sequence[str], *, t0: float | None = None,
                 shell: bool = False, rss: bool = False) -> None:
        self.cmd = list(cmd)
        self.rss_file: str | None = None
        argv: Any = cmd[0] if shell else list(cmd)
        if rss and GNU_TIME:
            fd, self.rss_file = tempfile.mkstemp(prefix="multifd-bench-rss-")
            os.close(fd)
            argv = [GNU_TIME, "-f", "%M", "-o", self.rss_file,
                    *(["sh", "-c", cmd[0]] if shell else cmd)]
            shell = False
        self.t0 = time.perf_counter() if t0 is None else t0
        self.popen = subprocess.Popen(
            argv, shell=shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=CHILD_CWD, env=CHILD_ENV,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        _LIVE.append(self)
        self.lines: list[str] = []
        self.err: list[str] = []
        self.end: float | None = None
        self.returncode: int | None = None
        self.maxrss_kb: int | None = None
        self._first = threading.Event()
        self._done = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(out, sink), daemon=True)
                         for out, sink in ((self.popen.stdout, self.lines),
                                           (self.popen.stderr, self.err))]
        for t in [*self._readers, threading.Thread(target=self._wait, daemon=True)]:
            t.start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        try:
            for line in stream:
                sink.append(line)
                self._first.set()
        finally:
            self._first.set()
            with contextlib.suppress(OSError):
                stream.close()

    def _wait(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            self.returncode = -1
        finally:
            self.end = time.perf_counter()
            self.popen.returncode = self.returncode  # Popen must not wait for it again
            with contextlib.suppress(ValueError):
                _LIVE.remove(self)
            if self.rss_file:  # empty if GNU time itself was killed
                with contextlib.suppress(OSError, ValueError, IndexError), open(self.rss_file) as f:
                    self.maxrss_kb = int(f.read().split()[-1])
                unlink(Path(self.rss_file))
            self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def name(self) -> str:
        return " ".join(self.cmd)[:120]

    def first_line(self, timeout: float = 30.0) -> str:
        if not self._first.wait(timeout) or not self.lines:
            self.kill()
            raise BenchError(f"no output from {self.name}: {self.stderr_tail()}")
        return self.lines[0]

    def wait(self, timeout: float) -> float:
        """Wait for exit and for its output; return the wall time since t0.

        A non-zero exit raises BenchError.
        """
        if not self._done.wait(timeout):
            self.kill()
            raise BenchError(f"{self.name} timed out after {timeout:.0f} s")
        for t in self._readers:  # a grandchild may hold the pipe: do not wait forever
            t.join(5)
        assert self.end is not None
        if self.returncode != 0:
            raise BenchError(f"{self.name} exited {self.returncode}: {self.stderr_tail()}")
        return self.end - self.t0

    def signal(self, sig: int) -> None:
        """Signal the child's whole process group."""
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self._done.wait(10)

    def stderr_tail(self) -> str:
        return "".join(self.err[-5:]).strip() or "(no stderr)"

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def timed(cmds: Sequence[Sequence[str]], timeout: float = 600) -> list[float]:
    """Run commands one after another; return the cumulative wall time after each."""
    t0 = time.perf_counter()
    marks = []
    for cmd in cmds:
        p = Proc(cmd, t0=t0)
        marks.append(p.wait(timeout))
    return marks


def kill_leftovers() -> None:
    for p in list(_LIVE):
        p.signal(signal.SIGCONT)
        p.kill()


# ---------------------------------------------------------------------------
# multifd runs


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
    recv = Proc([*MULTIFD, "recv", "--json", "--log-level", "warning",
                 *(["--resume"] if resume_from is not None else []), str(dst)], rss=True)
    recv_start = recv.t0
    wproc: Proc | None = None
    try:
        uri = json.loads(recv.first_line())["uri"]
        cmd = [*MULTIFD, "send", str(src), "--to", uri, "--json", "--log-level", "warning",
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
    sev, rev = send.events(), recv.events()
    done = [e for e in sev if e.get("event") == "completed"]
    rdone = [e for e in rev if e.get("event") == "completed"]
    if not done or not rdone:
        raise BenchError(f"no completed event: send {sev[-1:]} recv {rev[-1:]}")
    s, r = done[-1], rdone[-1]
    if s.get("digest") != r.get("digest"):
        raise BenchError(f"digest mismatch: send {s.get('digest')} recv {r.get('digest')}")
    if dst.stat().st_size != src.stat().st_size:
        raise BenchError(f"size mismatch: {dst} is {dst.stat().st_size} bytes")
    passes = [e for e in sev if e.get("event") == "pass"]
    assert send.end is not None
    return {
        "s": wall, "recv_s": recv_wall, "from_recv_start_s": send.end - recv_start,
        "total_time_ms": s.get("total_time_ms"), "recv_total_time_ms": r.get("total_time_ms"),
        "downtime_ms": s.get("downtime_ms"), "passes": s.get("passes"),
        "transferred_bytes": s.get("transferred_bytes"), "paused": s.get("paused"),
        "normal_pages": s.get("normal_pages"), "zero_pages": s.get("zero_pages"),
        "send_rss_kb": send.maxrss_kb, "recv_rss_kb": recv.maxrss_kb,
        "pass_events": [{k: e.get(k) for k in ("pass", "dirty_bytes", "sent_bytes",
                                                "duration_ms", "final")} for e in passes],
    }


def rss_text(samples: Sequence[Sample]) -> str:
    """'send / recv' peak RSS in MiB (max over runs)."""
    s = [x["send_rss_kb"] for x in samples if x.get("send_rss_kb")]
    r = [x["recv_rss_kb"] for x in samples if x.get("recv_rss_kb")]
    if not s or not r:
        return "- (no GNU time)" if not GNU_TIME and samples and "send_rss_kb" in samples[0] else "-"
    return f"{max(s) / 1024:.0f} / {max(r) / 1024:.0f}"


# ---------------------------------------------------------------------------
# Interleaving


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


def secs(samples: Sequence[Sample], key: str = "s") -> list[float]:
    return [float(x[key]) for x in samples]


# ---------------------------------------------------------------------------
# Data


def stdlib_text() -> bytes:
    """All of the standard library's .py sources, concatenated in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "dist-packages" in f.parts:
            continue
        with contextlib.suppress(OSError):
            parts.append(f.read_bytes())
    text = b"".join(parts)
    if len(text) < MiB:
        raise BenchError(f"found only {len(text)} bytes of .py sources under {root}")
    return text


class Data:
    """Data files, each made once per run on first use, deleted by cleanup()."""

    def __init__(self, disk: Path, shm: Path, log: Callable[[str], None]) -> None:
        self.disk, self.shm, self.log = disk, shm, log
        self._made: dict[str, Path] = {}
        self._text: bytes | None = None

    def _once(self, key: str, path: Path, make: Callable[[Path], object]) -> Path:
        if key not in self._made:
            t = time.perf_counter()
            make(path)
            self._made[key] = path
            self.log(f"  made {path} ({human_size(path.stat().st_size)}) in "
                     f"{time.perf_counter() - t:.1f} s")
        return self._made[key]

    def random_disk(self, size: int) -> Path:
        """Random bytes on disk (written back, so later syncs have nothing of it left)."""
        def make(p: Path) -> None:
            with open(p, "wb") as f:
                left = size
                while left:
                    n = min(left, 4 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            sync(p)
        return self._once(f"random-disk-{size}", self.disk / f"random-{size}.img", make)

    def copy_disk(self, name: str, size: int) -> Path:
        """A private copy of random_disk(size): for writers that change it."""
        src = self.random_disk(size)

        def make(p: Path) -> None:
            shutil.copyfile(src, p)
            sync(p)
        return self._once(f"{name}-{size}", self.disk / f"{name}-{size}.img", make)

    def changed_disk(self, size: int, fraction: float) -> Path:
        """random_disk(size) with `fraction` of its 4 KiB pages rewritten with new random bytes.

        The pages are a seeded random choice (the same in every run), written with pwrite
        in place; the file is written back before use.
        """
        src = self.random_disk(size)

        def make(p: Path) -> None:
            shutil.copyfile(src, p)
            pages = size // (4 * KiB)
            fd = os.open(p, os.O_WRONLY)
            try:
                for i in sorted(random.Random(2).sample(range(pages), int(pages * fraction))):
                    os.pwrite(fd, os.urandom(4 * KiB), i * 4 * KiB)
            finally:
                os.close(fd)
            sync(p)
        return self._once(f"changed-disk-{size}-{fraction}",
                          self.disk / f"changed-{size}.img", make)

    def random_shm(self, size: int) -> Path:
        src = self.random_disk(size)
        return self._once(f"random-shm-{size}", self.shm / f"random-{size}.img",
                          lambda p: shutil.copyfile(src, p))

    def mixed_shm(self, size: int) -> Path:
        """A quarter zero, a quarter random, half stdlib .py text, in shuffled 64 KiB chunks."""
        def make(p: Path) -> None:
            if self._text is None:
                self._text = stdlib_text()
            text, chunk = self._text, 64 * KiB
            n = size // chunk
            kinds = [0] * (n // 4) + [1] * (n // 4)
            kinds += [2] * (n - len(kinds))
            random.Random(1).shuffle(kinds)
            zero, pos = bytes(chunk), 0
            with open(p, "wb") as f:
                for k in kinds:
                    if k == 0:
                        f.write(zero)
                    elif k == 1:
                        f.write(os.urandom(chunk))
                    else:
                        piece = text[pos:pos + chunk]
                        if len(piece) < chunk:
                            piece += text[:chunk - len(piece)]
                        pos = (pos + chunk) % len(text)
                        f.write(piece)
                if size % chunk:
                    f.write(zero[:size % chunk])
        return self._once(f"mixed-shm-{size}", self.shm / f"mixed-{size}.img", make)


# ---------------------------------------------------------------------------
# Cases


@dataclass
class Ctx:
    size: int
    pairs: int
    quick: bool
    data: Data
    disk: Path
    shm: Path
    log: Callable[[str], None]


@dataclass
class CaseResult:
    name: str
    title: str = ""
    setup: str = ""
    tables: list[str] = field(default_factory=list)
    summary: list[list[str]] = field(default_factory=list)  # [metric, value, target, verdict]
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    others_cores: float = 0.0


def verdict(ok: bool, detail: str = "") -> str:
    return ("met" if ok else "**missed**") + (f" ({detail})" if detail else "")


def cp_cmd(src: Path, dst: Path) -> list[str]:
    return ["cp", "--reflink=never", str(src), str(dst)]


def case_static_disk(ctx: Ctx, res: CaseResult) -> None:
    """multifd (2 channels, no compression) to a new file on disk vs cp + sync."""
    src = ctx.data.random_disk(ctx.size)
    d_m, d_c = ctx.disk / "static-disk.multifd", ctx.disk / "static-disk.cp"
    res.title = f"static-disk: {human_size(ctx.size)} of random data to a new file on disk"
    res.setup = (f"Source and destination on disk ({ctx.disk}), source in the page cache. "
                 "multifd: 2 channels, no compression, wall time from starting send (recv "
                 "listening) to send's exit; its copy is fsynced. Baseline: `cp --reflink=never "
                 "SRC DST && sync DST`, both timed. `sync` (untimed) before every run.")

    def cp_sync() -> Sample:
        unlink(d_c)
        sync()
        cp_s, total = timed([cp_cmd(src, d_c), ["sync", str(d_c)]])
        verify_once(src, d_c)
        return {"s": total, "cp_s": cp_s, "sync_s": total - cp_s}

    runs = interleave({
        "multifd": lambda: multifd_migrate(src, d_m, disk=True),
        "cp+sync": cp_sync,
    }, ctx.pairs, ctx.log)
    unlink(d_m)
    unlink(d_c)
    m, c = runs["multifd"], runs["cp+sync"]
    rt = ratio(secs(m), secs(c))
    mbs = ctx.size / 1e6
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s", "detail", "peak RSS MiB send / recv"],
        [["multifd send", spread(secs(m)), f"{mbs / med(secs(m)):.0f}",
          f"recv exits at {spread(secs(m, 'recv_s'))} s; JSON total_time_ms "
          f"{spread(secs(m, 'total_time_ms'), 0)}; recv total_time_ms "
          f"{spread(secs(m, 'recv_total_time_ms'), 0)}; passes {m[0]['passes']}",
          rss_text(m)],
         ["cp + sync", spread(secs(c)), f"{mbs / med(secs(c)):.0f}",
          f"cp {spread(secs(c, 'cp_s'))} s + sync {spread(secs(c, 'sync_s'))} s", "-"]]))
    res.tables.append(md_table(
        ["ratio", "median of per-pair ratios (min–max)", "multifd faster in", "target"],
        [["multifd / (cp + sync)", rt.text(), f"{rt.below}/{len(rt.ratios)} pairs",
          "≤ 1.2: " + verdict(rt.median <= 1.2)]]))
    res.summary.append(["multifd / (cp+sync), wall", rt.text(), "≤ 1.2", verdict(rt.median <= 1.2)])
    res.raw = {"runs": runs, "ratio": rt.as_json()}


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


def case_static_tmpfs(ctx: Ctx, res: CaseResult) -> None:
    """multifd vs cp vs a naive 2+2-process Python copy, all on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    d_m, d_c, d_n = (ctx.shm / f"static-tmpfs.{x}" for x in ("multifd", "cp", "naive"))
    res.title = f"static-tmpfs: {human_size(ctx.size)} of random data, tmpfs to tmpfs"
    res.setup = (f"Source and destination on tmpfs ({ctx.shm}). multifd: 2 channels, no "
                 "compression, fsync included (a no-op on tmpfs). `cp --reflink=never`. "
                 "naive: benchmarks/naive.py, 2 sender processes (pread + sendall of half the "
                 "file each, own TCP socket) and 2 receiver processes (recv_into + pwrite), "
                 "no hashing, no verification; timed until both sides exited. Rounds rotate "
                 "the order.")
    def naive() -> Sample:
        s = naive_copy(src, d_n)
        verify_once(src, d_n)
        return s

    def cp() -> Sample:
        unlink(d_c)
        s = {"s": timed([cp_cmd(src, d_c)])[0]}
        verify_once(src, d_c)
        return s

    runs = interleave({"multifd": lambda: multifd_migrate(src, d_m), "cp": cp, "naive": naive},
                      ctx.pairs, ctx.log)
    for p in (d_m, d_c, d_n):
        unlink(p)
    m, c, n = runs["multifd"], runs["cp"], runs["naive"]
    mbs = ctx.size / 1e6
    rc, rn = ratio(secs(m), secs(c)), ratio(secs(m), secs(n))
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s", "peak RSS MiB send / recv"],
        [["multifd", spread(secs(m)), f"{mbs / med(secs(m)):.0f}", rss_text(m)],
         ["cp", spread(secs(c)), f"{mbs / med(secs(c)):.0f}", "-"],
         ["naive Python (2+2 processes)", spread(secs(n)), f"{mbs / med(secs(n)):.0f}",
          rss_text(n)]]))
    res.tables.append(md_table(
        ["ratio", "median of per-round ratios (min–max)", "multifd faster in"],
        [["multifd / cp", rc.text(), f"{rc.below}/{len(rc.ratios)} rounds"],
         ["multifd / naive", rn.text(), f"{rn.below}/{len(rn.ratios)} rounds"]]))
    res.summary.append(["multifd / cp, wall", rc.text(), "-", "context"])
    res.summary.append(["multifd / naive Python, wall", rn.text(), "-", "context"])
    res.raw = {"runs": runs, "ratio_cp": rc.as_json(), "ratio_naive": rn.as_json()}


HASH_REF = r"""
import mmap, os, sys, time, xxhash
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
mv = memoryview(mm)
t = time.perf_counter()
for off in range(0, size, 65536):
    xxhash.xxh3_64_intdigest(mv[off:off + 65536])
print(time.perf_counter() - t)
"""


def case_scan(ctx: Ctx, res: CaseResult) -> None:
    """The no-change pass: pass 2 of a --no-mtime-shortcut migration of a static file."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "scan.multifd"
    res.title = f"scan: a pass that finds nothing, {human_size(ctx.size)} on tmpfs"
    res.setup = ("multifd send --no-mtime-shortcut (2 channels) of a static file: pass 2 finds "
                 "nothing; its duration_ms from send's JSON gives the scan rate (GB = 1e9 B). "
                 "Reference, interleaved: one Python process hashing the same file with "
                 "xxh3_64 per 64 KiB chunk over an mmap (timed inside the process).")

    def scan() -> Sample:
        s = multifd_migrate(src, dst, extra=["--no-mtime-shortcut"])
        p2 = [p for p in s["pass_events"] if p["pass"] == 2]
        if not p2:
            raise BenchError(f"no pass 2 in {s['pass_events']}")
        if p2[0]["dirty_bytes"]:
            raise BenchError(f"pass 2 found {p2[0]['dirty_bytes']} dirty bytes")
        s["pass2_ms"] = p2[0]["duration_ms"]
        s["gbps"] = ctx.size / 1e9 / (p2[0]["duration_ms"] / 1000)
        return s

    def ref() -> Sample:
        p = Proc([sys.executable, "-c", HASH_REF, str(src)])
        wall = p.wait(120)
        inner = float(p.lines[-1])
        return {"s": wall, "inner_s": inner, "gbps": ctx.size / 1e9 / inner}

    runs = interleave({"multifd pass 2": scan, "reference": ref}, ctx.pairs, ctx.log)
    unlink(dst)
    sc, rf = runs["multifd pass 2"], runs["reference"]
    g, gr = secs(sc, "gbps"), secs(rf, "gbps")
    rt = ratio(g, gr)
    res.tables.append(md_table(
        ["variant", "GB/s median (min–max)", "ms median (min–max)", "detail"],
        [["multifd pass 2 (no change)", spread(g, 2), spread(secs(sc, "pass2_ms"), 0),
          f"whole migration {spread(secs(sc))} s, peak RSS send / recv {rss_text(sc)} MiB"],
         ["reference: 1 process, mmap + xxh3_64 per 64 KiB", spread(gr, 2),
          spread(secs(rf, "inner_s"), 0, 1000), "-"]]))
    ok = med(g) >= 3
    res.tables.append(md_table(
        ["ratio", "median of per-pair ratios (min–max)", "target"],
        [["scan rate / reference rate", rt.text(), "scan ≥ 3 GB/s: " +
          verdict(ok, f"{sum(x >= 3 for x in g)}/{len(g)} runs")]]))
    res.summary.append(["no-change pass, GB/s", spread(g, 2), "≥ 3", verdict(ok)])
    res.raw = {"runs": runs, "ratio_to_reference": rt.as_json()}


def case_startup(ctx: Ctx, res: CaseResult) -> None:
    """`multifd --version` vs `python -c pass`."""
    n = 10
    res.title = "startup: `python -m multifd_cli --version` vs `python -c pass`"
    res.setup = f"{n} interleaved pairs, wall time of the process ({sys.executable})."
    runs = interleave({
        "multifd --version": lambda: {"s": timed([[*MULTIFD, "--version"]])[0]},
        "python -c pass": lambda: {"s": timed([[sys.executable, "-c", "pass"]])[0]},
    }, n, ctx.log)
    a, b = secs(runs["multifd --version"]), secs(runs["python -c pass"])
    rt = ratio(a, b)
    diff = [x - y for x, y in zip(a, b)]
    res.tables.append(md_table(
        ["variant", "ms median (min–max)"],
        [["multifd --version", spread(a, 0, 1000)], ["python -c pass", spread(b, 0, 1000)]]))
    res.tables.append(md_table(
        ["comparison", "median of per-pair values (min–max)"],
        [["ratio multifd / python", rt.text()],
         ["difference ms (multifd's own import cost)", spread(diff, 0, 1000)]]))
    res.summary.append(["`multifd --version` ms (python -c pass)",
                        f"{med(a) * 1000:.0f} ({med(b) * 1000:.0f})", "-", "context"])
    res.raw = {"runs": runs, "ratio": rt.as_json()}


def case_channels(ctx: Ctx, res: CaseResult) -> None:
    """Throughput for --channels 1, 2, 4, 8 on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "channels.multifd"
    counts = [1, 2, 4, 8]
    res.title = f"channels: {human_size(ctx.size)} random, tmpfs to tmpfs, no compression"
    res.setup = (f"MB/s = file size (1e6 B) / send wall time. {os.cpu_count()} CPUs. Rounds of "
                 "1, 2, 4, 8 channels with a rotating order; ratio = wall(N) / wall(2) per round.")
    runs = interleave({f"{c}": functools.partial(multifd_migrate, src, dst, channels=c)
                       for c in counts}, ctx.pairs, ctx.log)
    unlink(dst)
    mbs = {c: [ctx.size / 1e6 / x for x in secs(runs[f"{c}"])] for c in counts}
    # Best by the paired comparison with the default: the median per-round wall(N) / wall(2).
    rts = {c: ratio(secs(runs[f"{c}"]), secs(runs["2"])) for c in counts}
    best = min(counts, key=lambda c: rts[c].median if c != 2 else 1.0)
    rows = []
    for c in counts:
        rows.append([f"{c}" + (" **best**" if c == best else ""), spread(mbs[c], 0),
                     spread(secs(runs[f"{c}"])),
                     f"{rts[c].text()}, faster in {rts[c].below}/{len(rts[c].ratios)}"
                     if c != 2 else "1", rss_text(runs[f"{c}"])])
    res.tables.append(md_table(
        ["channels", "MB/s median (min–max)", "wall s median (min–max)",
         "wall / wall(2), per round", "peak RSS MiB send / recv"], rows))
    rb = rts[best]
    n = len(rb.ratios)
    clear = rb.median < 0.95 and rb.below >= max(1, -(-4 * n // 5))  # ≥ 5 %, ≥ 80 % of rounds
    if best == 2:
        second = min((c for c in counts if c != 2), key=lambda c: rts[c].median)
        note = (f"met: 2 is the fastest; next best {second} channels at "
                f"{rts[second].median:.2f}× the time of 2")
    elif not clear:
        note = (f"no clear winner: {best} channels at {rb.median:.2f}× the time of 2, faster "
                f"in only {rb.below}/{n} rounds (a clear win needs < 0.95× in ≥ 80 % of rounds)")
    else:
        note = (f"**{best} is faster**: {rb.median:.2f}× the time of 2, faster in "
                f"{rb.below}/{n} rounds")
    res.tables.append(f"Best (lowest median per-round wall / wall(2)): **{best} channels**. "
                      f"{note}.")
    value = f"{best} ({med(mbs[best]):.0f} MB/s" + (
        f"; 2: {med(mbs[2]):.0f} MB/s)" if best != 2 else ")")
    res.summary.append(["best channel count", value, "2 is the default", note])
    res.raw = {"runs": runs, "best": best}


def live_case(ctx: Ctx, res: CaseResult, size: int, rate: str, hot: str, limit: int,
              total_target: float | None) -> None:
    """A live migration with examples/writer.py vs a static multifd copy of the same file."""
    src = ctx.data.copy_disk(res.name, size)
    dst = ctx.disk / f"{res.name}.multifd"
    res.title = (f"{res.name}: {human_size(size)} on disk, writer {rate}/s of random 4 KiB pages "
                 f"in a {hot} hot set, --pause-pid, downtime limit {limit} ms")
    res.setup = ("Live: recv listening, writer started and warmed up 0.5 s, then send "
                 "(2 channels) with --pause-pid; the writer is continued and killed after each "
                 "run. Static: multifd copy of the same file at rest (untimed wait until its "
                 "mtime and ctime are 2.5 s old, so one pass), "
                 "interleaved. `sync` before every run. Ratio = live wall / static wall per pair.")
    writer = [sys.executable, str(WRITER), str(src), "--rate", rate, "--hot-set", hot]
    extra = [] if limit == 300 else ["--downtime-limit", str(limit)]

    def live() -> Sample:
        s = multifd_migrate(src, dst, disk=True, writer=writer, extra=extra)
        if not s["paused"]:
            raise BenchError("send completed without pausing the writer")
        return s

    runs = interleave({"live": live, "static": lambda: multifd_migrate(src, dst, disk=True)},
                      ctx.pairs, ctx.log)
    unlink(dst)
    lv, st = runs["live"], runs["static"]
    rt = ratio(secs(lv), secs(st))
    down = secs(lv, "downtime_ms")
    res.tables.append(md_table(
        ["variant", "wall s", "JSON total_time_ms", "downtime_ms", "passes", "MiB sent",
         "peak RSS MiB send / recv"],
        [[v, spread(secs(x)), spread(secs(x, "total_time_ms"), 0),
          spread(secs(x, "downtime_ms"), 0), spread(secs(x, "passes"), 0),
          spread(secs(x, "transferred_bytes"), 0, 1 / MiB), rss_text(x)]
         for v, x in (("live", lv), ("static copy", st))]))
    d_ok = med(down) <= limit
    rows = [["downtime_ms", spread(down, 0), f"≤ {limit}",
             verdict(d_ok, f"{sum(d <= limit for d in down)}/{len(down)} runs")]]
    t_ok = True
    if total_target is not None:
        t_ok = rt.median <= total_target
        rows.append(["live / static, wall", rt.text(), f"≤ {total_target:g}",
                     verdict(t_ok, f"{sum(r <= total_target for r in rt.ratios)}/"
                             f"{len(rt.ratios)} pairs")])
    else:
        rows.append(["live / static, wall", rt.text(), "-", "context"])
    res.tables.append("The static copy pauses nothing; its downtime_ms is send's figure as "
                      "reported (the final pass and completion).")
    res.tables.append(md_table(["metric", "median (min–max)", "target", "verdict"], rows))
    res.summary += [["downtime_ms", spread(down, 0), f"≤ {limit}", verdict(d_ok)],
                    ["live / static copy, wall", rt.text(),
                     f"≤ {total_target:g}" if total_target else "-",
                     verdict(t_ok) if total_target else "context"],
                    ["passes; MiB sent", f"{med(secs(lv, 'passes')):.0f}; "
                     f"{med(secs(lv, 'transferred_bytes')) / MiB:.0f}", "-", "context"]]
    res.raw = {"runs": runs, "ratio": rt.as_json()}


def case_live_256m(ctx: Ctx, res: CaseResult) -> None:
    """256 MiB, writer 32 MiB/s in a 64 MiB hot set, default downtime limit (300 ms)."""
    live_case(ctx, res, 256 * MiB, "32M", "64M", 300, None)


def case_live_1g(ctx: Ctx, res: CaseResult) -> None:
    """--size (1 GiB), writer 64 MiB/s in a 128 MiB hot set, --downtime-limit 500."""
    live_case(ctx, res, ctx.size, "64M", "128M", 500, 2.0)


def case_compression(ctx: Ctx, res: CaseResult) -> None:
    """none / lz4 / zstd:1 on mixed data, unlimited and under --max-bandwidth 50M."""
    methods = ["none", "lz4", "zstd:1"]
    small = 128 * MiB if not ctx.quick else 32 * MiB
    res.title = (f"compression: mixed data ({human_size(ctx.size)}; {human_size(small)} under "
                 "--max-bandwidth 50M), 2 channels, tmpfs to tmpfs")
    res.setup = ("Mixed data: shuffled 64 KiB chunks, a quarter zero, a quarter random, half "
                 "the standard library's .py sources (repeated). Zero pages are never sent by "
                 "any method. Rounds rotate the order; ratios are per round against `none`.")
    for label, size, extra in (("unlimited", ctx.size, []),
                               ("--max-bandwidth 50M", small, ["--max-bandwidth", "50M"])):
        src = ctx.data.mixed_shm(size)
        dst = ctx.shm / "compression.multifd"
        ctx.log(f"  {label}, {human_size(size)}")
        runs = interleave({m: functools.partial(multifd_migrate, src, dst, compress=m,
                                                extra=extra) for m in methods},
                          ctx.pairs, ctx.log)
        unlink(dst)
        rows = []
        for m in methods:
            x = runs[m]
            rt = ratio(secs(x), secs(runs["none"]))
            wire = med(secs(x, "transferred_bytes"))
            rows.append([m, spread(secs(x)), f"{size / 1e6 / med(secs(x)):.0f}",
                         rt.text() if m != "none" else "1", f"{wire / MiB:.0f}",
                         f"{wire / size:.2f}", rss_text(x)])
            if m != "none":
                res.summary.append([f"{label}: {m} / none, wall", rt.text(), "-",
                                    f"wire {wire / size:.2f} of the file"])
        res.tables.append(f"**{label}, {human_size(size)}**\n\n" + md_table(
            ["compress", "wall s median (min–max)", "MB/s of file", "wall / wall(none), per round",
             "MiB on the wire", "wire / file size", "peak RSS MiB send / recv"], rows))
        res.raw[label] = {"size": size, "runs": runs}


def nc_is_openbsd() -> bool:
    nc = shutil.which("nc")
    if not nc:
        return False
    out = subprocess.run([nc, "-h"], capture_output=True, text=True)
    return "-N" in out.stdout + out.stderr


def pipe_copy(recv_cmd: str, send_cmd: str, port: int, dst: Path) -> Sample:
    """Start a shell receiver listening on port, then time the sender until both exited."""
    unlink(dst)
    recv = Proc([recv_cmd], shell=True)
    try:
        wait_listening(port)
        t0 = time.perf_counter()
        s = Proc([send_cmd], t0=t0, shell=True).wait(600)
        recv.t0 = t0
        r = recv.wait(60)
    finally:
        recv.kill()
    return {"s": max(s, r), "send_s": s, "recv_s": r}


_VERIFIED: set[Path] = set()


def verify_once(src: Path, dst: Path) -> None:
    """Compare a baseline's first copy with its source, untimed; later runs are trusted."""
    if dst in _VERIFIED:
        return
    if not filecmp.cmp(src, dst, shallow=False):
        raise BenchError(f"{dst} differs from {src}")
    _VERIFIED.add(dst)


@contextlib.contextmanager
def rsync_daemon(root: Path, work: Path) -> Iterator[int]:
    port = free_port()
    conf = work / "rsyncd.conf"
    ids = f"uid = {os.getuid()}\ngid = {os.getgid()}\n" if os.getuid() == 0 else ""
    conf.write_text(f"use chroot = no\n{ids}pid file = {work / 'rsyncd.pid'}\n"
                    f"[bench]\npath = {root}\nread only = no\n")
    d = Proc(["rsync", "--daemon", "--no-detach", "--address", "127.0.0.1",
              "--port", str(port), "--config", str(conf)])
    try:
        wait_listening(port)
        yield port
    finally:
        d.kill()
        unlink(conf)


def case_peers(ctx: Ctx, res: CaseResult) -> None:
    """socat (or nc), rsync daemon, zstd | socat, against multifd, when installed."""
    q = shlex.quote
    res.title = f"peers: {human_size(ctx.size)} of mixed data over loopback, tmpfs to tmpfs"
    res.setup = ("The compression case's mixed file. Peers are timed from starting the sender "
                 "(receiver already listening) until sender and receiver both exited; no fsync "
                 "needed on tmpfs. rsync runs against a loopback rsync daemon (`rsync "
                 "--inplace --whole-file SRC rsync://127.0.0.1:PORT/bench/DST`), started once, "
                 "untimed. Rounds rotate the order; ratios are per round. Nothing is installed "
                 f"by this script: `{INSTALL_HINT}`.")
    have = {t: shutil.which(t) is not None for t in ("socat", "rsync", "zstd", "nc")}
    variants: dict[str, Callable[[], Sample]] = {}
    missing: list[list[str]] = []
    dsts: list[Path] = []

    def dst_for(name: str) -> Path:
        p = ctx.shm / f"peer-{name}.dst"
        dsts.append(p)
        return p

    def socat_raw() -> Sample:
        port, d = free_port(), dst_for("socat")
        r = pipe_copy(f"socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 OPEN:{q(str(d))},creat",
                      f"socat -u FILE:{q(str(src))} TCP:127.0.0.1:{port}", port, d)
        verify_once(src, d)
        return r

    def nc_raw() -> Sample:
        port, d = free_port(), dst_for("nc")
        r = pipe_copy(f"nc -l 127.0.0.1 {port} > {q(str(d))}",
                      f"nc -N 127.0.0.1 {port} < {q(str(src))}", port, d)
        verify_once(src, d)
        return r

    def zstd_pipe() -> Sample:
        port, d = free_port(), dst_for("zstd")
        r = pipe_copy(
            f"socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - | zstd -d -q -f -o {q(str(d))}",
            f"zstd -1 -T2 -q -c {q(str(src))} | socat -u - TCP:127.0.0.1:{port}", port, d)
        verify_once(src, d)
        return r

    raw_name = None
    if have["socat"]:
        raw_name = "socat"
        variants["socat (raw TCP into a file)"] = socat_raw
    elif have["nc"] and nc_is_openbsd():
        raw_name = "nc"
        variants["nc (openbsd, raw TCP into a file)"] = nc_raw
    else:
        missing.append(["socat / nc (raw TCP into a file)",
                        f"not installed: `{INSTALL_HINT}`"])
    if not have["rsync"]:
        missing.append(["rsync (loopback daemon)", f"not installed: `{INSTALL_HINT}`"])
    if have["zstd"] and have["socat"]:
        variants["zstd -1 -T2 | socat"] = zstd_pipe
    else:
        what = " and ".join(t for t in ("zstd", "socat") if not have[t])
        missing.append(["zstd -1 -T2 | socat", f"{what} not installed: `{INSTALL_HINT}`"])

    if not variants and not have["rsync"]:
        res.tables.append(md_table(["peer", "status"], missing))
        res.summary.append(["peers", "none installed", "-", f"`{INSTALL_HINT}`"])
        return

    src = ctx.data.mixed_shm(ctx.size)  # only now: nothing to compare with made no file
    dm, dz = dst_for("multifd"), dst_for("multifd-zstd")
    with contextlib.ExitStack() as stack:
        if have["rsync"]:
            rs_root = ctx.shm / "rsync-root"
            rs_root.mkdir(exist_ok=True)
            port = stack.enter_context(rsync_daemon(rs_root, ctx.disk))
            rs_dst = rs_root / "peer-rsync.dst"
            dsts.append(rs_dst)

            def rsync_run() -> Sample:
                unlink(rs_dst)
                r = {"s": timed([["rsync", "--inplace", "--whole-file", str(src),
                                  f"rsync://127.0.0.1:{port}/bench/{rs_dst.name}"]])[0]}
                verify_once(src, rs_dst)
                return r
            variants["rsync (loopback daemon)"] = rsync_run
        all_variants: dict[str, Callable[[], Sample]] = {
            "multifd (none)": lambda: multifd_migrate(src, dm)}
        if "zstd -1 -T2 | socat" in variants:
            all_variants["multifd (zstd:1)"] = lambda: multifd_migrate(src, dz, compress="zstd:1")
        all_variants.update(variants)
        runs = interleave(all_variants, ctx.pairs, ctx.log)
    for p in dsts:
        unlink(p)
    with contextlib.suppress(OSError):
        (ctx.shm / "rsync-root").rmdir()
    mbs = ctx.size / 1e6
    rows = [[v, spread(secs(x)), f"{mbs / med(secs(x)):.0f}", rss_text(x)]
            for v, x in runs.items()]
    rows += [[peer, status, "-", "-"] for peer, status in missing]
    res.tables.append(md_table(["variant", "wall s median (min–max)", "MB/s of file",
                                "peak RSS MiB send / recv"], rows))
    rrows = []
    for peer in runs:
        if peer.startswith("multifd"):
            continue
        base = "multifd (zstd:1)" if peer.startswith("zstd") else "multifd (none)"
        rt = ratio(secs(runs[base]), secs(runs[peer]))
        rrows.append([f"{base} / {peer}", rt.text(), f"{rt.below}/{len(rt.ratios)} rounds"])
        res.summary.append([f"{base} / {peer}, wall", rt.text(), "-", "context"])
    for peer, _ in missing:
        res.summary.append([peer, "not installed", "-", f"`{INSTALL_HINT}`"])
    res.tables.append(md_table(["ratio", "median of per-round ratios (min–max)",
                                "multifd faster in"], rrows))
    res.raw = {"runs": runs, "missing": missing, "raw_tool": raw_name}


# ---------------------------------------------------------------------------
# QEMU multifd as a peer: a small QMP client and a driver for two paused TCG guests

QEMU = "qemu-system-x86_64"
QEMU_HINT = "apt-get update && apt-get install -y qemu-system-x86"
QEMU_LOAD_ADDR = 256 * MiB  # the data file goes into guest RAM here, above the BIOS areas


def qemu_version() -> str | None:
    """First line of `qemu-system-x86_64 --version`, or None when it is not installed."""
    exe = shutil.which(QEMU)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (out.stdout.strip().splitlines() or ["?"])[0]


class Qmp:
    """A QMP client on a unix socket: one JSON object a line, `qmp_capabilities` first.

    A reader thread files each reply under its id and keeps each event, with the
    perf_counter time it arrived, in `events`; commands wait for their own id and skip
    everything else.
    """

    def __init__(self, path: Path, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if not proc.running:
                    raise BenchError(f"{proc.name} exited {proc.returncode}: "
                                     f"{proc.stderr_tail()}") from None
                if time.monotonic() > deadline:
                    raise BenchError(f"no QMP socket {path} after {timeout:.0f} s") from None
                time.sleep(0.02)
        self.sock = sock
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._replies: dict[str, dict[str, Any]] = {}
        self._greeting: dict[str, Any] | None = None
        self._closed = False
        self._next = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self._wait(lambda: self._greeting is not None, timeout, "the QMP greeting")
        self.cmd("qmp_capabilities")

    def _read(self) -> None:
        try:
            with self.sock.makefile("rb") as f:
                for line in f:
                    t = time.perf_counter()
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    with self._cond:
                        if "QMP" in msg:
                            self._greeting = msg
                        elif "event" in msg:
                            self.events.append((t, msg))
                        elif "id" in msg:
                            self._replies[str(msg["id"])] = msg
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._closed, timeout):
                raise BenchError(f"QMP: no answer to {what} after {timeout:.0f} s")
            if not ready():
                raise BenchError(f"QMP: connection closed waiting for {what}")

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """Execute one command; return its `return` value, raise BenchError on `error`."""
        with self._cond:
            self._next += 1
            ident = f"bench-{self._next}"
        msg: dict[str, Any] = {"execute": name, "id": ident}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise BenchError(f"QMP {name}: {e}") from None
        self._wait(lambda: ident in self._replies, timeout, name)
        with self._cond:
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise BenchError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def migration_status(self) -> tuple[float, str] | None:
        """(arrival time, status) of the last MIGRATION event that ended one: completed/failed."""
        with self._cond:
            for t, ev in reversed(self.events):
                status = ev.get("data", {}).get("status")
                if ev.get("event") == "MIGRATION" and status in ("completed", "failed"):
                    return t, status
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class QemuVm:
    """A paused (-S) TCG guest with a QMP socket: a source whose guest RAM holds `data`
    (the generic loader at QEMU_LOAD_ADDR), or a destination (-incoming defer)."""

    def __init__(self, sockdir: Path, role: str, mem_mb: int, data: Path | None) -> None:
        self.sock = sockdir / f"qmp-{role}.sock"
        unlink(self.sock)
        cmd = [QEMU, "-accel", "tcg", "-machine", "q35", "-m", f"{mem_mb}M", "-nographic",
               "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-S",
               "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if data is not None:
            cmd += ["-device", f"loader,file={data},addr={QEMU_LOAD_ADDR:#x},force-raw=on"]
        else:
            cmd += ["-incoming", "defer"]
        t = time.perf_counter()
        self.proc = Proc(cmd, rss=True)
        self.qmp: Qmp | None = None
        try:
            self.qmp = Qmp(self.sock, self.proc)
        except BenchError:
            self.close()
            raise
        self.ready_s = time.perf_counter() - t

    @property
    def q(self) -> Qmp:
        assert self.qmp is not None
        return self.qmp

    def close(self) -> None:
        """`quit` over QMP (GNU time then records the peak RSS); SIGKILL if that fails."""
        if self.qmp is not None:
            if self.proc.running:
                with contextlib.suppress(BenchError):
                    self.qmp.cmd("quit", timeout=10)
            self.qmp.close()
        with contextlib.suppress(BenchError):
            self.proc.wait(15)
        self.proc.kill()
        unlink(self.sock)


def loopback_tx_bytes() -> int | None:
    """Bytes sent on `lo` so far (/proc/net/dev), system-wide."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return None


def qemu_wait_migration(vms: dict[str, QemuVm], timeout: float) -> dict[str, float]:
    """Wait until every VM's migration completed; return perf_counter times per VM.

    The time is the arrival of the MIGRATION event (capability `events`) or of the reply to
    a `query-migrate` poll (every 50 ms) that saw status completed, whichever comes first.
    (Not the time a poll was sent: QEMU finishes the migration holding its big
    lock, which delays QMP replies, so a poll sent before completion may answer "completed".)
    """
    deadline = time.monotonic() + timeout
    done: dict[str, float] = {}
    last_poll = 0.0
    while len(done) < len(vms):
        poll = time.monotonic() - last_poll >= 0.05
        if poll:
            last_poll = time.monotonic()
        for name, vm in vms.items():
            if name in done:
                continue
            ev = vm.q.migration_status()
            if ev is not None:
                if ev[1] == "failed":
                    info = vm.q.cmd("query-migrate")
                    raise BenchError(f"QEMU {name}: migration failed: "
                                     f"{info.get('error-desc', info)}")
                done[name] = ev[0]
                continue
            if poll:
                status = vm.q.cmd("query-migrate").get("status")
                if status == "completed":  # seen at some point before its reply: take the reply
                    done[name] = time.perf_counter()
                elif status == "failed":
                    raise BenchError(f"QEMU {name}: migration failed")
        if not vms[next(iter(vms))].proc.running or time.monotonic() > deadline:
            raise BenchError(f"QEMU migration did not complete in {timeout:.0f} s: {done}")
        time.sleep(0.005)
    return done


def qemu_migrate(data: Path, size: int, workdir: Path, *, channels: int = 2,
                 compression: str = "none", level: int | None = None,
                 verify: bool = False, timeout: float = 600) -> Sample:
    """Start a source guest holding `data` and a destination guest, both paused (untimed),
    then time one QEMU multifd migration between them over TCP loopback.

    "s" is from sending `migrate` to the source's status completed; "dst_s" to the
    destination's. With `verify`, the destination's guest RAM at QEMU_LOAD_ADDR is saved
    with pmemsave (untimed) and compared with `data`.
    """
    mem_mb = -(-(QEMU_LOAD_ADDR + size) // MiB)
    caps = [{"capability": "multifd", "state": True}, {"capability": "events", "state": True}]
    params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": compression,
                              "max-bandwidth": 10 ** 12}
    if level is not None:
        params[f"multifd-{compression}-level"] = level
    vms: dict[str, QemuVm] = {}
    try:
        vms["source"] = QemuVm(workdir, "source", mem_mb, data)
        vms["destination"] = QemuVm(workdir, "destination", mem_mb, None)
        src, dst = vms["source"], vms["destination"]
        for vm in (src, dst):
            vm.q.cmd("migrate-set-capabilities", {"capabilities": caps})
            vm.q.cmd("migrate-set-parameters", params)
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst.q.cmd("migrate-incoming", {"uri": uri})
        wait_listening(port)
        w0 = loopback_tx_bytes()
        t0 = time.perf_counter()
        src.q.cmd("migrate", {"uri": uri})
        ends = qemu_wait_migration(vms, timeout)
        w1 = loopback_tx_bytes()
        info = src.q.cmd("query-migrate")
        if verify:
            mem = workdir / "qemu-destination.mem"
            try:
                dst.q.cmd("pmemsave", {"val": QEMU_LOAD_ADDR, "size": size,
                                       "filename": str(mem)}, timeout=300)
                if not filecmp.cmp(data, mem, shallow=False):
                    raise BenchError(f"QEMU destination's guest RAM differs from {data}")
            finally:
                unlink(mem)
        startup = max(src.ready_s, dst.ready_s)
    finally:
        for vm in reversed(list(vms.values())):
            vm.close()
    ram = info.get("ram", {})
    return {
        "s": ends["source"] - t0, "dst_s": ends["destination"] - t0,
        "total_time_ms": info.get("total-time"), "setup_time_ms": info.get("setup-time"),
        "downtime_ms": info.get("downtime"), "ram_transferred_bytes": ram.get("transferred"),
        "transferred_bytes": w1 - w0 if w0 is not None and w1 is not None else None,
        "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
        "startup_s": startup, "mem_mb": mem_mb,
        "send_rss_kb": vms["source"].proc.maxrss_kb,
        "recv_rss_kb": vms["destination"].proc.maxrss_kb,
    }


def case_qemu(ctx: Ctx, res: CaseResult) -> None:
    """multifd vs QEMU 7.2 multifd (paused TCG guests) for random and mixed data."""
    size = ctx.size
    mem_mb = -(-(QEMU_LOAD_ADDR + size) // MiB)
    res.title = f"qemu: multifd vs QEMU multifd, {human_size(size)}, 2 channels, loopback"
    ver = qemu_version()
    res.setup = (
        f"QEMU: `{ver or QEMU}`. Two guests per run, `-accel tcg -machine q35 -m {mem_mb}M "
        "-nographic -nodefaults -display none -serial none -S`; the source's guest RAM is "
        f"filled from the same data file (`-device loader,file=DATA,addr={QEMU_LOAD_ADDR:#x},"
        "force-raw=on`), the destination runs `-incoming defer`. Both are started fresh for "
        "every run and get, over QMP, `migrate-set-capabilities` multifd (and events) and "
        "`migrate-set-parameters` multifd-channels 2, multifd-compression (and its level), "
        "max-bandwidth 1e12; then `migrate-incoming` and `migrate` over tcp:127.0.0.1. "
        "**What is timed.** QEMU wall: from sending `migrate` to the source's status "
        "completed (arrival of its MIGRATION event or of a `query-migrate` reply saying so, "
        "polled every 50 ms, whichever comes first); QEMU "
        "start-up, filling guest RAM and the QMP set-up are not timed (shown as start-up). "
        "QEMU total-time is the source's own figure (`query-migrate`: from the migrate "
        "command to the end of its migration thread). multifd wall: from starting send "
        "(recv listening) to send's exit, so it includes send's Python start-up, recv's "
        "verification and linking the copy into place (tmpfs destination); multifd "
        "total_time_ms is send's JSON figure. QEMU also moves the rest of guest RAM "
        f"({human_size(mem_mb * MiB - size)}: zero pages, detected and sent as flags, plus "
        "firmware) and device state. MiB on the wire: multifd's transferred_bytes; for "
        "QEMU the bytes sent on the loopback interface from `migrate` to completion "
        "(/proc/net/dev, system-wide, so other loopback traffic would count too; TCP/IP "
        "headers included), because QEMU 7.2's ram.transferred counts multifd pages before "
        "compression (shown in the detail). The destination's RAM is compared with the data file "
        "once per QEMU variant (pmemsave, untimed). Rounds rotate the order.")
    if ver is None:
        res.tables.append(md_table(["peer", "status"], [[
            f"QEMU multifd ({QEMU})", f"not installed: `{QEMU_HINT}`"]]))
        res.summary.append(["QEMU multifd", "not installed", "-", f"`{QEMU_HINT}`"])
        return
    qdir = ctx.shm / "qemu"
    qdir.mkdir(exist_ok=True)
    dm = ctx.shm / "qemu.multifd"
    verified: set[str] = set()

    def qemu(data: Path, name: str, compression: str, level: int | None) -> Sample:
        s = qemu_migrate(data, size, qdir, compression=compression, level=level,
                         verify=name not in verified)
        verified.add(name)
        return s

    parts = []
    rnd = ctx.data.random_shm(size)
    ctx.log("  (a) random data, no compression")
    parts.append(("(a) random data, no compression", size, interleave({
        "multifd (none)": lambda: multifd_migrate(rnd, dm),
        "QEMU multifd (none)": lambda: qemu(rnd, "none", "none", None),
        # The floor for a file copy in Python: same processes and sockets, no protocol,
        # no hashing, no verification (benchmarks/naive.py).
        "naive Python copy": lambda: naive_copy(rnd, dm),
    }, ctx.pairs, ctx.log), [("multifd (none)", "QEMU multifd (none)", 0.8),
                             ("naive Python copy", "QEMU multifd (none)", None)]))
    mixed = ctx.data.mixed_shm(size)
    ctx.log("  (b) mixed data, compressed")
    parts.append(("(b) mixed data, compressed", size, interleave({
        "multifd (zstd:1)": lambda: multifd_migrate(mixed, dm, compress="zstd:1"),
        "multifd (lz4)": lambda: multifd_migrate(mixed, dm, compress="lz4"),
        "QEMU multifd (zstd level 1)": lambda: qemu(mixed, "zstd", "zstd", 1),
    }, ctx.pairs, ctx.log), [("multifd (zstd:1)", "QEMU multifd (zstd level 1)", 0.9),
                             ("multifd (lz4)", "QEMU multifd (zstd level 1)", 0.5)]))
    unlink(dm)
    shutil.rmtree(qdir, ignore_errors=True)
    for label, sz, runs, targets in parts:
        rows = []
        for v, x in runs.items():
            wire_b = [float(s["transferred_bytes"]) for s in x if s.get("transferred_bytes")]
            wire = f"{med(wire_b) / MiB:.0f}" if wire_b else "-"
            if v.startswith("QEMU"):
                detail = (f"destination completed at {spread(secs(x, 'dst_s'))} s; ram.transferred "
                          f"{med(secs(x, 'ram_transferred_bytes')) / MiB:.0f} MiB; setup-time "
                          f"{spread(secs(x, 'setup_time_ms'), 0)} ms; start-up (untimed) "
                          f"{spread(secs(x, 'startup_s'), 1)} s; zero pages "
                          f"{med(secs(x, 'zero_pages')):.0f}")
            elif v.startswith("naive"):
                detail = "2+2 processes, pread + sendall / recv_into + pwrite, nothing checked"
            else:
                detail = (f"recv exits at {spread(secs(x, 'recv_s'))} s; zero pages "
                          f"{med([float(s.get('zero_pages') or 0) for s in x]):.0f}")
            own = spread(secs(x, "total_time_ms"), 0) if "total_time_ms" in x[0] else "-"
            rows.append([v, spread(secs(x)), f"{sz / 1e6 / med(secs(x)):.0f}",
                         own, wire, detail, rss_text(x)])
        res.tables.append(f"**{label}, {human_size(sz)}**\n\n" + md_table(
            ["variant", "wall s median (min–max)", "MB/s of file",
             "own total time ms (multifd JSON total_time_ms / QEMU total-time)",
             "MiB on the wire", "detail", "peak RSS MiB send / recv (QEMU: source / dest)"],
            rows))
        rrows = []
        for a, b, target in targets:
            rt = ratio(secs(runs[a]), secs(runs[b]))
            if target is None:  # context: how close a check-nothing copy gets
                rrows.append([f"{a} wall / {b} wall (to source completed)", rt.text(),
                              f"{rt.below}/{len(rt.ratios)} rounds", "context"])
                res.summary.append([f"{a} / {b}, wall", rt.text(), "-", "context"])
                continue
            rd = ratio(secs(runs[a]), secs(runs[b], "dst_s"))
            rtot = ratio(secs(runs[a], "total_time_ms"), secs(runs[b], "total_time_ms"))
            ok = rt.median <= target
            rrows += [
                [f"{a} wall / {b} wall (to source completed)", rt.text(),
                 f"{rt.below}/{len(rt.ratios)} rounds",
                 f"≤ {target:g}: " + verdict(ok, f"{sum(r <= target for r in rt.ratios)}/"
                                                 f"{len(rt.ratios)} rounds")],
                [f"{a} wall / {b} wall (to destination completed)", rd.text(),
                 f"{rd.below}/{len(rd.ratios)} rounds", "context"],
                [f"{a} total_time_ms / {b} total-time", rtot.text(),
                 f"{rtot.below}/{len(rtot.ratios)} rounds", "context"]]
            res.summary.append([f"{a} / {b}, wall", rt.text(), f"≤ {target:g}", verdict(ok)])
            res.summary.append([f"{a} / {b}, own total times", rtot.text(), "-", "context"])
        res.tables.append(md_table(["ratio", "median of per-round ratios (min–max)",
                                    "multifd faster in", "target"], rrows))
        res.raw[label] = {"size": sz, "runs": runs}
    res.raw["qemu_version"] = ver
    res.raw["guest_mem_mb"] = mem_mb


# ---------------------------------------------------------------------------
# Packet size, resume, auto compression


def case_packets(ctx: Ctx, res: CaseResult) -> None:
    """Throughput for --packet-size 128K ... 4M on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "packets.multifd"
    sizes = ["128K", "256K", "512K", "1M", "2M", "4M"]
    base = "512K"
    res.title = (f"packets: --packet-size, {human_size(ctx.size)} random, tmpfs to tmpfs, "
                 "2 channels, no compression")
    res.setup = ("MB/s = file size (1e6 B) / send wall time. Rounds of all six sizes with a "
                 f"rotating order; ratio = wall(size) / wall({base}, the default) per round.")
    runs = interleave({s: functools.partial(multifd_migrate, src, dst,
                                            extra=["--packet-size", s]) for s in sizes},
                      ctx.pairs, ctx.log)
    unlink(dst)
    mbs = {s: [ctx.size / 1e6 / x for x in secs(runs[s])] for s in sizes}
    rts = {s: ratio(secs(runs[s]), secs(runs[base])) for s in sizes}
    best = min(sizes, key=lambda s: rts[s].median if s != base else 1.0)
    rows = []
    for s in sizes:
        rows.append([s + (" **best**" if s == best else ""), spread(mbs[s], 0),
                     spread(secs(runs[s])), spread(secs(runs[s], "total_time_ms"), 0),
                     f"{rts[s].text()}, faster in {rts[s].below}/{len(rts[s].ratios)}"
                     if s != base else "1", rss_text(runs[s])])
    res.tables.append(md_table(
        ["packet size", "MB/s median (min–max)", "wall s median (min–max)",
         "JSON total_time_ms", f"wall / wall({base}), per round", "peak RSS MiB send / recv"],
        rows))
    rb = rts[best]
    n = len(rb.ratios)
    clear = rb.median < 0.95 and rb.below >= max(1, -(-4 * n // 5))  # ≥ 5 %, ≥ 80 % of rounds
    if best == base:
        note = f"{base} (the default) is the fastest"
    elif not clear:
        note = (f"no clear winner: {best} at {rb.median:.2f}× the time of {base}, faster in "
                f"{rb.below}/{n} rounds (a clear win needs < 0.95× in ≥ 80 % of rounds)")
    else:
        note = (f"**{best} is faster**: {rb.median:.2f}× the time of {base}, faster in "
                f"{rb.below}/{n} rounds")
    res.tables.append(f"Best (lowest median per-round wall / wall({base})): **{best}**. {note}.")
    res.summary.append(["best packet size", f"{best} ({med(mbs[best]):.0f} MB/s; {base}: "
                        f"{med(mbs[base]):.0f} MB/s)", f"{base} is the default", note])
    res.raw = {"runs": runs, "best": best}


def rsync_stat(lines: Sequence[str], key: str) -> float | None:
    """A byte count from `rsync --stats` output, e.g. key 'Literal data'."""
    for line in lines:
        if line.startswith(key + ":"):
            with contextlib.suppress(ValueError, IndexError):
                return float(line.split(":", 1)[1].split()[0].replace(",", ""))
    return None


def case_resume(ctx: Ctx, res: CaseResult) -> None:
    """Update an old copy with 1 % of its pages changed: recv --resume vs rsync delta."""
    size, frac = ctx.size, 0.01
    old = ctx.data.random_disk(size)
    src = ctx.data.changed_disk(size, frac)
    dm, dr = ctx.disk / "resume.multifd", ctx.disk / "resume.rsync"
    changed = int(size // (4 * KiB) * frac)
    res.title = (f"resume: update an old copy of {human_size(size)} with 1 % of its 4 KiB "
                 "pages changed, on disk")
    res.setup = (f"SRC: the random file with {changed} random 4 KiB pages ({human_size(changed * 4 * KiB)}) "
                 "rewritten; before every run the old copy is recreated from the pristine file "
                 "with `cp` and everything is written back with `sync` (both untimed). multifd: "
                 "`multifd recv --resume DEST` listening, then `send SRC` (2 channels, no "
                 "compression), timed from starting send to its exit (recv hashes DEST and "
                 "fsyncs it inside that time); also shown from recv's start. rsync: `rsync "
                 "--inplace --no-whole-file --stats SRC DEST` (local, delta algorithm), timed "
                 "with and without a following `sync DEST` (multifd's copy is fsynced, so the "
                 "target uses rsync + sync). Both sources and the old copy are in the page "
                 "cache. Pairs alternate A B.")
    have_rsync = shutil.which("rsync") is not None

    def multifd() -> Sample:
        s = multifd_migrate(src, dm, disk=True, resume_from=old)
        verify_once(src, dm)
        return s

    def rsync() -> Sample:
        unlink(dr)
        subprocess.run(cp_cmd(old, dr), check=True)
        sync()
        t0 = time.perf_counter()
        p = Proc(["rsync", "--inplace", "--no-whole-file", "--stats", str(src), str(dr)], t0=t0)
        rs = p.wait(600)
        total = timed([["sync", str(dr)]])[0] + rs
        verify_once(src, dr)
        return {"s": total, "rsync_s": rs, "sync_s": total - rs,
                "literal_bytes": rsync_stat(p.lines, "Literal data"),
                "sent_bytes": rsync_stat(p.lines, "Total bytes sent")}

    variants: dict[str, Callable[[], Sample]] = {"multifd --resume": multifd}
    if have_rsync:
        variants["rsync + sync"] = rsync
    runs = interleave(variants, ctx.pairs, ctx.log)
    unlink(dm)
    unlink(dr)
    m = runs["multifd --resume"]
    mbs = size / 1e6
    rows = [["multifd recv --resume + send", spread(secs(m)), f"{mbs / med(secs(m)):.0f}",
             f"{med(secs(m, 'transferred_bytes')) / MiB:.2f} MiB "
             f"({med(secs(m, 'transferred_bytes')):.0f} B; {med(secs(m, 'normal_pages')):.0f} "
             "pages)",
             f"from recv's start {spread(secs(m, 'from_recv_start_s'))} s; JSON total_time_ms "
             f"{spread(secs(m, 'total_time_ms'), 0)}; recv total_time_ms "
             f"{spread(secs(m, 'recv_total_time_ms'), 0)}; passes {m[0]['passes']}",
             rss_text(m)]]
    summ = [["bytes sent on resume", f"{med(secs(m, 'transferred_bytes')) / MiB:.2f} MiB",
             "-", f"{changed} changed pages = {changed * 4 * KiB / MiB:.2f} MiB"]]
    rrows = []
    if have_rsync:
        r = runs["rsync + sync"]
        lit = [x["literal_bytes"] for x in r if x["literal_bytes"] is not None]
        sent = [x["sent_bytes"] for x in r if x["sent_bytes"] is not None]
        rows.append(["rsync --inplace --no-whole-file + sync", spread(secs(r)),
                     f"{mbs / med(secs(r)):.0f}",
                     (f"literal data {med(lit) / MiB:.2f} MiB; rsync's total bytes sent "
                      f"{med(sent) / MiB:.2f} MiB") if lit and sent else "-",
                     f"rsync {spread(secs(r, 'rsync_s'))} s + sync {spread(secs(r, 'sync_s'))} s",
                     "-"])
        rt = ratio(secs(m), secs(r))
        ra = ratio(secs(m), secs(r, "rsync_s"))
        rr = ratio(secs(m, "from_recv_start_s"), secs(r))
        ok = rt.median <= 0.3
        rrows = [["multifd / (rsync + sync)", rt.text(), f"{rt.below}/{len(rt.ratios)} pairs",
                  "≤ 0.3: " + verdict(ok, f"{sum(x <= 0.3 for x in rt.ratios)}/"
                                          f"{len(rt.ratios)} pairs")],
                 ["multifd / rsync alone (no sync)", ra.text(),
                  f"{ra.below}/{len(ra.ratios)} pairs", "context"],
                 ["multifd from recv's start / (rsync + sync)", rr.text(),
                  f"{rr.below}/{len(rr.ratios)} pairs", "context"]]
        summ.insert(0, ["multifd --resume / (rsync + sync), wall", rt.text(), "≤ 0.3",
                        verdict(ok)])
        summ.insert(1, ["rsync alone, s", spread(secs(r, "rsync_s")), "-",
                        "the issue measured 4.6 s"])
        res.raw["ratio"] = rt.as_json()
    else:
        rows.append(["rsync", f"not installed: `{INSTALL_HINT}`", "-", "-", "-", "-"])
        summ.insert(0, ["rsync", "not installed", "-", f"`{INSTALL_HINT}`"])
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s of file", "bytes sent", "detail",
         "peak RSS MiB send / recv"], rows))
    if rrows:
        res.tables.append(md_table(["ratio", "median of per-pair ratios (min–max)",
                                    "multifd faster in", "target"], rrows))
    res.summary += summ
    res.raw.update({"runs": runs, "changed_pages": changed})


def case_auto(ctx: Ctx, res: CaseResult) -> None:
    """--compress auto vs none, lz4, zstd:1 on mixed data, unlimited and at 50 MB/s."""
    methods = ["auto", "none", "lz4", "zstd:1"]
    fixed = methods[1:]
    limit = 1.10
    small = 128 * MiB if not ctx.quick else 32 * MiB
    res.title = (f"auto: --compress auto vs fixed codecs, mixed data ({human_size(ctx.size)}; "
                 f"{human_size(small)} under --max-bandwidth 50M), 2 channels, tmpfs to tmpfs")
    res.setup = ("The compression case's mixed file. Rounds of the four methods with a "
                 "rotating order. In each setting the best fixed method is the one with the "
                 "lowest median wall; auto's ratio to it is taken per round. Target (ours): "
                 f"auto ≤ {limit:.2f}× the best fixed method, i.e. never much worse.")
    for label, size, extra in (("unlimited", ctx.size, []),
                               ("--max-bandwidth 50M", small, ["--max-bandwidth", "50M"])):
        src = ctx.data.mixed_shm(size)
        dst = ctx.shm / "auto.multifd"
        ctx.log(f"  {label}, {human_size(size)}")
        runs = interleave({m: functools.partial(multifd_migrate, src, dst, compress=m,
                                                extra=extra) for m in methods},
                          ctx.pairs, ctx.log)
        unlink(dst)
        best = min(fixed, key=lambda m: med(secs(runs[m])))
        rows = []
        for m in methods:
            x = runs[m]
            wire = med(secs(x, "transferred_bytes"))
            rt = ratio(secs(runs["auto"]), secs(x))
            rows.append([m + (" (best fixed)" if m == best else ""), spread(secs(x)),
                         f"{size / 1e6 / med(secs(x)):.0f}",
                         rt.text() if m != "auto" else "1",
                         f"{wire / MiB:.0f}", f"{wire / size:.2f}", rss_text(x)])
        rb = ratio(secs(runs["auto"]), secs(runs[best]))
        ok = rb.median <= limit
        res.tables.append(f"**{label}, {human_size(size)}**\n\n" + md_table(
            ["compress", "wall s median (min–max)", "MB/s of file",
             "wall(auto) / wall(this), per round", "MiB on the wire", "wire / file size",
             "peak RSS MiB send / recv"], rows)
            + f"\n\nauto / best fixed ({best}): {rb.text()}, auto faster in {rb.below}/"
              f"{len(rb.ratios)} rounds; ≤ {limit:.2f}: "
            + verdict(ok, f"{sum(r <= limit for r in rb.ratios)}/{len(rb.ratios)} rounds"))
        res.summary.append([f"{label}: auto / best fixed ({best}), wall", rb.text(),
                            f"≤ {limit:.2f}", verdict(ok)])
        res.raw[label] = {"size": size, "runs": runs, "best_fixed": best,
                          "ratio_to_best": rb.as_json()}


CASES: dict[str, Callable[[Ctx, CaseResult], None]] = {
    "static-disk": case_static_disk,
    "static-tmpfs": case_static_tmpfs,
    "scan": case_scan,
    "startup": case_startup,
    "channels": case_channels,
    "live-256M": case_live_256m,
    "live-1G": case_live_1g,
    "compression": case_compression,
    "peers": case_peers,
    "qemu": case_qemu,
    "packets": case_packets,
    "resume": case_resume,
    "auto": case_auto,
}


# ---------------------------------------------------------------------------
# Report


def use_snapshot(root: Path) -> str:
    """Run multifd from a copy of multifd_cli/ taken now; return a digest of its sources.

    Others edit multifd_cli/ while benchmarks run: without a snapshot one run could mix
    versions. Children get PYTHONPATH=root and cwd=root (`python -m` puts the cwd first
    on sys.path); MULTIFD_* variables are removed from their environment so that the
    defaults measured are the real defaults.
    """
    global CHILD_CWD
    pkg = root / "multifd_cli"
    shutil.copytree(REPO / "multifd_cli", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    CHILD_ENV["PYTHONPATH"] = str(root)
    # An installed package has its bytecode compiled at install time; without
    # this, PYTHONDONTWRITEBYTECODE (set in some shells) made every start of
    # multifd compile its ~40 modules from source (~40 ms).
    CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    CHILD_CWD = root
    _user_install(root / "venv")
    return h.hexdigest()[:12]


def _user_install(venv: Path) -> None:
    """Run children the way a `pip install multifd-cli` user would start them.

    The development venv is an editable install, whose import hook costs every
    start ~12 ms (it pulls in pathlib and importlib.util) that an installed wheel
    does not. This venv has no pip and no packages of its own: a .pth line puts
    our site-packages on its path as a plain directory, so the dependencies
    import from there while that directory's own .pth files (the hook) are not run.
    """
    global MULTIFD
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(out.stdout.strip(), "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    MULTIFD = [str(py), "-m", "multifd_cli"]


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"],
                           capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def multifd_version() -> str:
    out = subprocess.run([*MULTIFD, "--version"], capture_output=True, text=True,
                         cwd=CHILD_CWD, env=CHILD_ENV)
    return out.stdout.strip() or out.stderr.strip()


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind


def render(meta: dict[str, Any], results: list[CaseResult]) -> str:
    out = ["# multifd benchmarks", ""]
    out.append(md_table(["", ""], [[k, v] for k, v in meta.items() if not isinstance(v, dict)]))
    out += ["", "How to read: every comparison ran interleaved in this one run; cells are "
            "median (min–max) over the runs, ratios are medians of per-pair ratios (< 1: "
            "multifd is faster). *other load* is the CPU other processes used during the case, "
            "in cores (of " + str(os.cpu_count()) + "); load average is the kernel's 1-minute "
            "figure, which includes this benchmark itself. Peak RSS is GNU time's %M (ru_maxrss): "
            "the largest single process of each side, max over the runs. Page caches are not dropped (that needs root "
            "and disturbs everyone else on the machine): sources are read from the page cache by "
            "every variant alike; disk cases run `sync` (untimed) before each timed run. multifd "
            "runs from a snapshot of multifd_cli/ taken at the start.", "", "## Summary", ""]
    rows = []
    for r in results:
        tail = f"other load {r.others_cores:.2f}, loadavg {r.load[0]:.1f}→{r.load[1]:.1f}"
        if r.error:
            rows.append([r.name, "**failed**", r.error.replace("|", "/")[:200], "-", tail])
        for metric, value, target, v in r.summary:
            rows.append([r.name, metric, value, f"{target}: {v}" if target != "-" else v, tail])
    out.append(md_table(["case", "metric", "median (min–max)", "target / verdict",
                         "machine during the case"], rows))
    for r in results:
        out += ["", f"## {r.title or r.name}", ""]
        if r.setup:
            out += [r.setup, ""]
        out += [f"Case took {r.seconds:.0f} s; other processes used {r.others_cores:.2f} cores; "
                f"load average {r.load[0]:.2f} → {r.load[1]:.2f}.", ""]
        if r.error:
            out += [f"**FAILED:** {r.error}", ""]
        for t in r.tables:
            out += [t, ""]
    return "\n".join(out).rstrip() + "\n"


def write_results(md: str, blob: dict[str, Any], stamp: str) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = {"md": md, "json": json.dumps(blob, indent=1, default=str) + "\n"}
    written = []
    for base in (f"bench-{stamp}", "latest"):
        for ext, body in text.items():
            final = RESULTS / f"{base}.{ext}"
            tmp = RESULTS / f"{base}.{ext}.tmp"
            tmp.write_text(body)
            tmp.replace(final)
            written.append(final)
    return written


# ---------------------------------------------------------------------------
# Main


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
