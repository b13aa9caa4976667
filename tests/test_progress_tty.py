"""What a person sees on a terminal: the progress bar, log lines, the summary's units.

The bar is checked under a real pseudo-terminal (pexpect), and what reaches the
screen is replayed through a small terminal model, so a log record glued to the
end of a progress line shows up exactly as a user would see it.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.mfdkit import MULTIFD, Runner, Writer, sha256, write_random

from multifd_cli.events import Stats, human_summary


def test_the_summary_gives_throughput_in_the_progress_units() -> None:
    """MiB/s, as on the progress display; JSON keeps QEMU's megabits (mbps)."""
    stats = Stats(transferred_bytes=300 << 20, started=0.0, finished=2.0)
    summary = stats.summary()
    assert summary["mbps"] == round((300 << 20) * 8 / 2 / 1e6, 2)
    text = human_summary("send", "completed", summary)
    assert "throughput: 150.0 MiB/s" in text, text
    assert "mbps" not in text, text


# -- a terminal, as a person has one ------------------------------------------------------------

pexpect = pytest.importorskip("pexpect")

MiB = 1 << 20
COLS = 200
LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d \S+ (DEBUG|INFO|WARNING|ERROR) ")
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(raw: str) -> list[str]:
    """Replay terminal output the way a terminal shows it: what is left on screen,
    line by line (wide enough that nothing wraps)."""
    lines = [""]
    row = col = 0
    i = 0
    while i < len(raw):
        c = raw[i]
        m = CSI.match(raw, i) if c == "\x1b" else None
        if m:
            arg, op = m.group(1), m.group(2)
            if op == "A":  # cursor up
                row = max(0, row - int(arg or 1))
            elif op == "K":  # erase in line: 2 = all of it, else from the cursor on
                lines[row] = "" if arg == "2" else lines[row][:col]
            i = m.end()
            continue
        if c == "\r":
            col = 0
        elif c == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append("")
        elif c >= " ":
            line = lines[row].ljust(col)
            lines[row] = line[:col] + c + line[col + 1:]
            col += 1
        i += 1
    return lines


def frames(raw: str, side: str) -> list[str]:
    """Every frame of `side`'s bar that was drawn, escapes removed."""
    text = CSI.sub("", raw)
    return [f for f in re.split(r"[\r\n]+", text) if f.startswith(f"{side} ") and "━" in f]


def spawn_tty(args: list[str], cwd: Path) -> Any:
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(COLS), "LINES": "50"}
    env.pop("NO_COLOR", None)
    return pexpect.spawn(MULTIFD[0], [*MULTIFD[1:], *args], cwd=str(cwd), env=env,
                         dimensions=(50, COLS), encoding="utf-8", codec_errors="replace",
                         timeout=60)


def run_tty(args: list[str], cwd: Path) -> tuple[str, int, float]:
    """Run multifd in a pseudo-terminal to its end: all it printed, its exit status
    and how long it ran."""
    t0 = time.monotonic()
    child = spawn_tty(args, cwd)
    child.expect(pexpect.EOF)
    child.close()
    return child.before, child.exitstatus, time.monotonic() - t0


def recv_piped(runner: Runner, dest: Path) -> tuple[Any, str]:
    return runner.recv(dest, "--timeout", "20")


def slow_live_send(runner: Runner, writers: Any, tmp_path: Path,
                   *extra: str) -> tuple[str, int, float, Any, Path, Path]:
    """A live migration whose send runs on a terminal: pass 1 takes ~1.5 s
    (--max-bandwidth), and an unreachable --downtime-limit keeps passes 2-5 going
    until --max-passes switches over (with a warning)."""
    src = write_random(tmp_path / "src", 48 * MiB)
    dest = tmp_path / "dest"
    w: Writer = writers(src, rate="16M", hot="16M")
    r, uri = recv_piped(runner, dest)
    out, status, secs = run_tty(
        ["send", str(src), "--to", uri, "--timeout", "20", "--max-bandwidth", "32M",
         "--pause-pid", str(w.pid), "--downtime-limit", "1", "--max-passes", "5", *extra],
        tmp_path)
    assert r.wait(60) == 0, r.read_stderr()
    return out, status, secs, r, src, dest


def test_send_draws_a_bar_on_a_terminal(runner: Runner, writers: Any, tmp_path: Path) -> None:
    out, status, secs, r, src, dest = slow_live_send(runner, writers, tmp_path)
    assert status == 0, out
    assert sha256(src) == sha256(dest)
    drawn = frames(out, "send")
    assert drawn, out
    # Each piece the bar promises: the pass, a bar and a percentage, bytes and rate,
    # the ETA of pass 1, and from pass 3 on the dirty bytes and the expected downtime.
    assert any(re.search(r"^send pass 1 [━╸╺ ]+ +\d+% [\d.]+ MiB +[\d.]+ MiB/s +ETA \d+:\d\d", f)
               for f in drawn), drawn
    later = [f for f in drawn if re.match(r"send pass [3-5]", f)]
    assert any(re.search(r"dirty [\d.]+ [KM]iB +downtime ~\d+ ms", f) for f in later), drawn
    # No more than ~10 frames a second (rich is never asked for more; a margin for
    # the frames that pass and log lines redraw).
    assert len(drawn) <= 12 * secs + 10, (len(drawn), secs)
    # One line per pass stays above the bar; the bar itself is taken down at the end.
    shown = screen(out)
    passes = [ln for ln in shown if re.match(r"send: pass \d+: ", ln)]
    assert [int(ln.split()[2].rstrip(":")) for ln in passes] == [1, 2, 3, 4, 5, 6], shown
    assert not any("━" in ln for ln in shown), shown
    # The summary speaks the bar's units.
    assert any(re.search(r"throughput: [\d.]+ MiB/s", ln) for ln in shown), shown


def test_recv_draws_its_bar_when_it_owns_the_terminal(runner: Runner, short_dir: Path,
                                                      tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 32 * MiB)
    dest = tmp_path / "dest"
    sock = short_dir / "s"
    child = spawn_tty(["recv", "--listen", f"unix:{sock}", "--timeout", "20", str(dest)],
                      tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "recv did not listen"
            time.sleep(0.02)
        s = runner.send(src, f"unix:{sock}", "--max-bandwidth", "32M")
        assert s.wait(60) == 0, s.read_stderr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    drawn = frames(child.before, "recv")
    assert any(re.search(r"^recv pass 1 [━╸╺ ]+ +\d+% [\d.]+ MiB +[\d.]+ MiB/s", f)
               for f in drawn), child.before
    assert any(re.match(r"recv: pass 1: \d+ pages applied", ln) for ln in screen(child.before))
    # The terminal's default level is the same on both sides: no info ("listening on ...").
    assert " INFO " not in child.before, child.before


def test_piped_progress_is_a_plain_line_per_pass(runner: Runner, writers: Any,
                                                 tmp_path: Path) -> None:
    """--progress on a pipe: no bar and no escapes, one line per pass event."""
    src = write_random(tmp_path / "src", 16 * MiB)
    dest = tmp_path / "dest"
    w: Writer = writers(src, rate="8M", hot="8M")
    m = runner.migrate(src, dest, send_args=("--pause-pid", str(w.pid), "--progress"),
                       recv_args=("--progress",))
    assert m.wait() == (0, 0), (m.send.stderr, m.recv.stderr)
    for proc, side in ((m.send, "send"), (m.recv, "recv")):
        assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{side}: pass ")]
        numbers = [int(ln.split()[2].rstrip(":")) for ln in lines]
        assert numbers == [e["pass"] for e in proc.of("pass")], proc.stderr
    sent = {e["pass"]: e for e in m.send.of("pass")}
    first = next(ln for ln in m.send.stderr.splitlines() if ln.startswith("send: pass 1:"))
    assert f"{sent[1]['dirty_bytes'] / MiB:.1f} MiB dirty" in first, first
    assert "switchover: writer paused for pass" in m.send.stderr


def test_without_a_terminal_there_is_no_progress_by_default(runner: Runner,
                                                            tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 4 * MiB)
    m = runner.migrate(src, tmp_path / "dest")
    assert m.wait() == (0, 0)
    assert not any(ln.startswith("send: pass") for ln in m.send.stderr.splitlines())
    assert "\r" not in m.send.stderr and "━" not in m.send.stderr


# -- log records next to the bar ----------------------------------------------------------------


def test_log_records_start_on_a_clean_line(runner: Runner, writers: Any, tmp_path: Path) -> None:
    """Seen before: '..., ETA 0 s20:47:59 MainProcess INFO pass 1 ...' on one line."""
    out, status, _, _, _, _ = slow_live_send(runner, writers, tmp_path, "--log-level", "info")
    assert status == 0, out
    shown = screen(out)
    records = [ln for ln in shown if LOG_RECORD.search(ln)]
    assert any(" INFO pass 1: " in ln for ln in records), shown
    glued = [ln for ln in records if not LOG_RECORD.match(ln)]
    assert not glued, glued
    assert frames(out, "send"), out  # the bar was there to collide with


def test_a_terminal_shows_warnings_but_not_info_by_default(runner: Runner, writers: Any,
                                                           tmp_path: Path) -> None:
    out, status, _, _, _, _ = slow_live_send(runner, writers, tmp_path)
    assert status == 0, out
    shown = screen(out)
    assert not [ln for ln in shown if " INFO " in ln], shown
    warning = [ln for ln in shown if " WARNING reached --max-passes 5" in ln]
    assert len(warning) == 1 and LOG_RECORD.match(warning[0]), shown


def test_without_a_terminal_the_log_keeps_info(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 4 * MiB)
    m = runner.migrate(src, tmp_path / "dest")
    assert m.wait() == (0, 0)
    for proc in (m.send, m.recv):
        assert " INFO " in proc.stderr, proc.stderr


@pytest.mark.parametrize("foreground", ["send", "recv"])
def test_only_the_foreground_side_draws_on_a_shared_terminal(foreground: str, short_dir: Path,
                                                             tmp_path: Path) -> None:
    """Both sides started from one shell on one terminal (job control on, as in an
    interactive shell): the background job draws nothing, the foreground one its bar."""
    src = write_random(tmp_path / "src", 32 * MiB)
    sock = short_dir / "s"
    mfd = shlex.join(MULTIFD)
    recv = f"{mfd} recv --listen unix:{sock} --timeout 20 {shlex.quote(str(tmp_path / 'dest'))}"
    wait = f"until [ -S {sock} ]; do sleep 0.02; done"
    send = f"{mfd} send {shlex.quote(str(src))} --to unix:{sock} --max-bandwidth 32M"
    if foreground == "send":
        script = f"set -m; {recv} & {wait}; {send}; s=$?; wait $!; echo exits $s $?"
    else:
        script = f"set -m; ({wait}; exec {send}) & {recv}; r=$?; wait $!; echo exits $? $r"
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(COLS)}
    child = pexpect.spawn("bash", ["-c", script], env=env, dimensions=(50, COLS),
                          encoding="utf-8", codec_errors="replace", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert "exits 0 0" in out, out
    background = "recv" if foreground == "send" else "send"
    assert frames(out, foreground), out
    assert not frames(out, background), out
    assert not any(ln.startswith(f"{background}: pass") for ln in screen(out)), out
