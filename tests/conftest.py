"""Fixtures only; what they are built from lives in helpers/mfdkit.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers.mfdkit import Kit, Runner, Writer, release


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MULTIFD_* settings from the developer's shell leak into a test."""
    for k in list(os.environ):
        if k.startswith("MULTIFD_"):
            monkeypatch.delenv(k)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path)
    yield r
    r.cleanup()


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    k = Kit(tmp_path)
    yield k
    k.cleanup()


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
