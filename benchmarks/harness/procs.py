"""Child processes: timed from a common t0, peak RSS from GNU time, and all of them
killed when a case ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness import GNU_TIME, REPO, REST_S, BenchError


@dataclass
class ChildSetup:
    """How children start; snapshot.use_snapshot() points it at the code measured."""

    cwd: Path = REPO
    # MULTIFD_* settings from the shell are left out, so that the defaults measured
    # are the real defaults.
    env: dict[str, str] = field(default_factory=lambda: {
        k: v for k, v in os.environ.items() if not k.startswith("MULTIFD_")})
    multifd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "multifd_cli"])


CHILD = ChildSetup()


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
            stderr=subprocess.PIPE, text=True, cwd=CHILD.cwd, env=CHILD.env,
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


def cp_cmd(src: Path, dst: Path) -> list[str]:
    return ["cp", "--reflink=never", str(src), str(dst)]


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
