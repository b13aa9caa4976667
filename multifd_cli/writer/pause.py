"""Pausing the writer for the switchover, and never leaving it paused by mistake.

Mechanisms combine: SIGSTOP/SIGCONT of PIDs, a cgroup v2 freeze, and a pair of
user commands (fsfreeze, virsh suspend, a script). A watchdog process, in its
own session, resumes whatever was paused if send's main process dies while
the writer is paused, so even SIGKILL of send leaves the writer running within
two seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from multifd_cli.errors import PauseError, UsageError

if TYPE_CHECKING:
    pass

log = logging.getLogger("multifd")

STOP_WAIT_S = 2.0  # how long a SIGSTOPped process may take to show state T


# -- /proc helpers ------------------------------------------------------------------------
def thread_states(pid: int) -> list[str]:
    """The state letter of every thread of `pid` (R, S, D, T, t, Z, ...)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces or ')'.
        out.append(stat[stat.rindex(")") + 2])
    return out


def is_stopped(pid: int) -> bool:
    states = thread_states(pid)
    return bool(states) and all(s in "Tt" for s in states)


def writers_of(path: str) -> list[int]:
    """PIDs that have `path` open for writing (from /proc/*/fdinfo flags)."""
    target = os.stat(path)
    key = (target.st_dev, target.st_ino)

    def match(fd_path: str) -> bool:
        st = os.stat(fd_path)
        return (st.st_dev, st.st_ino) == key

    return _writers(match)


def writers_under(directory: str) -> list[int]:
    """PIDs that have a file below `directory` open for writing (a directory source)."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    return _writers(lambda fd_path: os.readlink(fd_path).startswith(prefix))


def _writers(match: Callable[[str], bool]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if not match(f"{fd_dir}/{fd}"):
                    continue
                with open(f"/proc/{entry}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
            except (OSError, IndexError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                pids.append(int(entry))
                break
    return pids


def pids_in_cgroup(path: str) -> set[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def _holds_us(cgroup: str) -> bool:
    """True if freezing `cgroup` would freeze this process: it is our cgroup v2
    or an ancestor of it."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
        with open("/proc/self/mounts") as f:
            mounts = [ln.split()[1] for ln in f if ln.split()[2:3] == ["cgroup2"]]
    except OSError:
        return False
    if rel is None:
        return False
    target = os.path.realpath(cgroup)
    for m in mounts:
        ours = os.path.realpath(os.path.join(m, rel.lstrip("/")))
        if ours == target or ours.startswith(target.rstrip("/") + "/"):
            return True
    return False


# -- mechanisms ----------------------------------------------------------------------------
@dataclass
class PauseSpec:
    pids: tuple[int, ...] = ()
    cgroup: str = ""
    pause_cmd: str = ""
    resume_cmd: str = ""

    @property
    def any(self) -> bool:
        return bool(self.pids or self.cgroup or self.pause_cmd)

    def validate(self) -> None:
        if bool(self.pause_cmd) != bool(self.resume_cmd):
            raise UsageError("--pause-cmd and --resume-cmd go together: give both or neither")
        for pid in self.pids:
            if pid <= 0:
                raise UsageError(f"--pause-pid {pid}: expected a process id above 0")
            if not os.path.exists(f"/proc/{pid}"):
                raise UsageError(f"--pause-pid {pid}: no such process")
            if pid == os.getpid():
                raise UsageError(f"--pause-pid {pid} is multifd send itself: it would stop for good")
        if self.cgroup and not os.path.exists(os.path.join(self.cgroup, "cgroup.freeze")):
            raise UsageError(
                f"--pause-cgroup {self.cgroup}: not a cgroup v2 directory with cgroup.freeze"
            )
        if self.cgroup and _holds_us(self.cgroup):
            raise UsageError(
                f"--pause-cgroup {self.cgroup} holds multifd send itself: freezing it would "
                "freeze send too; run send outside it"
            )


def run_command(cmd: str, what: str,
                started: Callable[[int | None], None] | None = None) -> None:
    """Run a pause/resume command; its output goes to the log, never to stdout.

    The command gets its own session, so a Ctrl-C meant for multifd cannot kill
    a half-done `virsh suspend`. `started` hears its process group before we
    wait and None once it is over, so the watchdog can stop it if main dies
    meanwhile. If we stop waiting early (timeout, a signal), the whole group is
    killed: a pause that lands after the resume would strand the writer.
    """
    proc = subprocess.Popen(
        cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        if started is not None:
            started(proc.pid)
        out, _ = proc.communicate(timeout=60)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise PauseError(f"{what} {cmd!r} did not finish within 60 s") from None
        raise
    finally:
        if started is not None:
            started(None)
    for line in out.decode(errors="replace").splitlines():
        log.info("%s: %s", what, line)
    if proc.returncode != 0:
        raise PauseError(f"{what} {cmd!r} exited with status {proc.returncode}")


@dataclass
class Pauser:
    """Pauses and resumes every configured mechanism; remembers what it did."""

    spec: PauseSpec
    stopped: list[int] = field(default_factory=list)  # PIDs we stopped ourselves
    frozen: bool = False
    commanded: bool = False
    extra_pause: Callable[[], None] | None = None  # the embedding API's hooks
    extra_resume: Callable[[], None] | None = None
    extra_paused: bool = False
    # Told what is about to be paused before anything is, so a watchdog can
    # undo it even if main dies halfway through pausing.
    on_intent: Callable[[list[int], bool, bool], None] | None = None
    # Told the process group of a running pause/resume command (None: done).
    on_command: Callable[[int | None], None] | None = None

    @property
    def paused(self) -> bool:
        return bool(self.stopped or self.frozen or self.commanded or self.extra_paused)

    def pause(self) -> None:
        """Pause everything, then wait until every thread of every PID is stopped."""
        to_stop = []
        for pid in self.spec.pids:
            if is_stopped(pid):
                # Stopped by someone else: never SIGCONT it later.
                log.info("process %d was already stopped; it stays as it is", pid)
            else:
                to_stop.append(pid)
        if self.on_intent is not None:
            self.on_intent(to_stop, bool(self.spec.cgroup), bool(self.spec.pause_cmd))
        try:
            # Each mechanism is recorded before it acts: a signal handled between
            # the act and the record would otherwise leave resume() unaware of it.
            for pid in to_stop:
                self.stopped.append(pid)
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    log.warning("process %d is gone; nothing to pause there", pid)
                    self.stopped.remove(pid)
            if self.spec.cgroup:
                self.frozen = True
                self._write_freeze(1)
            if self.spec.pause_cmd:
                # A command that half-paused and then failed is still undone by
                # --resume-cmd.
                self.commanded = True
                run_command(self.spec.pause_cmd, "pause command", self.on_command)
            if self.extra_pause is not None:
                self.extra_pause()
                self.extra_paused = True
            self._wait_stopped()
        except BaseException:
            self.resume()
            raise

    def _wait_stopped(self) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        pending = list(self.stopped)
        while pending:
            pending = [p for p in pending if not is_stopped(p) and os.path.exists(f"/proc/{p}")]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise PauseError(f"process {pending[0]} did not stop within {STOP_WAIT_S:g} s")
            time.sleep(0.002)
        if self.frozen:
            events = os.path.join(self.spec.cgroup, "cgroup.events")
            while True:
                with contextlib.suppress(OSError), open(events) as f:
                    if "frozen 1" in f.read():
                        break
                if time.monotonic() > deadline:
                    raise PauseError(f"cgroup {self.spec.cgroup} did not freeze within {STOP_WAIT_S:g} s")
                time.sleep(0.002)

    def _write_freeze(self, value: int) -> None:
        try:
            with open(os.path.join(self.spec.cgroup, "cgroup.freeze"), "w") as f:
                f.write(str(value))
        except OSError as e:
            raise PauseError(f"cannot {'freeze' if value else 'thaw'} {self.spec.cgroup}: {e.strerror}") from None

    def resume(self) -> None:
        """Undo whatever pause() did; try every mechanism even if one fails.

        A signal during the resume command still lets the thaw and the SIGCONTs
        run; `commanded` then stays set, so `paused` tells the caller that the
        watchdog must finish the job.
        """
        errors: list[str] = []
        try:
            if self.extra_paused and self.extra_resume is not None:
                try:
                    self.extra_resume()
                except Exception as e:  # noqa: BLE001 - resume everything else regardless
                    errors.append(f"resume hook: {e}")
                self.extra_paused = False
            if self.commanded:
                try:
                    run_command(self.spec.resume_cmd, "resume command", self.on_command)
                except PauseError as e:
                    errors.append(e.message)
                self.commanded = False
        finally:
            if self.frozen:
                try:
                    self._write_freeze(0)
                except PauseError as e:
                    errors.append(e.message)
                self.frozen = False
            for pid in self.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.stopped = []
        if errors:
            raise PauseError("; ".join(errors))
