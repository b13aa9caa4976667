"""The shell scripts in examples/ run as they are, for real, on localhost.

`multifd` must resolve from PATH, so PATH starts with the directory of this
interpreter (.venv/bin). Each script runs with its own TMPDIR, which must be
empty again when it exits (the scripts clean up), and no process it started may
outlive it. Exit status 77 means "skipped" (block-device.sh without loop
devices) and becomes pytest.skip with the script's message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers.mfdkit import write_mixed, write_random

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.sh"))
BIN = Path(sys.executable).parent
MiB = 1 << 20
SKIPPED = 77
Run = Callable[..., "subprocess.CompletedProcess[str]"]


def script_env(tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFD")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmpdir)
    env.pop("PYTHON", None)
    env.update(extra)
    return env


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture
def run_script(tmp_path: Path) -> Iterator[Run]:
    tmpdir = tmp_path / "scripttmp"
    tmpdir.mkdir()

    def run(name: str, *args: object, timeout: float = 90, cwd: Path | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["bash", str(EXAMPLES / name), *map(str, args)],
                             capture_output=True, text=True, timeout=timeout,
                             env=script_env(tmpdir, **env), cwd=cwd or tmp_path,
                             stdin=subprocess.DEVNULL)
        # multifd recv keeps its lock files in $TMPDIR/multifd-locks-UID by design.
        left = [n for n in os.listdir(tmpdir) if not n.startswith("multifd-locks-")]
        assert left == [], f"{name} left temp files: {left}"
        assert not processes_mentioning(str(tmpdir)), processes_mentioning(str(tmpdir))
        return res

    yield run


def show(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


# -- static checks ------------------------------------------------------------------------------


def test_the_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"migrate-file.sh", "live-migrate.sh", "retry-on-failure.sh",
            "block-device.sh", "live-directory.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_strict_mode(script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "${MULTIFD:-multifd}" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed")
    res = subprocess.run([sc, "-x", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


# -- migrate-file.sh --------------------------------------------------------------------------------


def test_migrate_file(run_script: Run, tmp_path: Path) -> None:
    src = write_mixed(tmp_path / "src", 8 * MiB + 5, seed=1)
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    res = run_script("migrate-file.sh", src, dest, "--compress", "lz4")
    assert res.returncode == 0, show(res)
    assert dest.read_bytes() == src.read_bytes()
    assert "recv listening on tcp:127.0.0.1:" in res.stdout
    assert "compression lz4:0" in res.stdout and "identical" in res.stdout, res.stdout


def test_migrate_file_with_multifd_as_several_words(run_script: Run, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", MiB, seed=2)
    res = run_script("migrate-file.sh", src, tmp_path / "dest",
                     MULTIFD=f"{sys.executable} -m multifd_cli")
    assert res.returncode == 0, show(res)
    assert (tmp_path / "dest").read_bytes() == src.read_bytes()


def test_migrate_file_reports_a_failure_and_its_exit_code(run_script: Run,
                                                          tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", MiB, seed=3)
    t0 = time.monotonic()
    res = run_script("migrate-file.sh", src, tmp_path / "dest", "--channels", "0",
                     MULTIFD_TIMEOUT="2")
    assert res.returncode == 2, show(res)
    assert "migration failed: send exit 2" in res.stderr and "--channels" in res.stderr, show(res)
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "dest").exists()


# -- live-migrate.sh --------------------------------------------------------------------------------


def test_live_migrate(run_script: Run) -> None:
    res = run_script("live-migrate.sh")
    assert res.returncode == 0, show(res)
    assert "<- final pass, writer paused" in res.stdout, res.stdout
    assert "paused: True" in res.stdout
    assert "verify: source (writer paused) and copy are identical" in res.stdout
    assert "old writer continued and stopped" in res.stdout


# -- live-directory.sh ------------------------------------------------------------------------------


def test_live_directory(run_script: Run) -> None:
    """A live SQLite directory: the copy equals the paused source file by file, and after a
    crash at the pause both recover to the same rows."""
    res = run_script("live-directory.sh", timeout=180)
    if res.returncode == SKIPPED:
        pytest.skip(res.stdout.strip() or "live-directory.sh skipped")
    assert res.returncode == 0, show(res)
    out = res.stdout
    assert "<- final pass, application paused" in out, out
    assert "paused: True" in out, out
    assert "verify: the paused directory and the copy are identical, file by file" in out, out
    assert "recovered: source and copy pass integrity_check and agree:" in out, out


# -- retry-on-failure.sh ------------------------------------------------------------------------------


def test_retry_after_connection_failure(run_script: Run) -> None:
    """The demo: send starts before recv listens on the fixed port (RECV_DELAY, 3 s by
    default; 4 s here for margin on a busy machine); attempt 1 fails with exit 3 after
    its 2 s --timeout, and a retry succeeds."""
    res = run_script("retry-on-failure.sh", RECV_DELAY="4")
    assert res.returncode == 0, show(res)
    out = res.stdout
    assert "attempt 1: exit 3: cannot connect to tcp:127.0.0.1:" in out, out
    assert "connection failure: retrying in 1 s" in out
    assert "attempt 2:" in out and "completed:" in out and "verify:" in out, out


def test_retry_falls_back_after_exit_9(tmp_path: Path) -> None:
    """A writer without a pause mechanism and --max-passes 2: attempt 1 does not converge
    (exit 9) and the script retries with --max-passes 8. The test stops the writer as soon
    as the script announces the retry, so the retry converges."""
    src = write_random(tmp_path / "src", 16 * MiB, seed=4)
    tmpdir = tmp_path / "scripttmp"
    tmpdir.mkdir()
    before = src.stat().st_mtime_ns
    writer = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "writer.py"), str(src), "--rate", "16M",
         "--hot-set", "8M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        while src.stat().st_mtime_ns == before:
            time.sleep(0.01)
        proc = subprocess.Popen(
            ["bash", str(EXAMPLES / "retry-on-failure.sh"), str(src), str(tmp_path / "dest"),
             "--max-passes", "2", "--no-mtime-shortcut"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=script_env(tmpdir), cwd=tmp_path)
        watchdog = threading.Timer(90, proc.kill)
        watchdog.start()
        out = ""
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            out += line
            if "did not converge" in line and writer.poll() is None:
                writer.kill()
                writer.wait(10)
        err = proc.stderr.read()
        code = proc.wait(10)
        watchdog.cancel()
    finally:
        for p in (writer, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "attempt 1: exit 9: still changing after 2 passes" in out, out
    assert "did not converge: retrying in 1 s with --max-passes 8" in out, out
    assert "attempt 2:" in out and "completed:" in out, out
    assert (tmp_path / "dest").read_bytes() == src.read_bytes()
    assert [n for n in os.listdir(tmpdir) if not n.startswith("multifd-locks-")] == []


def test_retry_gives_up_on_other_exit_codes(run_script: Run, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", MiB, seed=5)
    res = run_script("retry-on-failure.sh", src, tmp_path / "dest",
                     "--pause-cmd", "false", "--resume-cmd", "true")
    assert res.returncode == 8, show(res)
    assert "attempt 1: exit 8: pause command 'false' exited with status 1" in res.stdout, show(res)
    assert "not worth a retry" in res.stderr
    assert "attempt 2" not in res.stdout


# -- block-device.sh ----------------------------------------------------------------------------------


def test_block_device(run_script: Run) -> None:
    res = run_script("block-device.sh")
    if res.returncode == SKIPPED:
        pytest.skip(res.stdout.strip() or "block-device.sh skipped")
    assert res.returncode == 0, show(res)
    out = res.stdout
    assert "(a regular file)" in out and "(a block device, recv --force)" in out, out
    assert out.count("identical") == 2, out
    assert "2560 zero pages described" in out, out  # the 10 MiB run of zeros


@pytest.mark.parametrize("losetup", ["false", "no-such-losetup-command"])
def test_block_device_skip_is_visible(run_script: Run, losetup: str) -> None:
    res = run_script("block-device.sh", LOSETUP=losetup)
    assert res.returncode == SKIPPED, show(res)
    assert res.stdout.startswith("skipped: "), res.stdout
