"""The source changing under a running migration in ways other than in-place writes.

The promise: at the end DEST is byte-identical to what SRC held when the writer was
paused (or, without a pause, when the migration completed), or send fails with a
documented exit code other than 1 and no DEST appears. These tests change the source
the way real writers and operators do:

- a writer that saves by writing a new file and renaming it over SRC (editors,
  atomic-save libraries, many databases' checkpoint files): SRC's path now names a new
  inode while multifd keeps reading the old one through its open descriptors;
- SRC unlinked mid-migration: the old inode lives on through multifd's descriptors;
- SRC replaced after send's main process opened it but before the channel processes
  opened it by path: main sizes and stats one inode, the channels read another;
- SRC (a file or a block device) shrinking while a pass reads it.

Every test here uses real `multifd send` and `multifd recv` processes, except one
that drives the hash tracker directly to pin down the cause of the shrink crash.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers.mfdkit import Migration, Proc, Runner, sha256, write_random

from multifd_cli.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_OK

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = ("--timeout", "20")  # short, so a hang fails instead of stalling the suite
# A failure must carry a documented exit code that says what went wrong; 1 is a bug.
CLEAN_FAILURES = set(EXIT_CODES) - {EXIT_OK, EXIT_INTERNAL}
# Several passes even though nothing writes: the between-passes hook runs only after a
# pass that did not converge, and a 1 ms limit is never met (the scan alone takes longer).
FORCE_PASSES = ("--downtime-limit", "1", "--max-passes", "3")


def migrate(runner: Runner, src: Path, dest: Path, *send_args: str,
            send_env: dict[str, str] | None = None, to: str | None = None) -> Migration:
    r, uri = runner.recv(dest, *TIMEOUT)
    s = runner.send(src, to or uri, *TIMEOUT, *send_args, env=send_env)
    return Migration(r, s, uri)


def describe(p: Proc) -> str:
    evs = [{k: v for k, v in e.items() if k not in ("side", "ts")}
           for e in p.events if e["event"] != "progress"]
    return f"events={evs}\nstderr={p.stderr[-2500:]}"


def exact_or_clean_failure(m: Migration, dest: Path, src: Path, what: str) -> None:
    """Either both sides succeed and DEST is exactly what `src` holds once send is done
    (the writer stays paused after success), or send fails with a documented exit code
    (not 1), an error event and no traceback, and DEST is absent."""
    s, r = m.wait(90)
    if s == EXIT_OK:
        assert r == EXIT_OK, describe(m.recv)
        got, expected_sha = sha256(dest), sha256(src)
        assert got == expected_sha, (
            f"send exited 0 and the digests agreed, but DEST is not {what}: "
            f"sha256 {got[:16]}, expected {expected_sha[:16]}\n{describe(m.send)}"
        )
        return
    assert s in CLEAN_FAILURES, f"send exited {s}, not a documented failure\n{describe(m.send)}"
    assert "Traceback" not in m.send.stderr, m.send.stderr
    failed = [e for e in m.send.events if e["event"] == "failed"]
    assert failed and failed[-1]["exit_code"] == s, describe(m.send)
    assert not dest.exists(), "a failed run left a DEST"


def py(code: str) -> str:
    """A shell command running `code` with this interpreter (for --pause-cmd and hooks)."""
    return shlex.join([sys.executable, "-c", code])


def replace_code(src: Path, size: int, seed: int, marker: Path | None = None) -> str:
    """Python that writes `size` new random bytes to a temporary file and renames it over
    `src`, as an atomic save does; with `marker`, only once."""
    once = (f"m = {str(marker)!r}\n"
            "if os.path.exists(m): raise SystemExit(0)\n"
            "open(m, 'w').close()\n") if marker else ""
    return (
        "import os, random\n"
        f"{once}"
        f"tmp = {str(src) + '.tmp'!r}\n"
        "with open(tmp, 'wb') as f:\n"
        f"    f.write(random.Random({seed}).randbytes({size}))\n"
        "    f.flush(); os.fsync(f.fileno())\n"
        f"os.replace(tmp, {str(src)!r})\n"
    )


# -- 1. rename-over: the path names a new inode --------------------------------------------------


def test_rename_over_source_at_pause(runner: Runner, tmp_path: Path) -> None:
    """The writer's last act before it is paused is an atomic save: a new file renamed over
    SRC. At the pause SRC is the new file; send copies the old, unlinked inode instead,
    "verifies" it (the digest covers only what was read) and exits 0 without a warning."""
    src = write_random(tmp_path / "src", 4 * MiB, seed=1)
    old_sha = sha256(src)
    dest = tmp_path / "dest"
    # --pause-cmd runs right before the final pass: the save lands just before the pause.
    m = migrate(runner, src, dest,
                "--pause-cmd", py(replace_code(src, 3 * MiB + 5, seed=2)),
                "--resume-cmd", "true")
    exact_or_clean_failure(m, dest, src, "SRC at the pause (the renamed-over file)")
    assert sha256(src) != old_sha


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "unpaused"])
def test_rename_over_source_between_passes(runner: Runner, tmp_path: Path, sleeper: int,
                                           paused: bool) -> None:
    """An atomic save between two passes: every later pass re-reads the old inode, finds
    nothing changed, and the migration completes with the stale content. Without a pause
    not even the "only as consistent as the writer was quiet" warning appears, because
    no pass saw a change."""
    src = write_random(tmp_path / "src", 8 * MiB, seed=3)
    dest = tmp_path / "dest"
    marker = tmp_path / "replaced"
    args = ("--pause-pid", str(sleeper), *FORCE_PASSES) if paused else ("--no-mtime-shortcut",)
    m = migrate(runner, src, dest, *args,
                send_env={"MULTIFD_TEST_BETWEEN_PASSES":
                          py(replace_code(src, 5 * MiB + 123, seed=4, marker=marker))})
    exact_or_clean_failure(m, dest, src, "SRC at the end (the renamed-over file)")
    assert marker.exists(), "the hook never ran: the test did not test anything"


# -- 2. SRC unlinked -----------------------------------------------------------------------------


@pytest.mark.parametrize("paused", [True, False], ids=["paused", "unpaused"])
def test_source_unlinked_mid_migration(runner: Runner, tmp_path: Path, sleeper: int,
                                       paused: bool) -> None:
    """SRC is deleted between passes. At the pause there is no SRC, so no DEST can be
    "what SRC held": send must fail. It copies the deleted inode and exits 0, and a DEST
    appears for a file that no longer exists."""
    src = write_random(tmp_path / "src", 4 * MiB, seed=5)
    dest = tmp_path / "dest"
    args = ("--pause-pid", str(sleeper), *FORCE_PASSES) if paused else ("--no-mtime-shortcut",)
    m = migrate(runner, src, dest, *args,
                send_env={"MULTIFD_TEST_BETWEEN_PASSES": shlex.join(["rm", "-f", str(src)])})
    s, r = m.wait(90)
    assert not src.exists()
    assert s in CLEAN_FAILURES, (
        f"send exited {s} although SRC was deleted during the migration\n{describe(m.send)}"
    )
    assert not dest.exists(), "DEST holds a copy of a file that was deleted before the pause"


# -- 3. SRC replaced between main's open and the channels' open ----------------------------------


class HoldFirstConnection:
    """A TCP relay in front of recv that holds the first connection (send's main
    connection) until released. send's main process opens SRC before it connects; the
    channel processes open SRC by path only after main's handshake, so while the relay
    holds main, SRC can be replaced exactly in that window."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp:").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if first:
                first = False
                self.first_arrived.set()
                self.release.wait(30)
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()  # recv already gone (the test is ending): nothing to relay
                continue
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        for s in self.socks:
            s.close()


def test_source_replaced_before_channels_open_it(runner: Runner, tmp_path: Path,
                                                 sleeper: int) -> None:
    """SRC renamed over between send's own open and its channels' opens: main takes the
    size (4 MiB) and the stat keys from the old inode, the channels read the new 6 MiB
    one. DEST is the first 4 MiB of the new file, neither the old file nor the new one,
    and the digest "verifies" it."""
    src = write_random(tmp_path / "src", 4 * MiB, seed=6)
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest, *TIMEOUT)
    relay = HoldFirstConnection(uri)
    try:
        s = runner.send(src, relay.uri, *TIMEOUT, "--pause-pid", str(sleeper))
        assert relay.first_arrived.wait(20), "send never connected"
        subprocess.run([sys.executable, "-c", replace_code(src, 6 * MiB, seed=7)], check=True)
        relay.release.set()
        m = Migration(r, s, uri)
        exact_or_clean_failure(m, dest, src, "SRC at the pause (the new file)")
    finally:
        relay.close()


# -- 4. SRC shrinking while a pass reads it ------------------------------------------------------


def wait_mid_pass_one(p: Proc, at_least: int) -> None:
    """Read send's JSON events until a progress event shows pass 1 under way with at
    least `at_least` bytes on the wire (so the end of the source is still unread)."""
    while True:
        ev = p.next_event(30)
        if ev["event"] == "pass":
            raise AssertionError(f"pass 1 ended before the source could change: {ev}")
        if ev["event"] == "progress" and ev["pass"] == 1 and ev["transferred_bytes"] >= at_least:
            return


@pytest.mark.parametrize("new_size", [0, 5 * MiB + 333], ids=["to-zero", "to-5MiB+333"])
def test_file_shrinks_mid_pass(runner: Runner, tmp_path: Path, sleeper: int,
                               new_size: int) -> None:
    """A 16 MiB file (a whole number of 64 KiB chunks, like most disk images) truncated
    while pass 1 reads it. The channel that reads the last range gets a short read and
    invalidates chunks up to one past the table's end: ValueError in a channel, exit 1
    "internal error" on both sides. (tests/test_live.py resizes only between passes.)"""
    src = write_random(tmp_path / "src", 16 * MiB, seed=8)
    dest = tmp_path / "dest"
    m = migrate(runner, src, dest, "--pause-pid", str(sleeper), "--max-bandwidth", "8M",
                "--json-interval", "0.05")
    wait_mid_pass_one(m.send, 1 * MiB)
    os.truncate(src, new_size)
    s, r = m.wait(90)
    assert (s, r) == (0, 0), f"send {s}, recv {r}\n{describe(m.send)}"
    assert dest.stat().st_size == new_size
    assert sha256(dest) == sha256(src)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 16 MiB loop device over a file in tmp_path: (device, backing file)."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root (losetup)")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = write_random(tmp_path / "backing.img", 16 * MiB, seed=9)
    res = subprocess.run(["losetup", "-f", "--show", str(backing)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0 or not res.stdout.strip():
        pytest.skip(f"losetup cannot attach a loop device here: {res.stderr.strip()}")
    dev = Path(res.stdout.strip())
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=30)


def test_block_device_shrinks_mid_pass(runner: Runner, tmp_path: Path, sleeper: int,
                                       loop_device: tuple[Path, Path]) -> None:
    """The same crash with a block device resized while pass 1 reads it (the backing file
    truncated and `losetup -c`): exit 1 "internal error" instead of a copy of the
    device as it is at the pause."""
    dev, backing = loop_device
    dest = tmp_path / "dest"
    m = migrate(runner, dev, dest, "--pause-pid", str(sleeper), "--max-bandwidth", "8M",
                "--json-interval", "0.05")
    wait_mid_pass_one(m.send, 1 * MiB)
    os.truncate(backing, 7 * MiB + 512)
    subprocess.run(["losetup", "-c", str(dev)], check=True, timeout=30)
    s, r = m.wait(90)
    assert (s, r) == (0, 0), f"send {s}, recv {r}\n{describe(m.send)}"
    assert dest.stat().st_size == 7 * MiB + 512
    assert sha256(dest) == sha256(dev)


class _Sink:
    def send_pages(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("full", [True, False], ids=["full-pass", "later-pass"])
def test_tracker_short_read_in_the_last_chunk(tmp_path: Path, full: bool) -> None:
    """The cause of the two crashes above, without processes: a scan of the last range of
    a chunk-aligned source that finds the file shorter than the pass's size."""
    from multifd_cli.send.clients import PagedClient
    from multifd_cli.send.tracker import HashTracker, SourceTables

    size = 1 * MiB  # 16 chunks of 64 KiB: the chunk table holds exactly 16 entries
    src = write_random(tmp_path / "src", size, seed=10)
    tables = SourceTables.create("t", size, 4 * KiB)
    client = PagedClient(_Sink(), 4 * KiB, 128)
    tracker = HashTracker(4 * KiB, lambda: None)
    fd = os.open(src, os.O_RDONLY)
    try:
        if not full:
            tracker.scan(fd, 0, tables, 0, size // (4 * KiB), size, True, client)
        os.truncate(src, size // 2)
        res = tracker.scan(fd, 0, tables, 0, size // (4 * KiB), size, full, client)
        assert res.short_read
        # Every chunk from the new end on is to be sent whole next time.
        assert not any(tables.chunk_valid.view[size // 2 // (64 * KiB) : size // (64 * KiB)])
    finally:
        os.close(fd)
    tables.close()  # not in `finally`: after the crash a view stays exported and close raises


def test_relay_is_transparent(runner: Runner, tmp_path: Path) -> None:
    """The relay of test_source_replaced_before_channels_open_it changes nothing by itself:
    with SRC left alone, the migration through it succeeds and DEST is SRC."""
    src = write_random(tmp_path / "src", 2 * MiB, seed=11)
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest, *TIMEOUT)
    relay = HoldFirstConnection(uri)
    try:
        s = runner.send(src, relay.uri, *TIMEOUT)
        assert relay.first_arrived.wait(20)
        time.sleep(0.2)
        relay.release.set()
        s_rc, r_rc = Migration(r, s, uri).wait(60)
        assert (s_rc, r_rc) == (0, 0), describe(s)
        assert sha256(dest) == sha256(src)
    finally:
        relay.close()
