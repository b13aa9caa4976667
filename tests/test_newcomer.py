"""What a first-time user trips on (issue 14's defects), each with real processes.

Every test here failed on the code before its fix; the closing note of the
session that added them shows that run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers.mfdkit import Runner, free_port, kill_group, spawn, write_random

from multifd_cli import wire as P

MULTIFD = [sys.executable, "-m", "multifd_cli"]
MiB = 1 << 20


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MULTIFD, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("multifd: error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


# -- 1. a bad session start must not kill recv ---------------------------------------------

def _hello_then(uri: str, after: bytes) -> bytes:
    """Say a valid HELLO as a main connection, then `after`; return what recv answered."""
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(P.encode_hello(P.ROLE_MAIN, uuid.uuid4().bytes))
        s.settimeout(5)
        got = b""
        try:
            got += s.recv(4096)  # WELCOME
            s.sendall(after)
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


def _corrupt_crc(msg: bytes) -> bytes:
    b = bytearray(msg)
    b[P.HEADER_CRC_SPAN] ^= 0xFF  # the header CRC's first byte
    return bytes(b)


def _config(channels: int = 2, compression: int = 0) -> P.Config:
    return P.Config(channels=channels, compression=compression, level=0,
                    page_size=4096, packet_size=512 * 1024)


@pytest.mark.parametrize("bad", ["config-crc", "layout-crc"])
def test_a_bad_session_start_is_dropped_and_recv_keeps_listening(
        runner: Runner, tmp_path: Path, bad: str) -> None:
    src = write_random(tmp_path / "src", 2 * MiB)
    dest = tmp_path / "dest"
    recv, uri = runner.recv(dest)
    cfg, layout = P.encode_config(_config()), P.encode_layout(
        P.Layout((P.BlockInfo("src", 2 * MiB, 2 * MiB),)))
    after = _corrupt_crc(cfg) + layout if bad == "config-crc" else cfg + _corrupt_crc(layout)
    _hello_then(uri, after)
    time.sleep(0.3)
    assert recv.popen.poll() is None, f"recv died: {recv.read_stderr()}"
    send = runner.send(src, uri)
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert dest.read_bytes() == src.read_bytes()
    warnings = [ln for ln in recv.stderr.splitlines() if "WARNING" in ln and "session" in ln]
    assert len(warnings) == 1, recv.stderr


@pytest.mark.parametrize("refused", ["too-many-channels", "unknown-codec"])
def test_a_refused_config_gets_an_abort_with_the_reason_and_recv_keeps_listening(
        runner: Runner, tmp_path: Path, refused: str) -> None:
    src = write_random(tmp_path / "src", 2 * MiB)
    dest = tmp_path / "dest"
    recv, uri = runner.recv(dest)
    config = _config(channels=P.MAX_CHANNELS + 1) if refused == "too-many-channels" \
        else _config(compression=99)
    answer = _hello_then(uri, P.encode_config(config) + P.encode_layout(
        P.Layout((P.BlockInfo("src", 2 * MiB, 2 * MiB),))))
    dec = P.Decoder()
    dec.feed(answer)
    msgs = []
    while (m := dec.next_message()) is not None:
        msgs.append(m)
    aborts = [m for m in msgs if isinstance(m, P.Abort)]
    assert aborts, f"no ABORT in {msgs}"
    assert ("channel" in aborts[0].message) if refused == "too-many-channels" else \
        ("compression" in aborts[0].message or "codec" in aborts[0].message), aborts[0]
    assert recv.popen.poll() is None, f"recv died: {recv.read_stderr()}"
    send = runner.send(src, uri)
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert not (tmp_path / "dest.partial").exists()


# -- 2. connection refused fails fast; --wait-for-recv waits and says so ------------------

@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_nobody_listening_fails_fast(tmp_path: Path, kind: str) -> None:
    src = write_random(tmp_path / "src", MiB)
    to = f"tcp:127.0.0.1:{free_port()}" if kind == "tcp" else f"unix:{tmp_path}/none.sock"
    t0 = time.monotonic()
    done = _run(["send", str(src), "--to", to])
    took = time.monotonic() - t0
    assert done.returncode == 3, done.stderr
    line = _one_error_line(done.stderr)
    assert "--wait-for-recv" in line, line  # says how to wait instead
    assert took < 10, f"took {took:.1f} s with nobody listening (--timeout is 60 s)"


def test_wait_for_recv_says_what_it_waits_for_and_gives_up(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", MiB)
    port = free_port()
    p = subprocess.Popen([*MULTIFD, "send", str(src), "--to", f"tcp:127.0.0.1:{port}",
                          "--wait-for-recv", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert p.stderr is not None
    t0 = time.monotonic()
    seen = ""
    while "waiting" not in (line := p.stderr.readline()).lower() and line:
        seen += line
    said_after = time.monotonic() - t0
    rest = p.communicate(timeout=30)[1]
    took = time.monotonic() - t0
    assert "waiting" in line.lower(), seen + rest
    assert f"127.0.0.1:{port}" in line and "3 s" in line, line
    assert said_after < 1.5, f"said nothing for {said_after:.1f} s"
    assert p.returncode == 3, rest
    assert 2.5 < took < 15, took
    _one_error_line(seen + line + rest)


def test_wait_for_recv_connects_once_recv_starts(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 4 * MiB)
    dest = tmp_path / "dest"
    port = free_port()
    send = spawn(["send", "--json", str(src), "--to", f"tcp:127.0.0.1:{port}",
                  "--wait-for-recv", "20"])
    time.sleep(1.5)
    recv = spawn(["recv", "--json", "--listen", f"tcp:127.0.0.1:{port}", str(dest)])
    try:
        assert send.wait(60) == 0, send.stderr
        assert recv.wait(60) == 0, recv.stderr
    finally:
        for p in (send, recv):
            if p.popen.poll() is None:
                kill_group(p.popen)
    assert dest.read_bytes() == src.read_bytes()


# -- 3. no pause, no downtime ---------------------------------------------------------------

def test_a_copy_that_paused_nothing_reports_no_downtime(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 4 * MiB)
    m = runner.migrate(src, tmp_path / "dest")
    assert m.wait() == (0, 0), m.send.stderr
    done = m.send.of("completed")[0]
    assert done["downtime_ms"] is None, done
    assert done["paused"] is False
    # The human summary says so too.
    recv = spawn(["recv", "--listen", "tcp:127.0.0.1:0", "--json", str(tmp_path / "dest2")])
    uri = recv.next_event()["uri"]
    plain = _run(["send", str(src), "--to", uri, "--no-progress"])
    recv.wait()
    assert plain.returncode == 0, plain.stderr
    assert "not paused" in plain.stderr, plain.stderr
    assert "downtime: " not in plain.stderr.replace("downtime: none", ""), plain.stderr


# -- 6. a killed send --to file: leaves nothing behind for long ------------------------------

# --max-bandwidth does not slow a file: send; a slow pause command holds it open.
_SLOW_SWITCHOVER = ("--pause-cmd", "sleep 4", "--resume-cmd", "true")


def _hidden(d: Path, name: str) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(f".{name}.multifd-")]


def test_the_next_send_to_an_image_removes_what_a_killed_send_left(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 32 * MiB)
    img = tmp_path / "disk.mfd"
    p = spawn(["send", "--json", str(src), "--to", f"file:{img}", *_SLOW_SWITCHOVER])
    deadline = time.monotonic() + 20
    while not _hidden(tmp_path, "disk.mfd") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _hidden(tmp_path, "disk.mfd"), "send never created its hidden image"
    os.killpg(p.popen.pid, signal.SIGKILL)
    p.popen.wait()
    assert _hidden(tmp_path, "disk.mfd")
    small = write_random(tmp_path / "small", MiB)
    done = _run(["send", str(small), "--to", f"file:{img}"])
    assert done.returncode == 0, done.stderr
    assert _hidden(tmp_path, "disk.mfd") == []
    assert img.exists()


def test_cleanup_never_removes_the_image_of_a_running_send(tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 32 * MiB)
    img = tmp_path / "disk.mfd"
    first = spawn(["send", "--json", str(src), "--to", f"file:{img}", *_SLOW_SWITCHOVER])
    try:
        deadline = time.monotonic() + 20
        while not _hidden(tmp_path, "disk.mfd") and time.monotonic() < deadline:
            time.sleep(0.05)
        running = _hidden(tmp_path, "disk.mfd")
        assert running
        second = _run(["send", str(write_random(tmp_path / "small", MiB)), "--to", f"file:{img}"])
        assert second.returncode != 0, "a second send into an image in use must be refused"
        line = _one_error_line(second.stderr)
        assert "in use" in line or "another" in line, line
        assert set(running) <= set(_hidden(tmp_path, "disk.mfd"))
        assert first.wait(60) == 0, first.stderr
    finally:
        if first.popen.poll() is None:
            kill_group(first.popen)


# -- 7. a channel killed from outside --------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def _channel_pids(pid: int, name: str) -> list[int]:
    out = []
    for kid in _children(pid):
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"multifd" in cmd:
            out.append(kid)
    return out


@pytest.mark.parametrize("side", ["send", "recv"])
def test_a_channel_killed_from_outside_is_reported_as_such(
        runner: Runner, tmp_path: Path, side: str) -> None:
    src = write_random(tmp_path / "src", 32 * MiB)
    m = runner.migrate(src, tmp_path / "dest", send_args=("--max-bandwidth", "4M"))
    victim_of = m.send if side == "send" else m.recv
    deadline = time.monotonic() + 20
    kids: list[int] = []
    while len(kids) < 2 and time.monotonic() < deadline:
        kids = _channel_pids(victim_of.popen.pid, side)
        time.sleep(0.05)
    assert len(kids) >= 2, kids
    time.sleep(0.5)
    os.kill(kids[0], signal.SIGKILL)
    s, r = m.wait(60)
    mine = s if side == "send" else r
    proc = m.send if side == "send" else m.recv
    assert mine == 10, (s, r, proc.stderr)
    failed = proc.of("failed")[0]
    assert failed["exit_code"] == 10
    assert "channel" in failed["error"] and "SIGKILL" in failed["error"], failed
    other = r if side == "send" else s
    assert other == 10, "the peer reports the code the failing side sent"
    assert not (tmp_path / "dest").exists()


def test_exit_code_10_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| 10 |" in readme
    assert json.dumps(10)  # keeps the import used when the table changes
