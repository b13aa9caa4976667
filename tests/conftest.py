"""Shared fixtures: real `multifd` processes on loopback, real files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import pytest

MULTIFD = [sys.executable, "-m", "multifd_cli"]


def sha256(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Proc:
    """A running multifd process whose stdout carries JSON events."""

    popen: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def next_event(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line:
            if time.monotonic() > deadline:
                raise TimeoutError("no event from multifd")
            line = self.popen.stdout.readline()
            if not line and self.popen.poll() is not None:
                raise RuntimeError(f"multifd exited {self.popen.returncode}: {self.read_stderr()}")
        ev = json.loads(line)
        self.events.append(ev)
        return ev

    def wait(self, timeout: float = 120.0) -> int:
        out, err = self.popen.communicate(timeout=timeout)
        self.stderr += err
        for line in out.splitlines():
            if line.strip():
                self.events.append(json.loads(line))
        return self.popen.returncode

    def read_stderr(self) -> str:
        if self.popen.stderr is not None and self.popen.poll() is not None:
            self.stderr += self.popen.stderr.read()
        return self.stderr

    def last(self) -> dict[str, Any]:
        return self.events[-1]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def spawn(args: list[str], env: dict[str, str] | None = None, stdin: IO[str] | None = None) -> Proc:
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    popen = subprocess.Popen(
        [*MULTIFD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    return Proc(popen)


@dataclass
class Migration:
    recv: Proc
    send: Proc
    uri: str

    def wait(self, timeout: float = 120.0) -> tuple[int, int]:
        s = self.send.wait(timeout)
        r = self.recv.wait(timeout)
        return s, r


class Runner:
    """Starts recv (reads its listening event), then send, like a user would."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def recv(self, dest: Path, *args: str, listen: str = "tcp:127.0.0.1:0",
             env: dict[str, str] | None = None) -> tuple[Proc, str]:
        p = spawn(["recv", "--json", "--listen", listen, "--timeout", "30", *args, str(dest)], env)
        self.procs.append(p)
        ev = p.next_event()
        assert ev["event"] == "listening", ev
        return p, ev["uri"]

    def send(self, sources: list[Path] | Path, uri: str, *args: str,
             env: dict[str, str] | None = None) -> Proc:
        srcs = [sources] if isinstance(sources, Path) else sources
        p = spawn(["send", "--json", "--timeout", "30", *map(str, srcs), "--to", uri, *args], env)
        self.procs.append(p)
        return p

    def migrate(self, source: Path, dest: Path, send_args: tuple[str, ...] = (),
                recv_args: tuple[str, ...] = (), listen: str = "tcp:127.0.0.1:0",
                send_env: dict[str, str] | None = None,
                recv_env: dict[str, str] | None = None) -> Migration:
        r, uri = self.recv(dest, *recv_args, listen=listen, env=recv_env)
        s = self.send(source, uri, *send_args, env=send_env)
        return Migration(r, s, uri)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                kill_group(p.popen)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path)
    yield r
    r.cleanup()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MULTIFD_* settings from the developer's shell leak into a test."""
    for k in list(os.environ):
        if k.startswith("MULTIFD_"):
            monkeypatch.delenv(k)


def write_random(path: Path, size: int, seed: int = 1) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


_TEXT = (
    b"Live migration copies a changing file in passes; each pass resends the pages "
    b"that changed since the one before, over several channels at once.\n"
)


def write_mixed(path: Path, size: int, seed: int = 1) -> Path:
    """Deterministic data that compresses partly: 64 KiB units of random bytes,
    text, zeros (page aligned, so they become zero pages) and half random/half text."""
    import random

    rng = random.Random(seed)
    unit = 64 << 10
    text = (_TEXT * (unit // len(_TEXT) + 1))[:unit]
    with open(path, "wb") as f:
        left, k = size, 0
        while left:
            n = min(left, unit)
            kind = k % 4
            if kind == 0:
                data = rng.randbytes(n)
            elif kind == 1:
                data = text[:n]
            elif kind == 2:
                data = bytes(n)
            else:
                data = (rng.randbytes(unit // 2) + text[: unit // 2])[:n]
            f.write(data)
            left -= n
            k += 1
    return path


# -- process states: read /proc directly, independently of multifd_cli.writer.pause -----------------
WRITER = Path(__file__).resolve().parents[1] / "examples" / "writer.py"


def start_writer(path: Path, rate: str = "16M", hot: str = "16M") -> int:
    """Start examples/writer.py on `path` in its own session; return its pid once it wrote.
    The caller releases it (see `release`); the `writers` fixture does that itself."""
    return Writer(path, rate, hot).pid


def read_event(popen: subprocess.Popen[str], timeout: float = 20.0) -> tuple[str, dict[str, Any]]:
    """The next JSON event line of a process started with text pipes, and its parse;
    fails if none comes within `timeout` (a thread reads, so a silent process
    cannot hang the test)."""
    assert popen.stdout is not None
    out = popen.stdout
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
    t.start()
    t.join(timeout)
    assert result and result[0], f"no event within {timeout} s; exit {popen.poll()}"
    return result[0], json.loads(result[0])


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> float | None:
    """Poll `pred` until true; the seconds it took, or None on timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


def thread_states(pid: int) -> list[str]:
    """Field 3 of /proc/PID/task/*/stat for every thread ([] once the process is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    states = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        states.append(s[s.rindex(")") + 2])
    return states


def is_stopped(pid: int) -> bool:
    s = thread_states(pid)
    return bool(s) and all(c in "Tt" for c in s)


def is_running(pid: int) -> bool:
    """Alive and no thread stopped (S, R, D are all fine)."""
    s = thread_states(pid)
    return bool(s) and not any(c in "TtZX" for c in s)


def release(pid: int) -> None:
    """Continue a possibly stopped process, then kill it: a test writer's end."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Writer:
    """examples/writer.py in its own session; always continued and killed at the end."""

    def __init__(self, path: Path, rate: str = "16M", hot: str = "16M", threads: int = 1,
                 seed: int = 1) -> None:
        self.path = path
        self.threads = threads
        before = path.stat().st_mtime_ns
        self.popen = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), "--rate", rate, "--hot-set", hot,
             "--threads", str(threads), "--seed", str(seed)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Started only once every writing thread exists and the file has changed.
        deadline = time.monotonic() + 10
        while len(thread_states(self.pid)) < threads + 1 or path.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("the writer did not start writing")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def states(self) -> list[str]:
        return thread_states(self.pid)

    def stopped(self) -> bool:
        return is_stopped(self.pid)

    def running(self) -> bool:
        return is_running(self.pid)

    def kill(self) -> None:
        if self.popen.poll() is None:
            release(self.pid)
        self.popen.wait(10)


@pytest.fixture
def writers() -> Iterator[Callable[..., Writer]]:
    """Start writers with `writers(path, rate=..., hot=..., threads=..., seed=...)`;
    every one is continued and killed when the test ends."""
    started: list[Writer] = []

    def start(path: Path, **kw: Any) -> Writer:
        w = Writer(path, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def kill_group(popen: subprocess.Popen[Any]) -> None:
    """SIGKILL a process started with start_new_session and its whole group
    (channels, commands it ran), then reap it."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait(10)


def reap(pid: int) -> None:
    """`release` a child this test started by pid, then wait for it."""
    release(pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """For unix sockets: tmp_path can exceed sun_path's 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="mfd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def strace_ok() -> None:
    """strace runs and can trace here (tests that inject faults with it need that)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace')[:200]}")


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process to name in --pause-pid when nothing writes; released afterwards."""
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield p.pid
    release(p.pid)
    p.wait(10)
