"""The watchdog: a process in its own session that resumes the writer if send's
main dies while the writer is paused or throttled, even by SIGKILL."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Sequence

from multifd_cli.writer.pause import PauseSpec

log = logging.getLogger("multifd")


class _RawFd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Watchdog:
    """A tiny process that resumes the writer if send's main dies while it is paused.

    Main tells it what is paused; it resumes on EOF of its pipe (main is gone)
    unless main said the pause is meant to last ("keep").
    """

    def __init__(self, spec: PauseSpec) -> None:
        self.spec = spec
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(w)
            _watch(r, spec)
        os.close(r)
        self.pid = pid
        self._w = w

    def inherited_end(self) -> _RawFd:
        """What a forked channel must close, so only main keeps the watchdog waiting."""
        return _RawFd(self._w)

    def _say(self, msg: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, (msg + "\n").encode())

    def paused(self, stopped: Sequence[int], frozen: bool, commanded: bool) -> None:
        pids = ",".join(map(str, stopped)) or "-"
        self._say(f"paused {pids} {int(frozen)} {int(commanded)}")

    def throttling(self, pids: Sequence[int], old_cpu_max: str | None) -> None:
        """The throttle may hold these stopped between two of its ticks."""
        cpu = (old_cpu_max or "").replace(" ", "_") or "-"
        self._say(f"throttle {','.join(map(str, pids)) or '-'} {cpu}")

    def throttle_off(self) -> None:
        self._say("throttle-off")

    def command(self, pgid: int | None) -> None:
        """A pause/resume command runs in process group `pgid` (None: it is over)."""
        self._say(f"command {pgid if pgid is not None else '-'}")

    def resumed(self) -> None:
        self._say("resumed")

    def close(self, keep: bool = False) -> None:
        """Stop the watchdog; with keep=True the writer is meant to stay paused."""
        self._say("keep" if keep else "resumed")
        self._say("exit")
        with contextlib.suppress(OSError):
            os.close(self._w)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def hand_over(self) -> None:
        """Main could not finish resuming (a signal cut it short): close the pipe
        without a word, so the watchdog undoes what it knows of, as if main had
        died. Not waited for: its resume command may take a while."""
        with contextlib.suppress(OSError):
            os.close(self._w)


def _default_signals() -> None:  # pragma: no cover - runs in a child before exec
    """The watchdog ignores SIGINT/SIGTERM; the resume command it runs must not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _watch(fd: int, spec: PauseSpec) -> None:  # pragma: no cover - child process
    """Child: hold the pause state; on EOF, resume it. Never logs (forked locks)."""
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for other in range(3, 1024):
            if other != fd:
                with contextlib.suppress(OSError):
                    os.close(other)
        # It never writes to stdout: a script reading send's output must see
        # EOF when send exits, not when the watchdog does.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        stopped: list[int] = []
        throttled: list[int] = []
        cpu_max = ""
        frozen = commanded = False
        command_group = 0
        buf = b""
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "paused" and len(words) == 4:
                    stopped = [int(p) for p in words[1].split(",") if p != "-"]
                    frozen = words[2] == "1"
                    commanded = words[3] == "1"
                elif words[0] == "throttle" and len(words) == 3:
                    throttled = [int(p) for p in words[1].split(",") if p != "-"]
                    cpu_max = "" if words[2] == "-" else words[2].replace("_", " ")
                elif words[0] == "command" and len(words) == 2:
                    command_group = 0 if words[1] == "-" else int(words[1])
                elif words[0] == "throttle-off":
                    throttled, cpu_max = [], ""
                elif words[0] in ("resumed", "keep"):
                    stopped, frozen, commanded = [], False, False
                elif words[0] == "exit":
                    os._exit(0)
        # Main is gone while the writer may be paused or throttled: resume it.
        if command_group:
            # First stop a pause (or resume) command main left running: a pause
            # that lands after our resume would strand the writer.
            with contextlib.suppress(OSError):
                os.killpg(command_group, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(command_group, 0)
                except OSError:
                    break
                time.sleep(0.01)
        for pid in throttled:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        if cpu_max:
            with contextlib.suppress(OSError), open(os.path.join(spec.cgroup, "cpu.max"), "w") as f:
                f.write(cpu_max)
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        if frozen:
            with contextlib.suppress(OSError), open(os.path.join(spec.cgroup, "cgroup.freeze"), "w") as f:
                f.write("0")
        if commanded:
            subprocess.run(spec.resume_cmd, shell=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                           preexec_fn=_default_signals)
        if stopped or frozen or commanded:
            os.write(2, b"multifd: watchdog: send died during the pause; the writer was resumed\n")
    except BaseException:  # noqa: BLE001 - a child must never return into main's code
        code = 1
    os._exit(code)
