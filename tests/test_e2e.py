"""End to end: real `multifd recv` and `multifd send` processes, real files.

Every successful migration is checked the same way (`assert_migrated`): both
exit 0, sha256(source) == sha256(DEST), and the two completed events agree with
each other and with the options. The default set (`-m "not slow"`) covers the
option matrix pairwise; the full cartesian product is marked slow.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.mfdkit import (
    MULTIFD,
    Migration,
    Proc,
    Runner,
    sha256,
    spawn,
    write_mixed,
    write_random,
)

KiB = 1 << 10
MiB = 1 << 20
HELPERS = Path(__file__).parent / "helpers"

METHODS = ["none", "zlib", "lz4", "zstd"]
CHANNELS = [1, 2, 4, 8]
TRANSPORTS = ["tcp", "unix"]
SIZES = {"odd": 3 * MiB + 1234, "1mib": MiB}


# -- helpers ---------------------------------------------------------------------------------


def listen_uri(transport: str, short_dir: Path) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{short_dir / 'm.sock'}"


def hook(script: str, *args: object) -> str:
    """A MULTIFD_TEST_BETWEEN_PASSES command running one of tests/helpers."""
    return shlex.join([sys.executable, str(HELPERS / script), *map(str, args)])


def compression_names(option: str) -> set[str]:
    """The ways a completed event may spell --compress OPTION."""
    from multifd_cli.compression import parse_spec

    spec = parse_spec(option)
    if spec.name == "none":
        return {"none"}
    return {option, str(spec), f"{spec.name}:{spec.effective_level}"}


def pages_of(size: int, page_size: int) -> int:
    return -(-size // page_size)


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def describe(m: Migration) -> str:
    return (
        f"send events={m.send.events} stderr={m.send.read_stderr()!r}\n"
        f"recv events={m.recv.events} stderr={m.recv.read_stderr()!r}"
    )


def assert_migrated(
    m: Migration,
    source: Path,
    dest: Path,
    *,
    channels: int = 2,
    compression: str = "none",
    page_size: int = 4096,
    timeout: float = 120.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait for both sides; check exit codes, content and the completed counters."""
    s, r = m.wait(timeout)
    assert (s, r) == (0, 0), describe(m)
    assert dest.exists()
    assert sha256(source) == sha256(dest)
    size = source.stat().st_size
    pages = pages_of(size, page_size)
    done: list[dict[str, Any]] = []
    for p in (m.send, m.recv):
        c = p.last()
        assert c["event"] == "completed" and c["status"] == "completed", describe(m)
        assert c["passes"] >= 1
        assert c["channels"] == channels
        assert c["normal_pages"] + c["zero_pages"] >= pages
        passes = p.of("pass")
        assert [e["pass"] for e in passes] == list(range(1, c["passes"] + 1)), passes
        assert passes[0]["normal_pages"] + passes[0]["zero_pages"] >= pages, passes[0]
        assert sum(e["normal_pages"] for e in passes) == c["normal_pages"]
        assert sum(e["zero_pages"] for e in passes) == c["zero_pages"]
        if size:
            assert c["transferred_bytes"] > 0
        assert c["digest"]
        done.append(c)
    sc, rc = done
    # Both sides echo --compress: as given, or normalized to METHOD:EFFECTIVE_LEVEL.
    assert sc["compression"] in compression_names(compression), sc
    assert rc["compression"] == sc["compression"], (sc, rc)
    assert sc["digest"] == rc["digest"]
    for k in ("passes", "normal_pages", "zero_pages", "transferred_bytes"):
        assert sc[k] == rc[k], (k, sc, rc)
    # A completed migration leaves nothing but DEST behind it.
    assert not [n for n in os.listdir(dest.parent) if ".multifd-" in n or n.endswith(".partial")]
    return sc, rc


def wait_for_event(p: Proc, name: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ev = p.next_event(max(0.1, deadline - time.monotonic()))
        if ev["event"] == name:
            return ev
        assert ev["event"] not in ("completed", "failed"), ev


def kill_group(p: Proc) -> None:
    os.killpg(p.popen.pid, signal.SIGKILL)
    p.popen.wait(10)


# -- 1. the option matrix ----------------------------------------------------------------------


def _pairwise() -> list[tuple[str, int, str, str]]:
    """16 rows: every method x channels pair once (4 x 4 needs at least 16), with
    transport and size chosen so every other pair of factors is covered too.
    Three rows carry an explicit level."""
    levels = {("zstd", 2): "zstd:3", ("zlib", 4): "zlib:9", ("lz4", 8): "lz4:9"}
    sizes = list(SIZES)
    rows = []
    for i, method in enumerate(METHODS):
        for j, ch in enumerate(CHANNELS):
            rows.append(
                (levels.get((method, ch), method), ch, TRANSPORTS[(i + j) % 2], sizes[(i + j // 2) % 2])
            )
    return rows


PAIRWISE = _pairwise()


def _check_pairwise_cover() -> None:
    factors = list(zip(*[(m.split(":")[0], c, t, s) for m, c, t, s in PAIRWISE]))
    values: list[list[Any]] = [METHODS, CHANNELS, TRANSPORTS, list(SIZES)]
    for a, b in itertools.combinations(range(4), 2):
        got = set(zip(factors[a], factors[b]))
        assert got == set(itertools.product(values[a], values[b])), (a, b)


_check_pairwise_cover()

FULL = [
    (m, c, t, s)
    for m, c, t, s in itertools.product(METHODS, CHANNELS, TRANSPORTS, SIZES)
    if (m, c, t, s) not in PAIRWISE
]


def _matrix_case(runner: Runner, tmp_path: Path, short_dir: Path, method: str, channels: int,
                 transport: str, size_name: str) -> None:
    src = write_mixed(tmp_path / "src", SIZES[size_name], seed=channels)
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest, ("--channels", str(channels), "--compress", method),
                       listen=listen_uri(transport, short_dir))
    sc, _ = assert_migrated(m, src, dest, channels=channels, compression=method)
    assert sc["zero_pages"] > 0  # the mixed data has zero pages
    if transport == "unix":
        assert not (short_dir / "m.sock").exists()  # recv removes its socket


@pytest.mark.parametrize(("method", "channels", "transport", "size_name"), PAIRWISE)
def test_matrix_pairwise(runner: Runner, tmp_path: Path, short_dir: Path, method: str,
                         channels: int, transport: str, size_name: str) -> None:
    _matrix_case(runner, tmp_path, short_dir, method, channels, transport, size_name)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "channels", "transport", "size_name"), FULL)
def test_matrix_full(runner: Runner, tmp_path: Path, short_dir: Path, method: str,
                     channels: int, transport: str, size_name: str) -> None:
    _matrix_case(runner, tmp_path, short_dir, method, channels, transport, size_name)


def test_compression_shrinks_compressible_data(runner: Runner, tmp_path: Path) -> None:
    """With mixed data, zstd puts fewer bytes on the wire than none does."""
    src = write_mixed(tmp_path / "src", 2 * MiB)
    wire = {}
    for method in ("none", "zstd"):
        dest = tmp_path / f"dest-{method}"
        m = runner.migrate(src, dest, ("--compress", method))
        sc, _ = assert_migrated(m, src, dest, compression=method)
        wire[method] = sc["transferred_bytes"]
    assert wire["zstd"] < wire["none"] * 0.8, wire


# -- 2., 3. empty and sparse -----------------------------------------------------------------


def test_empty_file(runner: Runner, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"")
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest)
    sc, _ = assert_migrated(m, src, dest)
    assert dest.stat().st_size == 0
    assert sc["normal_pages"] == 0


def test_sparse_file_stays_sparse(runner: Runner, tmp_path: Path) -> None:
    size = 64 * MiB
    src = tmp_path / "src"
    islands = [0, 5 * MiB + 123, 33 * MiB, 48 * MiB + 4096 * 3, size - 1000]
    with open(src, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(islands):
            f.seek(off)
            data = os.urandom(20 * KiB) if i % 2 else b"island" * 3000
            f.write(data[: size - off])
    if src.stat().st_blocks * 512 >= 2 * MiB:
        pytest.skip("the filesystem of tmp_path does not keep files sparse")
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest, ("--compress", "lz4"))
    sc, _ = assert_migrated(m, src, dest, compression="lz4")
    st = dest.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < 2 * MiB, f"DEST allocates {st.st_blocks * 512} bytes"
    assert sc["zero_pages"] > size // 4096 // 2


# -- 4. a page that turns to zero between passes ----------------------------------------------


def test_pages_turn_to_zero_in_pass_2(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src", 2 * MiB + 100, seed=4)
    offset, length = 256 * KiB, 16 * 4096  # 16 whole pages, all sent in pass 1
    dest = tmp_path / "dest"
    marker = tmp_path / "zeroed.marker"
    m = runner.migrate(
        src, dest, ("--no-mtime-shortcut",),
        send_env={"MULTIFD_TEST_BETWEEN_PASSES": hook("zero_once.py", src, marker, offset, length)},
    )
    sc, rc = assert_migrated(m, src, dest)
    assert marker.exists(), "the between-passes hook never ran"
    with open(dest, "rb") as f:
        f.seek(offset)
        assert f.read(length) == bytes(length)
    assert sc["passes"] >= 3  # full pass, the pass that sends the zeros, a clean pass
    for p in (m.send, m.recv):
        first, second = p.of("pass")[:2]
        assert first["zero_pages"] == 0
        assert second["zero_pages"] == 16, second
        assert second["normal_pages"] == 0, second


# -- 5. page and packet sizes -------------------------------------------------------------------


@pytest.mark.parametrize("page_size", ["512", "64K"])
@pytest.mark.parametrize("packet_size", ["128K", "4M"])
def test_page_and_packet_sizes(runner: Runner, tmp_path: Path, page_size: str,
                               packet_size: str) -> None:
    ps = 512 if page_size == "512" else 64 * KiB
    src = write_mixed(tmp_path / "src", 3 * MiB + 1234, seed=5)
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest, ("--page-size", page_size, "--packet-size", packet_size,
                                   "--compress", "zlib"))
    assert_migrated(m, src, dest, compression="zlib", page_size=ps)


# -- 6. the epoch barrier ------------------------------------------------------------------------


def _barrier_run(runner: Runner, tmp_path: Path, *, barrier: bool, seed: int) -> tuple[Migration, Path, Path]:
    src = write_random(tmp_path / f"src{seed}", 32 * MiB, seed=seed)
    dest = tmp_path / f"dest{seed}"
    marker = tmp_path / f"rewritten{seed}.marker"
    recv_env = {"MULTIFD_TEST_DELAY": "0:0.1:1"}
    recv_args: tuple[str, ...] = ()
    if not barrier:
        recv_env["MULTIFD_TEST_NO_BARRIER"] = "1"
        recv_args = ("--keep-partial",)
    m = runner.migrate(
        src, dest, ("--channels", "2"), recv_args,
        send_env={"MULTIFD_TEST_BETWEEN_PASSES": hook("rewrite_once.py", src, marker, seed + 100)},
        recv_env=recv_env,
    )
    return m, src, dest


def test_barrier_keeps_newer_pages(runner: Runner, tmp_path: Path) -> None:
    m, src, dest = _barrier_run(runner, tmp_path, barrier=True, seed=6)
    sc, _ = assert_migrated(m, src, dest)
    assert (tmp_path / "rewritten6.marker").exists()
    assert sc["passes"] >= 3
    assert m.send.of("pass")[1]["normal_pages"] == 32 * MiB // 4096  # all rewritten


def test_without_barrier_stale_pages_fail_verification(runner: Runner, tmp_path: Path) -> None:
    """Negative control: the same run with the barrier switched off lets channel 0's
    stale pass-1 pages land after pass 2's, and verification must catch it.
    (Corrupted 16/16 runs when written, also with both cores busy.)"""
    m, src, dest = _barrier_run(runner, tmp_path, barrier=False, seed=61)
    s, r = m.wait()
    assert (s, r) == (6, 6), describe(m)
    assert (tmp_path / "rewritten61.marker").exists()
    for p in (m.send, m.recv):
        assert p.last()["event"] == "failed" and p.last()["exit_code"] == 6, p.last()
    assert not dest.exists()
    partial = Path(str(dest) + ".partial")
    assert partial.exists()
    assert partial.stat().st_size == src.stat().st_size
    assert sha256(partial) != sha256(src)
    assert not [n for n in listing(tmp_path) if ".multifd-" in n]


# -- 7. failures ----------------------------------------------------------------------------------


def test_existing_dest_without_force_is_refused(runner: Runner, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.write_bytes(b"precious")
    mtime = dest.stat().st_mtime_ns
    t0 = time.monotonic()
    p = spawn(["recv", "--listen", "tcp:127.0.0.1:0", str(dest)])
    runner.procs.append(p)
    assert p.wait(15) == 2
    assert time.monotonic() - t0 < 10
    err = p.stderr.strip()
    assert "\n" not in err and "--force" in err and "Traceback" not in err, err
    assert dest.read_bytes() == b"precious"
    assert dest.stat().st_mtime_ns == mtime
    assert listing(tmp_path) == ["dest"]


def test_force_replaces_dest_atomically(runner: Runner, tmp_path: Path) -> None:
    src = write_mixed(tmp_path / "src", 3 * MiB + 1234, seed=7)
    dest = tmp_path / "dest"
    dest.write_bytes(b"old content\n" * 1000)
    old = dest.read_bytes()
    old_ino = dest.stat().st_ino
    # The hook holds send between passes, so DEST can be looked at mid-migration.
    m = runner.migrate(src, dest, ("--no-mtime-shortcut",), ("--force",),
                       send_env={"MULTIFD_TEST_BETWEEN_PASSES": "sleep 0.5"})
    wait_for_event(m.recv, "pass")
    assert dest.read_bytes() == old  # not touched before completion
    assert dest.stat().st_ino == old_ino
    assert listing(tmp_path) == ["dest", "src"]
    assert_migrated(m, src, dest)
    assert dest.stat().st_ino != old_ino  # a new file renamed over the old name
    assert listing(tmp_path) == ["dest", "src"]


def test_failed_migration_leaves_existing_dest_intact(runner: Runner, tmp_path: Path) -> None:
    src = write_mixed(tmp_path / "src", 3 * MiB + 1234, seed=8)
    dest = tmp_path / "dest"
    dest.write_bytes(os.urandom(100 * KiB))
    old = sha256(dest)
    before = listing(tmp_path)
    # send stops after pass 1 in a long hook; recv is still waiting for pass 2.
    m = runner.migrate(src, dest, ("--no-mtime-shortcut",), ("--force",),
                       send_env={"MULTIFD_TEST_BETWEEN_PASSES": "sleep 60"},
                       recv_env={"MULTIFD_TEST_DELAY": "0:0.01"})
    wait_for_event(m.recv, "pass")
    kill_group(m.send)
    r = m.recv.wait(40)
    assert r == 3, describe(m)
    assert m.recv.last()["event"] == "failed" and m.recv.last()["exit_code"] == 3
    assert sha256(dest) == old
    assert listing(tmp_path) == before


def test_sigkill_of_recv_leaves_no_stray_file(runner: Runner, tmp_path: Path) -> None:
    src = write_mixed(tmp_path / "src", 3 * MiB + 1234, seed=9)
    dest = tmp_path / "dest"
    before = listing(tmp_path)
    m = runner.migrate(src, dest, ("--no-mtime-shortcut", "--timeout", "10"),
                       send_env={"MULTIFD_TEST_BETWEEN_PASSES": "sleep 0.5"},
                       recv_env={"MULTIFD_TEST_DELAY": "0:0.01"})
    wait_for_event(m.recv, "pass")
    kill_group(m.recv)
    t0 = time.monotonic()
    s = m.send.wait(30)
    assert s in (3, 4), describe(m)
    assert time.monotonic() - t0 < 10 + 5  # within send's --timeout (and some slack)
    assert m.send.last()["event"] == "failed" and m.send.last()["exit_code"] == s
    assert listing(tmp_path) == before


def _send_args(tmp_path: Path, *extra: str, source: str | None = None) -> list[str]:
    src = tmp_path / "src"
    if not src.exists():
        src.write_bytes(b"x" * 10000)
    return ["send", source if source is not None else str(src), *extra]


USAGE_ERRORS: dict[str, list[str]] = {
    "compress-level": ["--to", "tcp:127.0.0.1:9", "--compress", "zstd:99"],
    "compress-name": ["--to", "tcp:127.0.0.1:9", "--compress", "foo"],
    "to-garbage": ["--to", "bogus"],
    "to-scheme": ["--to", "udp:127.0.0.1:9"],
    "to-port": ["--to", "tcp:127.0.0.1:99999"],
    "channels-0": ["--to", "tcp:127.0.0.1:9", "--channels", "0"],
    "page-size-3000": ["--to", "tcp:127.0.0.1:9", "--page-size", "3000"],
    "page-size-garbage": ["--to", "tcp:127.0.0.1:9", "--page-size", "abc"],
    "packet-size-not-multiple": ["--to", "tcp:127.0.0.1:9", "--packet-size", "5000"],
    "missing-source": ["--to", "tcp:127.0.0.1:9"],
    "directory-to-image": ["--to", "file:/nonexistent-dir/copy.img"],
    "directory-with-state": ["--to", "tcp:127.0.0.1:9", "--state-file", "/etc/hostname",
                             "--pause-cmd", "true"],
    "listen-garbage": [],
    "listen-port": [],
}


def _usage_argv(case: str, tmp_path: Path, json: bool) -> list[str]:
    j = ["--json"] if json else []
    if case.startswith("listen-"):
        uri = "bogus" if case == "listen-garbage" else "tcp:127.0.0.1:notaport"
        return ["recv", *j, "--listen", uri, str(tmp_path / "dest")]
    source = None
    if case == "missing-source":
        source = str(tmp_path / "no-such-file")
    elif case.startswith("directory-"):
        source = str(tmp_path)  # a tree cannot go to an image, nor carry a state blob yet
    return [*_send_args(tmp_path, *j, *USAGE_ERRORS[case], source=source)]


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIFD_")}
    return subprocess.run([*MULTIFD, *argv], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line(tmp_path: Path, case: str) -> None:
    before = set(os.listdir(tmp_path)) | {"src"}
    res = _run_cli(_usage_argv(case, tmp_path, json=False))
    assert res.returncode == 2, res
    err = res.stderr.strip()
    assert err and "\n" not in err, f"expected one line on stderr, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert set(os.listdir(tmp_path)) <= before  # nothing created


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_with_json_prints_failed_event(tmp_path: Path, case: str) -> None:
    import json

    res = _run_cli(_usage_argv(case, tmp_path, json=True))
    assert res.returncode == 2, res
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines, f"no JSON event on stdout; stderr was:\n{res.stderr}"
    ev = json.loads(lines[-1])
    assert ev["event"] == "failed" and ev["exit_code"] == 2, ev
    assert ev["error"]


def test_version_same_for_module_and_script() -> None:
    script = Path(sys.executable).parent / "multifd"
    if not script.exists():
        pytest.skip("no multifd console script next to the interpreter")
    a = _run_cli(["--version"])
    b = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert a.returncode == 0 and b.returncode == 0
    assert a.stdout.strip() and a.stdout == b.stdout
    assert "multifd" in a.stdout


# -- 8. --keep-partial without a failure ---------------------------------------------------------


def test_keep_partial_without_failure_leaves_no_partial(runner: Runner, tmp_path: Path) -> None:
    src = write_mixed(tmp_path / "src", MiB + 1, seed=10)
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest, recv_args=("--keep-partial",))
    assert_migrated(m, src, dest)
    assert not Path(str(dest) + ".partial").exists()
    assert listing(tmp_path) == ["dest", "src"]
