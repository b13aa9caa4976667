"""Windows in which send can exit and leave the writer stopped.

The project's rule: whatever way send exits (error, SIGINT, SIGTERM, SIGKILL of
main), the writer runs again, unless the user asked to keep it paused after a
successful copy. Each test below drives a real `multifd send` / `multifd recv`
pair and a real process standing in for the writer (a `sleep` in its own
session), and reads that process's state from /proc.

Each test pins a window that was found open in review and then closed: a
signal during the resume command, a signal right after the final SIGSTOP, and
SIGKILL of main while the pause command is still running. Each failed before
its fix (pause.py: record before acting, thaw and SIGCONT in a finally, the
watchdog taking over an unfinished resume, commands in their own process
group that the watchdog stops first).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.mfdkit import (
    Proc,
    Runner,
    is_running,
    is_stopped,
    kill_group,
    thread_states,
    wait_until,
    write_random,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = ("--timeout", "20")
SIZE = 4 << 20


def finish(p: Proc, timeout: float = 60.0) -> int:
    out, err = p.popen.communicate(timeout=timeout)
    p.stderr += err
    return p.popen.returncode


def run_patched(script: str, *args: str) -> tuple[int, str, str]:
    """Run multifd through `script` (python -c, which patches something first and
    then calls cli.main on the remaining arguments); kill its group afterwards."""
    p = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        kill_group(p)
    return p.returncode, out, err


# -- 1. a signal while the resume command runs ---------------------------------------------------
#
# Pauser.resume() used to catch only PauseError around each mechanism: a SIGINT or
# SIGTERM during --resume-cmd skipped the cgroup thaw and the SIGCONT of
# --pause-pid, and Watchdog.close(keep=False) then told the watchdog all was
# resumed. Now the thaw and SIGCONTs run in a finally, the interrupted command's
# group is killed, and the watchdog is handed the unfinished resume.

SIGNALS = {
    "sigterm-main": lambda pid: os.kill(pid, signal.SIGTERM),
    # Ctrl-C: the terminal signals the whole foreground group
    "ctrl-c-group": lambda pid: os.killpg(pid, signal.SIGINT),
}


@pytest.mark.parametrize("how", list(SIGNALS))
def test_signal_during_resume_cmd_after_a_failure(runner: Runner, tmp_path: Path, sleeper: int,
                                                  how: str) -> None:
    """The migration fails while the writer is paused (the pause command kills
    recv), so send resumes it; the resume command is slow and cut short by the
    signal. The writer must run again at once, and the watchdog must run the
    unfinished resume command a second time."""
    src = write_random(tmp_path / "src", SIZE, seed=61)
    runs = tmp_path / "resume-runs"
    recv, uri = runner.recv(tmp_path / "dest", *TIMEOUT)
    send = runner.send(src, uri, *TIMEOUT, "--pause-pid", str(sleeper),
                       "--pause-cmd", f"kill -KILL {recv.popen.pid}",
                       "--resume-cmd", f"echo run >> {shlex.quote(str(runs))}; sleep 2")
    try:
        assert wait_until(runs.exists, 30) is not None, "never reached the resume command"
        assert is_stopped(sleeper), thread_states(sleeper)
        SIGNALS[how](send.popen.pid)
        rc = finish(send, 30)
        assert rc in (130, 143), (rc, send.stderr)
        took = wait_until(lambda: is_running(sleeper), 2.0)
        assert took is not None, (
            f"writer still stopped after send exited {rc} during --resume-cmd: "
            f"{thread_states(sleeper)}\n{send.stderr}"
        )
        assert wait_until(lambda: runs.read_text().count("run") == 2, 5) is not None, (
            "the watchdog did not run the interrupted --resume-cmd again"
        )
    finally:
        kill_group(send.popen)


@pytest.mark.parametrize("how", list(SIGNALS))
def test_signal_during_resume_cmd_after_success(runner: Runner, tmp_path: Path, sleeper: int,
                                                how: str) -> None:
    """After success the run is complete: the signal is held, the resume finishes."""
    src = write_random(tmp_path / "src", SIZE, seed=61)
    marker = tmp_path / "resuming"
    recv, uri = runner.recv(tmp_path / "dest", *TIMEOUT)
    send = runner.send(src, uri, *TIMEOUT, "--pause-pid", str(sleeper),
                       "--pause-cmd", "true",
                       "--resume-cmd", f"touch {shlex.quote(str(marker))}; exec sleep 2",
                       "--after-success", "resume")
    try:
        assert wait_until(marker.exists, 30) is not None, "never reached the resume command"
        assert is_stopped(sleeper), thread_states(sleeper)  # paused by --pause-pid
        SIGNALS[how](send.popen.pid)
        assert finish(send, 30) == 0, send.stderr
        assert is_running(sleeper), thread_states(sleeper)
    finally:
        kill_group(send.popen)


# -- 2. a signal right after the final pause's SIGSTOP -------------------------------------------
#
# Pauser.pause() sends SIGSTOP and only then appends the pid to self.stopped. A
# signal handled between the two (Python runs handlers between bytecodes) raises
# Interrupted there: resume() does not know the pid, and Watchdog.close(keep=False)
# tells the watchdog, which did know it (on_intent), that all is resumed.

_SIGTERM_AFTER_FINAL_STOP = r"""
import os, signal, sys
from multifd_cli import cli
target = int(sys.argv[1])
real_kill = os.kill
fired = []
def kill(pid, sig):
    real_kill(pid, sig)
    if pid == target and sig == signal.SIGSTOP and not fired:
        fired.append(True)
        real_kill(os.getpid(), signal.SIGTERM)  # a real SIGTERM, landing just now
os.kill = kill
cli.main(sys.argv[2:])
"""


def test_sigterm_right_after_the_final_sigstop(runner: Runner, tmp_path: Path,
                                               sleeper: int) -> None:
    src = write_random(tmp_path / "src", SIZE, seed=62)
    recv, uri = runner.recv(tmp_path / "dest", *TIMEOUT)
    rc, _, err = run_patched(_SIGTERM_AFTER_FINAL_STOP, str(sleeper), "send", "--json",
                             *TIMEOUT, str(src), "--to", uri, "--pause-pid", str(sleeper))
    assert rc == 143, err
    took = wait_until(lambda: is_running(sleeper), 3.0)
    assert took is not None, (
        f"--pause-pid {sleeper} left stopped after SIGTERM right after its SIGSTOP: "
        f"{thread_states(sleeper)}\n{err}"
    )


# -- 3. SIGKILL of main while --pause-cmd runs ---------------------------------------------------
#
# The pause command is a child of main in main's process group; nothing kills it
# when main dies. On EOF the watchdog runs --resume-cmd at once, while the orphaned
# pause command is still working: the pause lands after the resume, and the writer
# stays paused for good.


def test_sigkill_of_main_while_pause_cmd_runs(runner: Runner, tmp_path: Path,
                                              sleeper: int) -> None:
    src = write_random(tmp_path / "src", SIZE, seed=63)
    marker = tmp_path / "pausing"
    recv, uri = runner.recv(tmp_path / "dest", *TIMEOUT)
    # A pause command that takes a moment (virsh suspend, fsfreeze of a busy fs, ...).
    pause_cmd = f"echo $$ > {shlex.quote(str(marker))}; sleep 1; kill -STOP {sleeper}"
    send = runner.send(src, uri, *TIMEOUT, "--pause-cmd", pause_cmd,
                       "--resume-cmd", f"kill -CONT {sleeper}")
    try:
        assert wait_until(lambda: marker.exists() and marker.read_text().strip() != "", 30) \
            is not None, "never reached the pause command"
        shell = int(marker.read_text())
        os.kill(send.popen.pid, signal.SIGKILL)
        assert send.popen.wait(10) == -signal.SIGKILL
        # Let the orphaned pause command finish, then give the watchdog its 2 s.
        assert wait_until(lambda: thread_states(shell) in ([], ["Z"]), 10) is not None
        took = wait_until(lambda: is_running(sleeper), 2.5)
        assert took is not None, (
            f"the pause command finished after the watchdog's --resume-cmd: the writer "
            f"stays stopped after SIGKILL of send: {thread_states(sleeper)}"
        )
    finally:
        kill_group(send.popen)


# -- 4. a signal after success ---------------------------------------------------------------------
#
# Once the copy is verified and complete, send keeps the writer paused (the
# default --after-success keep-paused). A SIGTERM during the cleanup that
# follows used to report failure (exit 143) with the writer still paused: a
# failed exit must never leave it paused, and a finished migration is not a
# failure. Signals after success are now held until exit.

_SIGTERM_AFTER_SUCCESS = r"""
import os, signal, sys
from multifd_cli import cli
from multifd_cli.writer import guard
real = guard.WriterGuard.release
def release(self):
    if self.succeeded:
        os.kill(os.getpid(), signal.SIGTERM)  # lands during the cleanup after success
    real(self)
guard.WriterGuard.release = release
cli.main(sys.argv[1:])
"""


def test_sigterm_after_success_is_not_a_failure(runner: Runner, tmp_path: Path,
                                                sleeper: int) -> None:
    src = write_random(tmp_path / "src", SIZE, seed=64)
    dest = tmp_path / "dest"
    recv, uri = runner.recv(dest, *TIMEOUT)
    rc, out, err = run_patched(_SIGTERM_AFTER_SUCCESS, "send", "--json", *TIMEOUT, str(src),
                               "--to", uri, "--pause-pid", str(sleeper))
    assert rc == 0, err
    assert [json.loads(line)["event"] for line in out.splitlines()][-1] == "completed", out
    assert finish(recv, 30) == 0, recv.stderr
    assert dest.read_bytes() == src.read_bytes()
    assert is_stopped(sleeper), thread_states(sleeper)  # keep-paused, as asked after success
