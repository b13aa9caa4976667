"""Channel logs reach main's handler once each, tagged with their process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers.mfdkit import Runner, sha256, write_random


def test_channel_records_are_merged_once_with_their_channel(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 2 << 20)
    dest = tmp_path / "dest"
    send_log, recv_log = tmp_path / "send.log", tmp_path / "recv.log"
    m = runner.migrate(
        src, dest,
        send_args=("--channels", "3", "--log-level", "debug", "--log-file", str(send_log)),
        recv_args=("--log-level", "debug", "--log-file", str(recv_log)),
    )
    assert m.wait() == (0, 0)
    assert sha256(src) == sha256(dest)
    for path, side, what in ((send_log, "send", "connected to"), (recv_log, "recv", "receiving on")):
        lines = path.read_text().splitlines()
        tagged = [ln for ln in lines if what in ln]
        # Exactly one record per channel: none lost, none written twice.
        channels = sorted(re.search(rf" ({side}-ch\d) ", ln).group(1) for ln in tagged)  # type: ignore[union-attr]
        assert channels == [f"{side}-ch0", f"{side}-ch1", f"{side}-ch2"], lines
        # Main's own records are there too, and nothing went to stdout.
        assert any("MainProcess" in ln for ln in lines)
    assert all(e["event"] for e in m.send.events)  # stdout carried only JSON events


SIGNAL_INSIDE_A_LOG_CALL = """
import logging, os, signal
from multifd_cli import cli
from multifd_cli.proc import logsetup
from multifd_cli.errors import Interrupted

cli.setup_session(False, "info", None)
logsetup.install_for_channels()
queue = logging.getLogger("multifd").handlers[0].queue


class SignalWithLockHeld:
    # Stands in for the queue's condition: SIGINT arrives just after its lock is taken.
    def __init__(self, cond):
        self.cond = cond

    def __enter__(self):
        self.cond.__enter__()
        os.kill(os.getpid(), signal.SIGINT)
        return self

    def __exit__(self, *exc):
        return self.cond.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.cond, name)


real = queue._notempty
queue._notempty = SignalWithLockHeld(real)
try:
    logging.getLogger("multifd").info("a record")
except Interrupted as e:
    print("raised after the log call:", e)
queue._notempty = real
logsetup.shutdown()
print("shut down")
"""


def test_a_signal_inside_a_log_call_is_raised_after_it() -> None:
    """main's handlers raise; raised with the log queue's lock held, the exception
    left it taken and the shutdown that followed hung (seen: recv ignoring SIGINT)."""
    out = subprocess.run([sys.executable, "-c", SIGNAL_INSIDE_A_LOG_CALL], capture_output=True,
                         text=True, timeout=20)
    assert out.stdout.splitlines() == [
        "raised after the log call: interrupted by SIGINT", "shut down"], out.stderr



def test_the_default_level_is_info_in_a_log_file_or_a_pipe(tmp_path: Path) -> None:
    """warning is the default only for records that share a terminal with the bar
    (tests/test_progress_tty.py checks the terminal)."""
    code = (
        "import logging, sys\n"
        "from multifd_cli.proc import logsetup\n"
        "logsetup.configure(None, sys.argv[1])\n"
        "print(logging.getLogger('multifd').level, logsetup.default_level(None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "log")],
                         capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split() == [str(20), "info"], out  # stderr is a pipe here
