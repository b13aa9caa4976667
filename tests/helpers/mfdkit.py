"""The one helper module of the tests: real processes, real files, /proc and faults.

conftest.py holds only fixtures, built from what is here; tests import the rest as
``from helpers.mfdkit import ...`` (tests/ is on sys.path through its conftest).

- data: ``sha256``, ``write_random``, ``write_mixed``;
- multifd processes, two ways of reading them: ``Proc`` (from ``spawn``, ``Runner``)
  reads its JSON events in order in the test's own thread, for tests that step
  through a conversation; ``Mfd`` (from ``Kit``) reads stdout and stderr in background
  threads, so that a test that injects faults never blocks on a full pipe, and ends
  as a ``Done`` that checks the one-line error rule;
- writers and process states: ``Writer``, ``start_writer``, ``is_running``, and the
  package's own ``thread_states`` and ``is_stopped`` (multifd_cli.writer.pause);
- /proc accounting: children, cmdline matches, ``assert_no_procs``;
- waiting: ``wait_until`` says how long a condition took (None if it never held),
  ``assert_within`` fails the test with what it waited for;
- the network: ``Proxy``, a TCP proxy that records every byte both ways and can cut or
  stall one channel connection after N bytes; ``read_message`` and
  ``closed_by_peer`` for handshake-level fake peers built with the protocol encoders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from multifd_cli.writer.pause import is_stopped, thread_states

ROOT = Path(__file__).resolve().parents[2]
WRITER = ROOT / "examples" / "writer.py"
MULTIFD = [sys.executable, "-m", "multifd_cli"]
MiB = 1 << 20


# -- data ------------------------------------------------------------------------------------------


def sha256(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random(path: Path, size: int, seed: int = 1) -> Path:
    with open(path, "wb") as f:
        write_random_bytes(f, size, random.Random(seed))
    return path


def write_random_bytes(f: IO[bytes], size: int, rng: random.Random) -> None:
    """`size` bytes from `rng` at f's position, a MiB at a time."""
    left = size
    while left:
        n = min(left, 1 << 20)
        f.write(rng.randbytes(n))
        left -= n


def first_time(marker: str | os.PathLike[str]) -> bool:
    """True once per `marker` (a file it creates): a between-passes hook runs after
    every pass but must change the source only once."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


_TEXT = (
    b"Live migration copies a changing file in passes; each pass resends the pages "
    b"that changed since the one before, over several channels at once.\n"
)


def write_mixed(path: Path, size: int, seed: int = 1) -> Path:
    """Deterministic data that compresses partly: 64 KiB units of random bytes,
    text, zeros (page aligned, so they become zero pages) and half random/half text."""
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


# -- processes -------------------------------------------------------------------------------------


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a multifd under test: no MULTIFD_* settings from the
    developer's shell, then the test's own, and unbuffered output so events arrive
    as they happen."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFD_")}
    full.update(env or {})
    full.setdefault("PYTHONUNBUFFERED", "1")
    return full


def kill_group(popen: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGKILL a process started with start_new_session and its whole group
    (channels, commands it ran), then reap it."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.wait(timeout)


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
        err = self.popen.stderr
        # After wait() (communicate) the pipe is closed and its text is already kept.
        if err is not None and not err.closed and self.popen.poll() is not None:
            self.stderr += err.read()
        return self.stderr

    def last(self) -> dict[str, Any]:
        return self.events[-1]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def spawn(args: list[str], env: dict[str, str] | None = None, stdin: IO[str] | None = None) -> Proc:
    popen = subprocess.Popen(
        [*MULTIFD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env(env),
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


@dataclass
class Done:
    """How a multifd process ended."""

    code: int
    events: list[dict[str, Any]]
    err: str
    seconds: float
    argv: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        tail = "\n".join(json.dumps(e) for e in self.events[-5:])
        return f"exit {self.code} after {self.seconds:.1f} s\nevents:\n{tail}\nstderr:\n{self.err}"

    def ok(self) -> dict[str, Any]:
        """Exit 0, no error line, no traceback, a final completed event."""
        assert self.code == 0, str(self)
        assert "Traceback" not in self.err and "multifd: error" not in self.err, str(self)
        assert self.events and self.events[-1]["event"] == "completed", str(self)
        return self.events[-1]

    def error(self, *codes: int) -> str:
        """Exit status in `codes`, exactly one `multifd: error:` line, last on stderr,
        no traceback, and a final `failed` event with the same code (--json).
        Returns the message."""
        assert self.code in codes, f"expected exit {codes}: {self}"
        assert "Traceback" not in self.err, str(self)
        lines = self.err.rstrip("\n").splitlines()
        errors = [ln for ln in lines if ln.startswith("multifd: error:")]
        assert len(errors) == 1, f"expected one error line: {self}"
        assert lines[-1] == errors[0], f"the error line is not the last line: {self}"
        assert "\n" not in errors[0]
        if self.events:
            last = self.events[-1]
            assert last["event"] == "failed" and last["exit_code"] == self.code, str(self)
            assert [e["event"] for e in self.events].count("failed") == 1, str(self)
        return errors[0][len("multifd: error: "):]

    def completed(self) -> dict[str, Any]:
        return self.ok()


class Mfd:
    """One multifd process (new session, so a group kill reaches only it)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = [*MULTIFD, *args]
        self.popen = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=child_env(env), start_new_session=True, cwd=str(ROOT),
        )
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._eof = 0
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._done: Done | None = None

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "non-json", "line": line}
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._eof += 1
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._cond:
                self._err.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof += 1
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                 what: str = "an event") -> dict[str, Any]:
        """The first event (from the start) that satisfies `pred`."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                if self._eof >= 2:
                    raise AssertionError(f"exited {self.popen.poll()} without {what}: "
                                         f"{self.stderr_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s: {self.stderr_locked()}")
                self._cond.wait(left)

    def stderr_locked(self) -> str:
        return "".join(self._err)

    def wait_stderr(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in "".join(self._err):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof >= 2:
                    raise AssertionError(f"{text!r} not on stderr: {''.join(self._err)}")
                self._cond.wait(left)

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == name, timeout, f"a {name!r} event")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 60.0) -> Done:
        if self._done is None:
            try:
                code = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"{self.argv[3]} still running after {timeout} s: {self.stderr}") from None
            seconds = time.monotonic() - self.started
            for t in self._threads:
                t.join(10)
            self._done = Done(code, list(self.events), self.stderr, seconds, self.argv)
        return self._done

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                kill_group(self.popen, 5)


class Kit:
    """Starts multifd processes and writers for one test; kills them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Mfd] = []
        self.writers: list[Writer] = []
        self.proxies: list[Proxy] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Mfd:
        p = Mfd(args, env)
        self.procs.append(p)
        return p

    def recv(self, dest: Path | str, *args: str, env: dict[str, str] | None = None,
             timeout: float = 20, listen: str = "tcp:127.0.0.1:0") -> tuple[Mfd, str]:
        p = self.start(["recv", "--json", "--listen", listen, "--timeout", f"{timeout:g}",
                        *args, str(dest)], env)
        ev = p.event("listening")
        return p, ev["uri"]

    def send(self, src: Path | str, uri: str, *args: str, env: dict[str, str] | None = None,
             timeout: float = 20) -> Mfd:
        return self.start(["send", "--json", "--timeout", f"{timeout:g}", str(src), "--to", uri,
                           *args], env)

    def writer(self, path: Path, rate: str = "8M", hot: str = "4M") -> int:
        w = Writer(path, rate, hot)
        self.writers.append(w)
        return w.pid

    def proxy(self, upstream: str, **kw: Any) -> Proxy:
        p = Proxy(upstream, **kw)
        self.proxies.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
        for w in self.writers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.kill()
        for px in self.proxies:
            px.close()


# -- writers and process states ----------------------------------------------------------------------


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


def start_writer(path: Path, rate: str = "16M", hot: str = "16M") -> int:
    """Start examples/writer.py on `path` in its own session; return its pid once it wrote.
    The caller releases it (see `release`); the `writers` fixture does that itself."""
    return Writer(path, rate, hot).pid


def reap(pid: int) -> None:
    """`release` a child this test started by pid, then wait for it."""
    release(pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# -- /proc -------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return sorted(set(out))


def wait_children(pid: int, n: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        kids = children(pid)
        if len(kids) >= n:
            return kids
        assert time.monotonic() < deadline, f"{pid} has children {kids}, expected {n}"
        time.sleep(0.02)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ('' if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def matching(needles: Iterable[str], exclude: Iterable[int] = ()) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose cmdline contains any needle, except us and
    `exclude` (e.g. a writer that is meant to keep running)."""
    needles = [n for n in needles if n]
    skip = {os.getpid(), *exclude}
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        cl = cmdline(int(name))
        if cl and any(n in cl for n in needles) and proc_state(int(name)) not in ("Z", "X", ""):
            out.append((int(name), cl))
    return out


def assert_no_procs(needles: Iterable[str], timeout: float = 10.0,
                    exclude: Iterable[int] = ()) -> None:
    """Within `timeout`, no process mentions the test's DEST, source or ports."""
    needles = list(needles)
    exclude = list(exclude)
    deadline = time.monotonic() + timeout
    while True:
        left = matching(needles, exclude)
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left behind: {left}")
        time.sleep(0.05)


def writer_runs(pid: int, timeout: float = 5.0) -> None:
    """The writer is running again: no thread stopped (T), within `timeout`."""
    assert thread_states(pid), f"writer {pid} is gone"
    assert_within(lambda: is_running(pid), timeout, f"writer {pid} to run again")


# -- waiting -----------------------------------------------------------------------------------------


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> float | None:
    """Poll `pred` until true; the seconds it took, or None on timeout."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


def assert_within(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """The first true value of `cond` within `timeout`; fails the test naming `what`."""
    seen: list[Any] = [None]

    def holds() -> bool:
        seen[0] = cond()
        return bool(seen[0])

    assert wait_until(holds, timeout, step) is not None, f"timed out waiting for {what}"
    return seen[0]


def entries(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hostport(uri: str) -> tuple[str, int]:
    assert uri.startswith("tcp:"), uri
    host, port = uri[4:].rsplit(":", 1)
    return host.strip("[]"), int(port)


# -- a recording, fault-injecting TCP proxy ---------------------------------------------------------


HELLO_ROLE_AT = 40 + 2  # after the 40-byte header: u16 version, then u16 role


@dataclass
class Leg:
    """One proxied connection: what went each way, and the HELLO role if it was plain."""

    index: int
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)
    role: int | None = None
    cut: bool = False
    stalled: bool = False
    closed: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """Forwards 127.0.0.1:port to `upstream` and records every byte both ways.

    Faults (plain connections only, where the HELLO role is readable):
    - cut_role/cut_after: once that channel's connection has forwarded `cut_after`
      bytes towards recv, close both of its sockets (a connection cut mid-pass);
    - stall_role/stall_after: once it has forwarded that much, forward nothing more in
      either direction, but keep both sockets open (a stalled channel).
    """

    def __init__(self, upstream: str, *, cut_role: int | None = None, cut_after: int = 0,
                 stall_role: int | None = None, stall_after: int = 0,
                 hold_role: int | None = None) -> None:
        self.upstream = hostport(upstream)
        self.hold_role = hold_role  # forward nothing of this role's connection until release
        self.release = threading.Event()
        self.cut_role, self.cut_after = cut_role, cut_after
        self.stall_role, self.stall_after = stall_role, stall_after
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self.legs: list[Leg] = []
        self.socks: list[socket.socket] = []
        self.fault = threading.Event()  # set when a cut or stall happened
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self._lock:
                leg = Leg(len(self.legs))
                self.legs.append(leg)
                self.socks.append(c)
            threading.Thread(target=self._open, args=(leg, c), daemon=True).start()

    def _open(self, leg: Leg, c: socket.socket) -> None:
        """Read the client's first bytes (the HELLO role, when plain), hold if asked,
        and only then connect upstream, so a held connection is not even in recv's
        accept queue."""
        head = b""
        try:
            c.settimeout(30)
            while len(head) < HELLO_ROLE_AT + 2:
                data = c.recv(65536)
                if not data:
                    break
                head += data
                if head[:4] != struct.pack("<I", 0x4D464431)[: len(head[:4])]:
                    break  # not a plain HELLO (TLS, junk): forward as it is
            c.settimeout(None)
            if len(head) >= HELLO_ROLE_AT + 2 and head[:4] == struct.pack("<I", 0x4D464431):
                leg.role = struct.unpack_from("<H", head, HELLO_ROLE_AT)[0]
                if leg.role == self.hold_role:
                    self.release.wait(60)
            u = socket.create_connection(self.upstream, timeout=10)
            u.settimeout(None)
        except OSError:
            with contextlib.suppress(OSError):
                c.close()
            leg.closed.set()
            return
        with self._lock:
            self.socks.append(u)
        threading.Thread(target=self._pump, args=(leg, c, u, True, head), daemon=True).start()
        threading.Thread(target=self._pump, args=(leg, u, c, False, b""), daemon=True).start()

    def _pump(self, leg: Leg, a: socket.socket, b: socket.socket, up: bool,
              first: bytes) -> None:
        buf = leg.c2s if up else leg.s2c
        try:
            pending = first
            while True:
                if leg.stalled:
                    time.sleep(0.05)  # keep both sockets open, read nothing
                    if leg.closed.is_set():
                        return
                    continue
                if pending:
                    data, pending = pending, b""
                else:
                    data = a.recv(65536)
                if not data:
                    break
                if leg.stalled:
                    continue  # dropped: already stalled by the other direction
                if up and leg.role is not None and leg.role == self.cut_role \
                        and len(buf) + len(data) >= self.cut_after:
                    keep = max(0, self.cut_after - len(buf))
                    buf += data[:keep]
                    b.sendall(data[:keep])
                    leg.cut = True
                    self.fault.set()
                    break
                if up and leg.role is not None and leg.role == self.stall_role \
                        and len(buf) + len(data) >= self.stall_after:
                    keep = max(0, self.stall_after - len(buf))
                    buf += data[:keep]
                    b.sendall(data[:keep])
                    leg.stalled = True
                    self.fault.set()
                    continue
                buf += data
                b.sendall(data)
        except OSError:
            pass
        if leg.stalled and not leg.cut:
            return  # a stalled leg stays open until close()
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        leg.closed.set()

    def leg(self, role: int) -> Leg | None:
        with self._lock:
            return next((x for x in self.legs if x.role == role), None)

    def welcomed(self, role: int) -> bool:
        """That role's connection got at least a header plus a WELCOME back."""
        x = self.leg(role)
        return x is not None and len(x.s2c) >= 40 + 18

    def captured(self) -> bytes:
        with self._lock:
            return b"".join(bytes(leg.c2s) + bytes(leg.s2c) for leg in self.legs)

    def total(self) -> int:
        with self._lock:
            return sum(len(leg.c2s) + len(leg.s2c) for leg in self.legs)

    def close(self) -> None:
        self._stop = True
        self.release.set()
        with contextlib.suppress(OSError):
            self.lsock.close()
        with self._lock:
            for leg in self.legs:
                leg.closed.set()
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.close()


# -- fake peers ----------------------------------------------------------------------------------------


def read_message(sock: socket.socket, dec: Any, timeout: float = 10.0) -> Any:
    """The next protocol message from `sock`, or None at EOF / reset."""
    sock.settimeout(timeout)
    while True:
        msg = dec.next_message()
        if msg is not None:
            return msg
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return None
        if not data:
            return None
        dec.feed(data)


def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True when the peer closes `sock` (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
