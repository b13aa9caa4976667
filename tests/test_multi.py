"""Several sources, the blob client, block devices, --preserve, and hostile block names.

Real `multifd send` and `multifd recv` processes on loopback (the fixtures of
conftest.py), real files, real loop devices (as root), a real writer
(examples/writer.py) paused with --pause-pid, and, for the hostile names, a
fake send that speaks the wire protocol through multifd_cli.wire's encode
functions.

What the README ("Several sources, device state, block devices, metadata") and
docs/protocol.md ("Several blocks, blobs and metadata") promise, checked here:

* several SOURCEs make DEST a directory; each block is named by its path
  relative to the sources' common directory, or by SOURCE=NAME; either every
  block appears under DEST or none does, with no staging directory left over;
* two sources with the same name are a usage error before anything connects;
* an existing directory DEST needs --force and is swapped out in one step; a
  failed migration leaves no DEST (or DEST.partial with --keep-partial);
* --state-cmd / --state-file travel as a blob after the pause, whole, in the
  final epoch, and land next to the blocks;
* a block device works as SOURCE and as DEST; a device DEST needs --force, is
  never truncated, and its first MiB reads as zeros until the copy completes;
* --preserve keeps mode, owner (as root), mtime and xattrs;
* a block name that could leave DEST is a protocol error (exit 4).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers.mfdkit import (
    Proc,
    Runner,
    Writer,
    is_running,
    is_stopped,
    read_message,
    sha256,
    spawn,
    thread_states,
    wait_until,
    write_mixed,
    write_random,
)

from multifd_cli import wire as P

KiB = 1 << 10
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
# Channel 0 of recv sleeps this long before applying each packet: a slow destination.
SLOW_RECV = {"MULTIFD_TEST_DELAY": "0:0.05"}
IS_ROOT = os.geteuid() == 0


# -- helpers ---------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every regular file under root: relative path -> sha256. Anything else fails."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            assert not os.path.islink(os.path.join(dirpath, d)), f"symlink {d} in {dirpath}"
        for f in filenames:
            p = Path(dirpath) / f
            assert stat.S_ISREG(p.lstat().st_mode), f"{p} is not a regular file"
            out[str(p.relative_to(root))] = sha256(p)
    return out


def leftovers(dest: Path) -> list[str]:
    """Hidden staging names (.DEST.multifd-*) that recv may leave next to DEST."""
    return sorted(n for n in os.listdir(dest.parent) if n.startswith(f".{dest.name}.multifd-"))


def read_at(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while len(out) < length:
            chunk = os.pread(fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(fd)


def wait_event(p: Proc, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """Read p's events until one satisfies pred (p must keep printing, e.g. progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = p.next_event(timeout=deadline - time.monotonic())
        if pred(ev):
            return ev
        assert ev["event"] not in ("completed", "failed"), f"ended before the moment: {ev}"
    raise TimeoutError("the awaited event never came")


def receiving(ev: dict[str, Any]) -> bool:
    """recv's progress shows page data arriving (the session runs, pass 1 has begun)."""
    return ev["event"] == "progress" and ev["transferred_bytes"] > 0


def completed(p: Proc) -> dict[str, Any]:
    done = p.of("completed")
    assert len(done) == 1, (p.events[-3:], p.stderr)
    return done[0]


def check_ok(s_rc: int, r_rc: int, send: Proc, recv: Proc) -> tuple[dict[str, Any], dict[str, Any]]:
    assert (s_rc, r_rc) == (0, 0), f"send {s_rc}: {send.stderr}\nrecv {r_rc}: {recv.stderr}"
    return completed(send), completed(recv)


def error_lines(p: Proc) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.startswith("multifd: error:")]


def killpg(p: Proc) -> None:
    try:
        os.killpg(p.popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- 1. several sources ------------------------------------------------------------------------


def test_several_sources_common_directory(runner: Runner, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`send a.img sub/b.img`: DEST is a directory holding a.img and sub/b.img."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a = write_random(src / "a.img", 3 * MiB + 1234, seed=11)
    b = write_mixed(src / "sub" / "b.img", 2 * MiB, seed=12)
    dest = tmp_path / "out" / "vm"
    dest.parent.mkdir()
    monkeypatch.chdir(src)  # relative SOURCE arguments, as a user would type them
    r, uri = runner.recv(dest)
    s = runner.send(["a.img", "sub/b.img"], uri)  # type: ignore[list-item]
    sc, rc = check_ok(s.wait(), r.wait(), s, r)
    assert dest.is_dir()
    assert tree(dest) == {"a.img": sha256(a), "sub/b.img": sha256(b)}
    assert leftovers(dest) == []
    assert os.listdir(dest.parent) == ["vm"]
    assert "blobs" not in rc
    assert sc["digest"] == rc["digest"]


def test_source_equals_name_renames(runner: Runner, tmp_path: Path) -> None:
    """SOURCE=NAME names a block; the others keep the path below their common directory."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y" / "deep").mkdir(parents=True)
    a = write_random(tmp_path / "x" / "a.img", 1 * MiB, seed=13)
    b = write_random(tmp_path / "y" / "deep" / "b.img", 1 * MiB + 512, seed=14)
    c = write_random(tmp_path / "y" / "c.img", 64 * KiB, seed=15)
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send([f"{a}=disks/first.img", str(b), str(c)], uri)  # type: ignore[list-item]
    check_ok(s.wait(), r.wait(), s, r)
    assert tree(dest) == {
        "disks/first.img": sha256(a), "deep/b.img": sha256(b), "c.img": sha256(c),
    }
    assert leftovers(dest) == []


# -- 2. two sources with one name --------------------------------------------------------------


@pytest.mark.parametrize("case", ["same-path", "two-renames", "rename-vs-derived"])
def test_two_sources_one_name_is_a_usage_error(runner: Runner, tmp_path: Path, case: str) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_random(tmp_path / "x" / "a.img", 64 * KiB, seed=21)
    b = write_random(tmp_path / "y" / "b.img", 64 * KiB, seed=22)
    args = {
        "same-path": [str(a), str(a)],
        "two-renames": [f"{a}=disk.img", f"{b}=disk.img"],
        "rename-vs-derived": [f"{a}=b.img", str(b)],  # b alone below y/: named b.img
    }[case]
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send(args, uri)  # type: ignore[arg-type]
    assert s.wait(30) == 2, s.stderr
    lines = s.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multifd: error:"), s.stderr
    assert "named" in lines[0] and "SOURCE=NAME" in lines[0], lines[0]
    assert s.last()["event"] == "failed" and s.last()["exit_code"] == 2
    # send never connected: recv still waits for a session.
    time.sleep(0.3)
    assert r.popen.poll() is None, r.read_stderr()
    killpg(r)
    r.wait(10)
    assert "session" not in r.stderr and "dropped" not in r.stderr, r.stderr
    assert not dest.exists()


# -- 3. an existing directory DEST -------------------------------------------------------------


def _old_dest(dest: Path) -> dict[str, str]:
    (dest / "old").mkdir(parents=True)
    write_random(dest / "a.img", 256 * KiB, seed=31)
    write_random(dest / "old" / "keep.txt", 4 * KiB, seed=32)
    return tree(dest)


def test_existing_dir_dest_without_force_exits_2_at_start(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    before = _old_dest(dest)
    p = spawn(["recv", "--json", "--timeout", "10", str(dest)])
    try:
        assert p.wait(30) == 2, p.stderr
    finally:
        killpg(p)
    assert [e["event"] for e in p.events] == ["failed"]  # never listened
    assert len(error_lines(p)) == 1 and "--force" in error_lines(p)[0], p.stderr
    assert tree(dest) == before


def test_existing_dir_dest_with_force_is_swapped_atomically(runner: Runner, tmp_path: Path) -> None:
    """During the (slowed) migration DEST still holds the old files; afterwards only the new."""
    src = tmp_path / "src"
    src.mkdir()
    a = write_random(src / "a.img", 4 * MiB, seed=33)
    b = write_random(src / "b.img", 4 * MiB, seed=34)
    dest = tmp_path / "dest"
    before = _old_dest(dest)
    old_ino = dest.stat().st_ino
    r, uri = runner.recv(dest, "--force", "--json-interval", "0.1", env=SLOW_RECV)
    s = runner.send([a, b], uri, "--packet-size", "64K")
    wait_event(r, receiving)
    for _ in range(3):
        assert tree(dest) == before  # the old directory, untouched
        assert dest.stat().st_ino == old_ino
        time.sleep(0.2)
    assert r.popen.poll() is None, "the migration ended before DEST was looked at"
    check_ok(s.wait(), r.wait(), s, r)
    assert tree(dest) == {"a.img": sha256(a), "b.img": sha256(b)}
    assert dest.stat().st_ino != old_ino
    assert leftovers(dest) == []  # the old directory was removed, not left hidden


# -- 4. a failed multi-source migration --------------------------------------------------------


@pytest.mark.parametrize("keep_partial", [False, True], ids=["discard", "keep-partial"])
def test_failed_multi_source_leaves_no_dest(runner: Runner, tmp_path: Path, keep_partial: bool) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a = write_random(src / "a.img", 4 * MiB, seed=41)
    b = write_random(src / "sub" / "b.img", 4 * MiB + 100, seed=42)
    dest = tmp_path / "dest"
    extra = ("--keep-partial",) if keep_partial else ()
    r, uri = runner.recv(dest, "--json-interval", "0.1", *extra, env=SLOW_RECV)
    s = runner.send([a, b], uri, "--packet-size", "64K")
    wait_event(r, receiving)
    killpg(s)  # send and its channels, mid-pass
    s.popen.wait(10)
    rc = r.wait(60)
    assert rc == 3, f"recv exited {rc}: {r.stderr}"
    assert r.last()["event"] == "failed"
    assert not os.path.lexists(dest)
    assert leftovers(dest) == []
    partial = tmp_path / "dest.partial"
    if keep_partial:
        assert partial.is_dir()
        files = tree(partial)
        assert set(files) == {"a.img", "sub/b.img"}
        assert (partial / "a.img").stat().st_size == 4 * MiB
        assert (partial / "sub" / "b.img").stat().st_size == 4 * MiB + 100
        assert files != {"a.img": sha256(a), "sub/b.img": sha256(b)}  # it is incomplete
    else:
        assert not os.path.lexists(partial)
    assert sorted(os.listdir(tmp_path)) == sorted(["src"] + (["dest.partial"] if keep_partial else []))


# -- 5. the blob client ------------------------------------------------------------------------


def _blob_checks(s: Proc, r: Proc, name: str, size: int) -> None:
    sc, rc = completed(s), completed(r)
    assert sc["paused"] is True
    final = [e for e in s.of("pass") if e["final"]]
    assert len(final) == 1 and final[0]["pass"] == sc["passes"] == rc["passes"]
    assert rc["blobs"] == [{"name": name, "bytes": size, "epoch": rc["passes"]}]


def test_state_cmd_blob_with_live_writer(runner: Runner, tmp_path: Path,
                                         writers: Callable[..., Writer]) -> None:
    src = write_random(tmp_path / "disk.img", 16 * MiB, seed=51)
    w = writers(src, rate="4M")
    cmd = "printf 'cpu=%d regs=%s\\n' 7 deadbeef; printf 'tail-without-newline'"
    printed = subprocess.run(cmd, shell=True, capture_output=True, check=True).stdout
    dest = tmp_path / "vm"
    r, uri = runner.recv(dest)
    s = runner.send([src], uri, "--pause-pid", str(w.pid), "--state-cmd", cmd)
    check_ok(s.wait(), r.wait(), s, r)
    _blob_checks(s, r, "state", len(printed))
    assert set(os.listdir(dest)) == {"disk.img", "state"}
    assert (dest / "state").read_bytes() == printed
    # keep-paused: the writer stays stopped, so the source is what was copied.
    assert is_stopped(w.pid), thread_states(w.pid)
    assert sha256(dest / "disk.img") == sha256(src)
    time.sleep(0.5)
    assert is_stopped(w.pid), "something resumed the writer after send exited"
    assert leftovers(dest) == []
    assert stat.S_IMODE((dest / "state").stat().st_mode) == 0o644 & ~_umask()


def test_state_file_blob_named(runner: Runner, tmp_path: Path, writers: Callable[..., Writer]) -> None:
    src = write_random(tmp_path / "disk.img", 16 * MiB, seed=52)
    state = write_random(tmp_path / "saved-state.bin", 10 * KiB + 3, seed=53)
    w = writers(src, rate="4M")
    dest = tmp_path / "vm"
    r, uri = runner.recv(dest)
    s = runner.send([src], uri, "--pause-pid", str(w.pid), "--state-file", str(state),
                    "--state-name", "dev.state")
    check_ok(s.wait(), r.wait(), s, r)
    _blob_checks(s, r, "dev.state", state.stat().st_size)
    assert tree(dest) == {"disk.img": sha256(src), "dev.state": sha256(state)}
    assert is_stopped(w.pid)
    assert state.exists()  # --state-file is read, never removed


@pytest.mark.parametrize(
    "extra",
    [(), pytest.param(("--channels", "3", "--compress", "zstd"), marks=pytest.mark.slow)],
    ids=["plain", "zstd-3ch"],
)
def test_blob_larger_than_a_packet_arrives_whole(runner: Runner, tmp_path: Path, sleeper: int,
                                                 extra: tuple[str, ...]) -> None:
    """3 MiB + a bit of state with 512K packets: seven chunks, the last one short."""
    (tmp_path / "src").mkdir()
    a = write_random(tmp_path / "src" / "a.img", 1 * MiB, seed=54)
    b = write_random(tmp_path / "src" / "b.img", 1 * MiB, seed=55)
    big = write_mixed(tmp_path / "big-state", 3 * MiB + 777, seed=56)
    dest = tmp_path / "vm"
    r, uri = runner.recv(dest)
    s = runner.send([a, b], uri, "--pause-pid", str(sleeper), "--packet-size", "512K",
                    "--state-cmd", f"cat {big}", "--state-name", "devices/state.bin", *extra)
    check_ok(s.wait(), r.wait(), s, r)
    _blob_checks(s, r, "devices/state.bin", big.stat().st_size)
    assert tree(dest) == {"a.img": sha256(a), "b.img": sha256(b), "devices/state.bin": sha256(big)}


def test_failing_state_cmd_exits_7_and_resumes_the_writer(runner: Runner, tmp_path: Path,
                                                          writers: Callable[..., Writer]) -> None:
    src = write_random(tmp_path / "disk.img", 16 * MiB, seed=57)
    w = writers(src, rate="4M")
    dest = tmp_path / "vm"
    r, uri = runner.recv(dest)
    s = runner.send([src], uri, "--pause-pid", str(w.pid), "--state-cmd", "echo partial; exit 1")
    s_rc, r_rc = s.wait(), r.wait()
    assert s_rc == 7, s.stderr
    assert r_rc == 7, r.stderr
    assert s.of("switchover"), "the state command runs after the pause"
    assert len(error_lines(s)) == 1 and "state" in error_lines(s)[0], s.stderr
    assert wait_until(lambda: is_running(w.pid), 2, 0.01) is not None, thread_states(w.pid)
    assert not os.path.lexists(dest)
    assert leftovers(dest) == []


@pytest.mark.parametrize("opt", ["--state-cmd", "--state-file"])
def test_state_without_a_pause_mechanism_is_exit_2(tmp_path: Path, opt: str) -> None:
    src = write_random(tmp_path / "disk.img", 64 * KiB, seed=58)
    value = "echo hi" if opt == "--state-cmd" else str(src)
    p = spawn(["send", "--json", str(src), "--to", "tcp:127.0.0.1:9", opt, value])
    try:
        assert p.wait(30) == 2, p.stderr
    finally:
        killpg(p)
    assert len(error_lines(p)) == 1 and "pause" in error_lines(p)[0], p.stderr


def test_state_named_like_a_source_is_exit_2(runner: Runner, tmp_path: Path, sleeper: int) -> None:
    src = write_random(tmp_path / "disk.img", 64 * KiB, seed=59)
    r, uri = runner.recv(tmp_path / "vm")
    s = runner.send([src], uri, "--pause-pid", str(sleeper), "--state-cmd", "echo x",
                    "--state-name", "disk.img")
    assert s.wait(30) == 2, s.stderr
    assert len(error_lines(s)) == 1, s.stderr
    assert r.popen.poll() is None  # refused before connecting
    assert is_running(sleeper) or thread_states(sleeper) == []


# -- 6. block devices --------------------------------------------------------------------------


class Loops:
    """Loop devices over files in tmp_path. In cleanup every node gets back the mode, owner
    and times it had (a test may change them through --preserve) and is detached."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.devices: list[tuple[Path, os.stat_result]] = []

    def attach(self, backing: Path) -> Path:
        if not IS_ROOT:
            pytest.skip("loop devices need root (losetup)")
        if shutil.which("losetup") is None:
            pytest.skip("losetup is not installed")
        res = subprocess.run(["losetup", "-f", "--show", str(backing)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0 or not res.stdout.strip():
            pytest.skip(f"losetup cannot attach a loop device here: {res.stderr.strip()}")
        dev = Path(res.stdout.strip())
        self.devices.append((dev, os.stat(dev)))
        return dev

    def detach_all(self) -> None:
        for dev, st in self.devices:
            try:
                os.chown(dev, st.st_uid, st.st_gid)
                os.chmod(dev, stat.S_IMODE(st.st_mode))
                os.utime(dev, ns=(st.st_atime_ns, st.st_mtime_ns))
                for name in os.listxattr(dev):
                    if name.startswith("user."):
                        os.removexattr(dev, name)
            except OSError:
                pass
            subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=30)
        self.devices.clear()


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    lo = Loops(tmp_path)
    yield lo
    lo.detach_all()


def device_size(dev: Path) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct-io"])
def test_loop_device_as_source(runner: Runner, tmp_path: Path, loops: Loops, direct: bool) -> None:
    """A device source (size a multiple of 512, not of the 4K page) to a file DEST."""
    backing = write_mixed(tmp_path / "backing.img", 8 * MiB + 1536, seed=61)
    dev = loops.attach(backing)
    assert device_size(dev) == backing.stat().st_size
    dest = tmp_path / "copy.img"
    r, uri = runner.recv(dest)
    s = runner.send([dev], uri, *(("--direct-io",) if direct else ()))
    sc, _ = check_ok(s.wait(), r.wait(), s, r)
    assert dest.is_file()
    assert sha256(dest) == sha256(backing)
    assert sc["passes"] >= 2  # no mtime shortcut for a device: a pass that finds nothing ends it


def test_loop_device_as_dest(runner: Runner, tmp_path: Path, loops: Loops) -> None:
    """Without --force recv refuses the device at start; with it the device is written in
    place, never truncated: bytes past the source's size keep their old content."""
    src = write_random(tmp_path / "src.img", 4 * MiB + 4096 + 100, seed=62)
    backing = write_random(tmp_path / "backing.img", 6 * MiB, seed=63)
    dev = loops.attach(backing)
    old_tail = read_at(dev, src.stat().st_size, 6 * MiB - src.stat().st_size)

    p = spawn(["recv", "--json", "--timeout", "10", str(dev)])
    try:
        assert p.wait(30) == 2, p.stderr
    finally:
        killpg(p)
    assert "--force" in error_lines(p)[0], p.stderr

    r, uri = runner.recv(dev, "--force")
    s = runner.send([src], uri)
    check_ok(s.wait(), r.wait(), s, r)
    assert stat.S_ISBLK(os.stat(dev).st_mode)
    assert read_at(dev, 0, src.stat().st_size) == src.read_bytes()
    assert read_at(dev, src.stat().st_size, len(old_tail)) == old_tail
    assert device_size(dev) == 6 * MiB
    assert leftovers(dev) == []


def test_device_dest_smaller_than_source_exits_7(runner: Runner, tmp_path: Path, loops: Loops) -> None:
    src = write_random(tmp_path / "src.img", 4 * MiB, seed=64)
    backing = write_random(tmp_path / "backing.img", 2 * MiB, seed=65)
    dev = loops.attach(backing)
    before = read_at(dev, 0, 2 * MiB)
    r, uri = runner.recv(dev, "--force")
    s = runner.send([src], uri)
    s_rc, r_rc = s.wait(), r.wait()
    assert (s_rc, r_rc) == (7, 7), f"send: {s.stderr}\nrecv: {r.stderr}"
    assert "bytes" in error_lines(r)[0], r.stderr
    assert read_at(dev, 0, 2 * MiB) == before  # refused before a byte was written


def test_several_sources_into_a_device_are_refused(runner: Runner, tmp_path: Path,
                                                   loops: Loops) -> None:
    a = write_random(tmp_path / "a.img", 256 * KiB, seed=66)
    b = write_random(tmp_path / "b.img", 256 * KiB, seed=67)
    backing = write_random(tmp_path / "backing.img", 2 * MiB, seed=68)
    dev = loops.attach(backing)
    before = read_at(dev, 0, 2 * MiB)
    r, uri = runner.recv(dev, "--force")
    s = runner.send([a, b], uri)
    s_rc, r_rc = s.wait(), r.wait()
    assert (s_rc, r_rc) == (2, 2), f"send: {s.stderr}\nrecv: {r.stderr}"
    assert read_at(dev, 0, 2 * MiB) == before


@pytest.mark.parametrize(
    "outcome", ["complete", pytest.param("interrupted", marks=pytest.mark.slow)],
)
def test_device_dest_first_mib_is_zero_until_the_end(runner: Runner, tmp_path: Path, loops: Loops,
                                                     outcome: str) -> None:
    """While the copy runs (recv slowed) the device's first MiB reads as zeros; at the end
    it is the source's. Interrupted, it stays zeroed (never looks like a valid filesystem)."""
    src = write_random(tmp_path / "src.img", 6 * MiB, seed=69)
    backing = write_random(tmp_path / "backing.img", 6 * MiB, seed=70)
    dev = loops.attach(backing)
    r, uri = runner.recv(dev, "--force", "--json-interval", "0.1", env=SLOW_RECV)
    s = runner.send([src], uri, "--packet-size", "64K")
    wait_event(r, receiving)
    for _ in range(3):
        assert read_at(dev, 0, MiB) == bytes(MiB)
        time.sleep(0.2)
    assert r.popen.poll() is None, "the migration ended before the device was looked at"
    if outcome == "complete":
        check_ok(s.wait(), r.wait(), s, r)
        assert read_at(dev, 0, 6 * MiB) == src.read_bytes()
    else:
        killpg(s)
        s.popen.wait(10)
        assert r.wait(60) == 3, r.stderr
        assert read_at(dev, 0, MiB) == bytes(MiB)


# -- 7. --preserve -----------------------------------------------------------------------------


MTIME_NS = 1_500_000_000_123_456_789  # July 2017, with nanoseconds


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _set_metadata(path: Path, mode: int, xattr: bytes) -> bool:
    """Mode, owner (as root), xattr user.test, mtime in the past. False if no xattrs here."""
    if IS_ROOT:
        os.chown(path, 1234, 1234)
    os.chmod(path, mode)
    try:
        os.setxattr(path, "user.test", xattr)
        has_xattr = True
    except OSError:
        has_xattr = False
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return has_xattr


def _check_metadata(path: Path, mode: int, xattr: bytes | None) -> None:
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)
    assert st.st_mtime_ns == MTIME_NS, st.st_mtime_ns
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (1234, 1234)
    if xattr is not None:
        assert os.getxattr(path, "user.test") == xattr


def test_preserve_one_file(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.img", 1 * MiB + 10, seed=71)
    has_xattr = _set_metadata(src, 0o640, b"hello \x00 world")
    dest = tmp_path / "dest.img"
    m = runner.migrate(src, dest, ("--preserve",))
    check_ok(*m.wait(), m.send, m.recv)
    assert sha256(dest) == sha256(src)
    _check_metadata(dest, 0o640, b"hello \x00 world" if has_xattr else None)


def test_preserve_several_sources(runner: Runner, tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    a = write_random(tmp_path / "src" / "a.img", 512 * KiB, seed=72)
    b = write_random(tmp_path / "src" / "sub" / "b.img", 256 * KiB, seed=73)
    xa = _set_metadata(a, 0o600, b"first")
    xb = _set_metadata(b, 0o751, b"second")
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send([a, b], uri, "--preserve")
    check_ok(s.wait(), r.wait(), s, r)
    assert tree(dest) == {"a.img": sha256(a), "sub/b.img": sha256(b)}
    _check_metadata(dest / "a.img", 0o600, b"first" if xa else None)
    _check_metadata(dest / "sub" / "b.img", 0o751, b"second" if xb else None)


@pytest.mark.skipif(not IS_ROOT, reason="a setuid file owned by another user needs root")
@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6750], ids=oct)
def test_preserve_keeps_setuid_and_setgid_bits(runner: Runner, tmp_path: Path, mode: int) -> None:
    """Like rsync -a as root: the owner is set before the mode, since chown clears the
    set-user-ID and set-group-ID bits of an executable."""
    src = write_random(tmp_path / "tool", 64 * KiB, seed=74)
    _set_metadata(src, mode, b"x")
    assert stat.S_IMODE(src.stat().st_mode) == mode
    dest = tmp_path / "dest"
    m = runner.migrate(src, dest, ("--preserve",))
    check_ok(*m.wait(), m.send, m.recv)
    assert oct(stat.S_IMODE(dest.stat().st_mode)) == oct(mode)
    assert (dest.stat().st_uid, dest.stat().st_gid) == (1234, 1234)


def test_without_preserve_mode_is_0644_less_umask(runner: Runner, tmp_path: Path) -> None:
    src = write_random(tmp_path / "src.img", 256 * KiB, seed=75)
    _set_metadata(src, 0o751, b"dropped")
    dest = tmp_path / "dest.img"
    m = runner.migrate(src, dest)
    check_ok(*m.wait(), m.send, m.recv)
    st = dest.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 & ~_umask()
    assert st.st_mtime_ns != MTIME_NS
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    with pytest.raises(OSError):
        os.getxattr(dest, "user.test")


# -- 8. hostile block names --------------------------------------------------------------------


def fake_send(uri: str, names: list[str]) -> list[P.Message]:
    """HELLO(main), WELCOME, CONFIG, LAYOUT with these block names; what recv answered."""
    assert uri.startswith("tcp:"), uri
    host, port = uri[4:].rsplit(":", 1)
    session = os.urandom(16)
    dec = P.Decoder()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(P.encode_hello(P.ROLE_MAIN, session))
        welcome = read_message(sock, dec)
        assert isinstance(welcome, P.Welcome) and welcome.session == session, welcome
        layout = P.Layout(tuple(P.BlockInfo(n, 8192, 8192) for n in names))
        sock.sendall(P.encode_config(P.Config(1, 0, 0, 4096, 64 * KiB)) + P.encode_layout(layout))
        answers: list[P.Message] = []
        while (msg := read_message(sock, dec)) is not None:
            answers.append(msg)
            if isinstance(msg, (P.Abort, P.Accept)):
                break
        return answers


def _evil_anywhere(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if "evil" in n]


def _hostile(tmp_path: Path, case: str) -> list[str]:
    outside = tmp_path / "outside"
    return {
        "dotdot": ["ok.img", "../evil"],
        "absolute": ["ok.img", str(outside / "evil-abs")],
        "abs-root": ["/evil-root-multifd-test"],
        "inner-dotdot": ["ok.img", "a/../../evil-x"],
        "deep-dotdot": ["ok.img", "a/b/../../../evil-deep"],
        "dot": ["ok.img", "./evil-dot"],
        "empty-component": ["ok.img", "a//evil-empty"],
        "trailing-slash": ["ok.img", "evil-dir/"],
        "nul": ["ok.img", "evil\x00x"],
        "empty": ["ok.img", ""],
        "duplicate": ["evil-dup.img", "evil-dup.img"],
    }[case]


@pytest.mark.parametrize("case", [
    "dotdot", "absolute", "abs-root", "inner-dotdot", "deep-dotdot", "dot", "empty-component",
    "trailing-slash", "nul", "empty", "duplicate",
])
def test_hostile_block_names_are_a_protocol_error(runner: Runner, tmp_path: Path, case: str) -> None:
    (tmp_path / "outside").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest"
    r, uri = runner.recv(dest)
    answers = fake_send(uri, _hostile(tmp_path, case))
    assert not any(isinstance(m, P.Accept) for m in answers), answers
    aborts = [m for m in answers if isinstance(m, P.Abort)]
    assert aborts and aborts[0].exit_code == 4, answers
    assert "block name" in aborts[0].message, aborts[0]
    # Before ACCEPT there is no session: recv refuses this one and keeps listening.
    time.sleep(0.2)
    assert r.popen.poll() is None, r.read_stderr()
    killpg(r)
    r.wait(10)
    assert not os.path.lexists(dest)
    assert leftovers(dest) == []
    assert _evil_anywhere(tmp_path) == []
    assert not os.path.lexists("/evil-root-multifd-test")
    assert os.listdir(tmp_path / "outside") == []


def test_fake_send_with_good_names_is_accepted(runner: Runner, tmp_path: Path) -> None:
    """Control for the hostile-name tests: the same fake send with plain names gets ACCEPT,
    so the exit 4 above comes from the names and not from a broken fake."""
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    answers = fake_send(uri, ["ok.img", "sub/fine.img", "..dots-are-fine", "a.b/c..d"])
    assert any(isinstance(m, P.Accept) for m in answers), answers
    killpg(r)
    r.wait(10)
    assert not os.path.lexists(dest)


# -- more edges --------------------------------------------------------------------------------


def test_source_whose_name_contains_equals(runner: Runner, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing file named `k=v.img` is a path, not PATH=NAME; `a.img=v2.img` renames."""
    a = write_random(tmp_path / "a.img", 64 * KiB, seed=81)
    kv = write_random(tmp_path / "k=v.img", 64 * KiB, seed=82)
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send(["k=v.img", "a.img=v2.img"], uri)  # type: ignore[list-item]
    check_ok(s.wait(), r.wait(), s, r)
    assert tree(dest) == {"k=v.img": sha256(kv), "v2.img": sha256(a)}


@pytest.mark.parametrize("size", [0, pytest.param(512 * KiB, marks=pytest.mark.slow), 1 * MiB,
                                  pytest.param(1 * MiB + 1, marks=pytest.mark.slow)], ids=str)
def test_blob_sizes_at_chunk_boundaries(runner: Runner, tmp_path: Path, sleeper: int,
                                        size: int) -> None:
    src = write_random(tmp_path / "disk.img", 256 * KiB, seed=83)
    state = write_random(tmp_path / "st", size, seed=84)
    dest = tmp_path / "vm"
    r, uri = runner.recv(dest)
    s = runner.send([src], uri, "--pause-pid", str(sleeper), "--state-file", str(state))
    check_ok(s.wait(), r.wait(), s, r)
    _blob_checks(s, r, "st", size)
    assert tree(dest) == {"disk.img": sha256(src), "st": sha256(state)}


def test_failed_migration_leaves_an_existing_dir_dest_untouched(runner: Runner,
                                                                tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    a = write_random(src / "a.img", 4 * MiB, seed=85)
    b = write_random(src / "b.img", 4 * MiB, seed=86)
    dest = tmp_path / "dest"
    before = _old_dest(dest)
    r, uri = runner.recv(dest, "--force", "--json-interval", "0.1", env=SLOW_RECV)
    s = runner.send([a, b], uri, "--packet-size", "64K")
    wait_event(r, receiving)
    killpg(s)
    s.popen.wait(10)
    assert r.wait(60) == 3, r.stderr
    assert tree(dest) == before
    assert leftovers(dest) == []
    assert not os.path.lexists(tmp_path / "dest.partial")


def test_keep_partial_replaces_an_old_partial_file(runner: Runner, tmp_path: Path) -> None:
    """A DEST.partial kept by an earlier single-file run is a file; a failed directory
    run with --keep-partial replaces it, and leaves nothing hidden next to DEST."""
    src = tmp_path / "src"
    src.mkdir()
    a = write_random(src / "a.img", 4 * MiB, seed=87)
    b = write_random(src / "b.img", 4 * MiB, seed=88)
    dest = tmp_path / "dest"
    write_random(tmp_path / "dest.partial", 64 * KiB, seed=89)
    r, uri = runner.recv(dest, "--keep-partial", "--json-interval", "0.1", env=SLOW_RECV)
    s = runner.send([a, b], uri, "--packet-size", "64K")
    wait_event(r, receiving)
    killpg(s)
    s.popen.wait(10)
    assert r.wait(60) == 3, r.stderr
    assert (tmp_path / "dest.partial").is_dir()
    assert set(tree(tmp_path / "dest.partial")) == {"a.img", "b.img"}
    assert not os.path.lexists(dest)
    assert leftovers(dest) == []


def test_block_named_like_a_directory_of_another(runner: Runner, tmp_path: Path) -> None:
    """`x=disks` and `y=disks/b.img` cannot both exist under DEST: refused before connecting."""
    a = write_random(tmp_path / "a.img", 64 * KiB, seed=90)
    b = write_random(tmp_path / "b.img", 64 * KiB, seed=91)
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send([f"{a}=disks", f"{b}=disks/b.img"], uri)  # type: ignore[list-item]
    s_rc = s.wait(30)
    r_alive = r.popen.poll() is None
    killpg(r)
    r.wait(10)
    assert s_rc == 2, f"send {s_rc}: {s.stderr}\nrecv: {r.stderr}"
    assert r_alive, "send connected before refusing the names"
    assert not os.path.lexists(dest)
    assert leftovers(dest) == []


def test_single_source_into_existing_dir_dest_is_refused_up_front(runner: Runner,
                                                                   tmp_path: Path) -> None:
    """One source cannot replace a directory DEST even with --force. The mirror case (several
    sources into an existing file DEST) is refused at LAYOUT with exit 2, before any page is
    sent; this one should be too, not after the whole copy with exit 7."""
    src = write_random(tmp_path / "src.img", 256 * KiB, seed=92)
    dest = tmp_path / "dest"
    before = _old_dest(dest)
    m = runner.migrate(src, dest, recv_args=("--force",))
    s_rc, r_rc = m.wait()
    assert tree(dest) == before
    assert leftovers(dest) == []
    assert (s_rc, r_rc) == (2, 2), f"send {s_rc}: {m.send.stderr}\nrecv {r_rc}: {m.recv.stderr}"
    assert m.send.of("pass") == []


def test_several_sources_into_existing_file_dest_are_refused_up_front(runner: Runner,
                                                                      tmp_path: Path) -> None:
    a = write_random(tmp_path / "a.img", 64 * KiB, seed=95)
    b = write_random(tmp_path / "b.img", 64 * KiB, seed=96)
    dest = write_random(tmp_path / "dest", 4 * KiB, seed=97)
    before = sha256(dest)
    r, uri = runner.recv(dest, "--force")
    s = runner.send([a, b], uri)
    assert (s.wait(), r.wait()) == (2, 2), f"send: {s.stderr}\nrecv: {r.stderr}"
    assert s.of("pass") == []
    assert sha256(dest) == before
    assert leftovers(dest) == []


def test_preserve_into_a_device_leaves_the_device_node_alone(runner: Runner, tmp_path: Path,
                                                             loops: Loops) -> None:
    """--preserve describes the source file; a device DEST is "never truncated or renamed",
    and its node's mode and owner are the host's, not the sender's: a sender must not be
    able to make /dev/loopN mode 0666 or owned by uid 1234 on the destination."""
    src = write_random(tmp_path / "src.img", 1 * MiB, seed=93)
    _set_metadata(src, 0o666, b"x")
    backing = write_random(tmp_path / "backing.img", 2 * MiB, seed=94)
    dev = loops.attach(backing)
    node = os.stat(dev)
    r, uri = runner.recv(dev, "--force")
    s = runner.send([src], uri, "--preserve")
    check_ok(s.wait(), r.wait(), s, r)
    assert read_at(dev, 0, MiB) == src.read_bytes()
    after = os.stat(dev)
    assert stat.S_ISBLK(after.st_mode)
    assert (oct(after.st_mode), after.st_uid, after.st_gid) == (
        oct(node.st_mode), node.st_uid, node.st_gid)


# -- heavier variants --------------------------------------------------------------------------


@pytest.mark.slow
def test_many_sources_nested_with_compression(runner: Runner, tmp_path: Path) -> None:
    src = tmp_path / "src"
    want: dict[str, str] = {}
    for i in range(40):
        rel = Path(f"d{i % 4}") / f"e{i % 3}" / f"f{i}.img"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        p = write_mixed(src / rel, (i * 37 + 1) * 4 * KiB + i, seed=100 + i)
        want[str(rel)] = sha256(p)
    (src / "empty.img").write_bytes(b"")
    want["empty.img"] = sha256(src / "empty.img")
    dest = tmp_path / "dest"
    r, uri = runner.recv(dest)
    s = runner.send(sorted(src.rglob("*.img")), uri, "--compress", "zstd", "--channels", "3")
    check_ok(s.wait(), r.wait(), s, r)
    assert tree(dest) == want
    assert leftovers(dest) == []
