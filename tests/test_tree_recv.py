"""The receiving side of directory-tree sessions (issue 12), against a real `multifd recv`.

Most tests drive recv with a fake source built from the wire encoders, so that each
rule of docs/protocol.md "Directory trees" and "Acknowledged epochs" is checked on its
own: TREE operations wait for the epoch barrier, a wrong epoch or another channel's
file is refused, a DEST inside the source is refused, and after any failure nothing
is left at DEST nor beside it. The end-to-end tests at the bottom run the real
`multifd send DIR` and compare the copy with the source path by path, independently of
the manifest both sides compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers.mfdkit import Kit, assert_within, hostport, read_message

from multifd_cli import wire as P
from multifd_cli.common.manifest import ManifestOptions, walk_manifest
from multifd_cli.common.tables import FileTables, page_hash, tree_digest
from multifd_cli.wire.treeops import Op, TreeOp

KiB = 1 << 10
PS = 4096
IS_ROOT = os.geteuid() == 0


def boot_id() -> bytes:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return uuid.UUID(f.read().strip()).bytes


def dev_ino(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def leftovers(parent: Path, name: str) -> list[str]:
    """What of DEST (or a staging directory of it) exists in PARENT."""
    return sorted(n for n in os.listdir(parent) if n == name or n.startswith(f".{name}.multifd-"))


# -- a fake source, speaking the protocol with the wire encoders --------------------------------


class FakeTreeSource:
    """The main connection and the channels of a tree session, driven step by step."""

    def __init__(self, uri: str, *, channels: int = 2, size: int = 0,
                 root: P.TreeRoot | None = None) -> None:
        host, port = hostport(uri)
        self.addr = (host, port)
        self.n = channels
        self.session = os.urandom(16)
        self.main = socket.create_connection(self.addr, timeout=10)
        self.dec = P.Decoder()
        self.main.sendall(P.encode_hello(P.ROLE_MAIN, self.session))
        assert isinstance(read_message(self.main, self.dec), P.Welcome)
        root = root or P.TreeRoot(bytes(16), ((1, 1),))  # another host: no overlap check
        self.main.sendall(
            P.encode_config(P.Config(channels, 0, 0, PS, 64 * KiB))
            + P.encode_layout(P.Layout((P.BlockInfo("", size, size, P.KIND_TREE),)))
            + P.encode(root)
        )
        self.answer = read_message(self.main, self.dec)
        self.chans: list[socket.socket] = []
        self.packet_num = [0] * channels
        self.counts = [P.Counts()] * channels
        self.tables = [FileTables() for _ in range(channels)]

    def connect_channels(self) -> None:
        for i in range(self.n):
            s = socket.create_connection(self.addr, timeout=10)
            s.sendall(P.encode_hello(i, self.session))
            assert isinstance(read_message(s, P.Decoder()), P.Welcome)
            self.chans.append(s)

    def send(self, *msgs: P.Message) -> None:
        self.main.sendall(b"".join(P.encode(m) for m in msgs))

    def pages(self, ch: int, epoch: int, fid: int, data: bytes, *, zero: bool = False) -> None:
        """Every page of file FID with content DATA, in one packet on channel CH."""
        offs = [(fid << P.TREE_SHIFT) | o for o in range(0, len(data), PS)]
        chunks = [data[o : o + PS] for o in range(0, len(data), PS)]
        t = self.tables[ch].entry(fid)
        t[0] = len(data)
        del t[1:]
        t.extend(page_hash(c) for c in chunks)
        if zero:
            parts = P.encode_packet(epoch=epoch, packet_num=self.packet_num[ch], block=0,
                                    normal_offsets=[], zero_offsets=offs, hashes=[], payload=b"")
            counts = P.Counts(1, 0, len(offs))
        else:
            parts = P.encode_packet(epoch=epoch, packet_num=self.packet_num[ch], block=0,
                                    normal_offsets=offs, zero_offsets=[],
                                    hashes=[page_hash(c) for c in chunks], payload=data)
            counts = P.Counts(1, len(offs), 0)
        self.chans[ch].sendall(b"".join(bytes(p) for p in parts))
        self.packet_num[ch] += 1
        self.counts[ch] = self.counts[ch] + counts

    def sync(self, ch: int, epoch: int) -> None:
        self.chans[ch].sendall(P.encode_sync(epoch, self.packet_num[ch], self.counts[ch]))
        self.packet_num[ch] += 1

    def end(self, epoch: int) -> None:
        """EPOCH_END with the channels' totals (each channel's SYNC is the test's to send)."""
        self.send(P.EpochEnd(epoch, sum(self.counts, P.Counts())))
        self.counts = [P.Counts()] * self.n

    def digest(self, gone: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
        for t in self.tables:
            t.forget(gone)
        return tree_digest(t.digest(PS) for t in self.tables)

    def read(self, timeout: float = 10.0) -> Any:
        return read_message(self.main, self.dec, timeout)

    def close(self) -> None:
        for s in [self.main, *self.chans]:
            s.close()


def manifest_of(src: Path) -> P.Manifest:
    b = walk_manifest(src, ManifestOptions(True, IS_ROOT, IS_ROOT))
    return P.Manifest(b.count, b.digest())


def finish_ops(src: Path, fids: dict[str, int]) -> list[TreeOp]:
    """TIMES for every file and DIRMETA for every directory of SRC, as the source would."""
    times, dirs = [], []
    for top, _dnames, fnames in os.walk(src, topdown=True):
        rel = os.path.relpath(top, src)
        relb = b"" if rel == "." else os.fsencode(rel)
        st = os.lstat(top)
        dirs.append(TreeOp(Op.DIRMETA, relb, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                           mtime_ns=st.st_mtime_ns))
        for f in sorted(fnames):
            p = os.path.join(top, f)
            path = os.path.relpath(p, src)
            times.append(TreeOp(Op.TIMES, os.fsencode(path), fids.get(path, -1),
                                mtime_ns=os.lstat(p).st_mtime_ns))
    dirs.sort(key=lambda op: -op.path.count(b"/") - (1 if op.path else 0))
    return times + dirs


def staged(dest: Path) -> Path | None:
    """The staging tree of DEST while recv builds it."""
    for n in os.listdir(dest.parent):
        if n.startswith(f".{dest.name}.multifd-") and (dest.parent / n / "tree").is_dir():
            return dest.parent / n / "tree"
    return None


def wait_done(recv: Any, code: int) -> str:
    done = recv.wait(30)
    if code == 0:
        done.ok()
        return ""
    return str(done.error(code))


# -- the conversation -----------------------------------------------------------------------------


def test_tree_ops_wait_for_the_barrier_and_the_copy_completes(kit: Kit, tmp_path: Path) -> None:
    """Shape ops of epoch 3 arrive while a channel still applies epoch 2: they must not
    land before that channel's SYNC; each closed epoch is acknowledged with its bytes."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    f0 = os.urandom(5000)
    (src / "d" / "f").write_bytes(f0)
    dest = tmp_path / "dest"
    recv, uri = kit.recv(dest)
    fake = FakeTreeSource(uri, size=5010)
    assert isinstance(fake.answer, P.Accept), fake.answer
    assert fake.answer.owners == IS_ROOT
    fake.send(P.Tree(1, (
        TreeOp(Op.MKDIR, b"d", mode=0o40755),
        TreeOp(Op.CREATE, b"d/f", 0, mode=0o100644, size=5000),
        TreeOp(Op.CREATE, b"g", 1, mode=0o100600, size=10),
    )), P.EpochStart(1, (5010,)))
    fake.connect_channels()
    fake.pages(0, 1, 0, f0)
    fake.pages(1, 1, 1, b"0123456789")
    fake.sync(0, 1)
    fake.sync(1, 1)
    fake.end(1)
    ack = fake.read()
    assert ack == P.EpochAck(1, ack.wire_bytes, 5010, ack.flush_us), ack
    assert ack.wire_bytes > 5010

    # Epoch 2: channel 1 holds back its SYNC while epoch 3's shape arrives.
    f0 = f0[:4096] + os.urandom(904)
    (src / "d" / "f").write_bytes(f0)
    fake.send(P.EpochStart(2, (5010,)))
    fake.pages(0, 2, 0, f0)
    fake.sync(0, 2)
    fake.end(2)
    h = os.urandom(3 * PS + 7)
    (src / "h").write_bytes(h)
    fake.send(P.Tree(3, (
        TreeOp(Op.UNLINK, b"g", 1), TreeOp(Op.DROP, fid=1),
        TreeOp(Op.CREATE, b"h", 3, mode=0o100640, size=len(h)),
    )), P.EpochStart(3, (5000 + len(h),)))
    stage = staged(dest)
    assert stage is not None
    time.sleep(0.5)
    assert (stage / "g").exists() and not (stage / "h").exists(), os.listdir(stage)
    fake.sync(1, 2)  # now epoch 2 closes, and epoch 3's shape lands before its pages
    ack = fake.read()
    assert isinstance(ack, P.EpochAck) and ack.epoch == 2, ack
    assert_within(lambda: (stage / "h").exists() and not (stage / "g").exists(), 5,
                  "epoch 3's shape applied once epoch 2 closed")
    fake.pages(1, 3, 3, h)
    fake.sync(0, 3)
    fake.sync(1, 3)
    fake.end(3)
    os.chmod(src / "h", 0o640)
    os.chmod(src / "d", 0o750)
    os.utime(src / "d", ns=(1_600_000_000_000_000_000,) * 2)
    fake.send(P.Tree(3, tuple(finish_ops(src, {"d/f": 0, "h": 3}))), manifest_of(src),
              P.Digest(3, fake.digest({1})))
    msgs = [fake.read(), fake.read()]
    assert isinstance(msgs[0], P.EpochAck) and msgs[0].epoch == 3, msgs
    assert isinstance(msgs[1], P.Complete), msgs
    wait_done(recv, 0)
    fake.close()
    assert (dest / "d" / "f").read_bytes() == f0
    assert (dest / "h").read_bytes() == h
    assert not (dest / "g").exists()
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o750
    assert (dest / "d").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert leftovers(tmp_path, "dest") == ["dest"]


def _accepted(kit: Kit, tmp_path: Path, channels: int = 2) -> tuple[Any, FakeTreeSource, Path]:
    dest = tmp_path / "dest"
    recv, uri = kit.recv(dest)
    fake = FakeTreeSource(uri, channels=channels, size=PS)
    assert isinstance(fake.answer, P.Accept), fake.answer
    fake.connect_channels()
    return recv, fake, dest


def _aborted(fake: FakeTreeSource) -> P.Abort:
    while True:
        msg = fake.read()
        if msg is None or isinstance(msg, P.Abort):
            assert msg is not None, "recv closed without ABORT"
            return msg


@pytest.mark.parametrize("case", ["future-epoch", "epoch-0", "times-before-start",
                                  "shape-after-end"])
def test_tree_ops_for_a_wrong_epoch_are_refused(kit: Kit, tmp_path: Path, case: str) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    mkdir = TreeOp(Op.MKDIR, b"x", mode=0o40755)
    if case == "future-epoch":
        fake.send(P.Tree(2, (mkdir,)))
    elif case == "epoch-0":
        fake.send(P.Tree(0, (mkdir,)))
    elif case == "times-before-start":
        fake.send(P.Tree(1, (TreeOp(Op.TIMES, b"x", mtime_ns=1),)))
    else:
        fake.send(P.Tree(1, (mkdir,)), P.EpochStart(1, (0,)))
        fake.sync(0, 1)
        fake.sync(1, 1)
        fake.end(1)
        assert isinstance(fake.read(), P.EpochAck)
        fake.send(P.Tree(1, (TreeOp(Op.MKDIR, b"y", mode=0o40755),)))
    ab = _aborted(fake)
    assert ab.exit_code == 4 and "TREE" in ab.message, ab
    assert "TREE" in wait_done(recv, 4)
    fake.close()
    assert leftovers(tmp_path, "dest") == []


@pytest.mark.parametrize("case", ["other-channel", "past-the-end", "unknown-file"])
def test_a_page_for_a_file_this_channel_does_not_own_is_refused(
        kit: Kit, tmp_path: Path, case: str) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    fake.send(P.Tree(1, (TreeOp(Op.CREATE, b"a", 0, mode=0o100644, size=100),
                         TreeOp(Op.CREATE, b"b", 1, mode=0o100644, size=100))),
              P.EpochStart(1, (200,)))
    if case == "other-channel":
        fake.pages(0, 1, 1, b"x" * 100)  # file id 1 belongs to channel 1
        want = "tree file id 1 on channel 0"
    elif case == "past-the-end":
        fake.pages(0, 1, 0, b"x" * (PS + 1))  # the file holds 100 bytes
        want = "page offset in tree file id 0"
    else:
        fake.pages(0, 1, 4, b"x" * 100)
        want = "tree does not hold"
    ab = _aborted(fake)
    assert ab.exit_code == 4 and want in ab.message, ab
    assert want in wait_done(recv, 4)
    fake.close()
    assert leftovers(tmp_path, "dest") == []


def test_a_corrupt_tree_page_fails_verification(kit: Kit, tmp_path: Path) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    fake.send(P.Tree(1, (TreeOp(Op.CREATE, b"a", 0, mode=0o100644, size=100),)),
              P.EpochStart(1, (100,)))
    parts = P.encode_packet(epoch=1, packet_num=0, block=0, normal_offsets=[0],
                            zero_offsets=[], hashes=[page_hash(b"y" * 100)], payload=b"x" * 100)
    fake.chans[0].sendall(b"".join(bytes(p) for p in parts))
    assert "tree file id 0" in wait_done(recv, 6)
    fake.close()
    assert leftovers(tmp_path, "dest") == []


@pytest.mark.parametrize("case", ["manifest", "digest"])
def test_a_tree_that_differs_from_the_source_is_not_published(
        kit: Kit, tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(PS + 10)
    (src / "a").write_bytes(data)
    recv, fake, dest = _accepted(kit, tmp_path)
    fake.send(P.Tree(1, (TreeOp(Op.CREATE, b"a", 0, mode=0o100644, size=len(data)),)),
              P.EpochStart(1, (len(data),)))
    fake.pages(0, 1, 0, data)
    fake.sync(0, 1)
    fake.sync(1, 1)
    fake.end(1)
    manifest, digest = manifest_of(src), fake.digest()
    finish = finish_ops(src, {"a": 0})
    if case == "manifest":
        (src / "empty").mkdir()  # a directory the copy never got
        os.utime(src, ns=(os.stat(src).st_mtime_ns,) * 2)
        manifest = manifest_of(src)
    else:
        digest = bytes(16)
    fake.send(P.Tree(1, tuple(finish)), manifest, P.Digest(1, digest))
    err = wait_done(recv, 6)
    assert ("tree verification failed" in err) if case == "manifest" else ("digest" in err), err
    fake.close()
    assert leftovers(tmp_path, "dest") == []


def test_a_name_too_long_for_dest_is_an_io_error_and_leaves_nothing(
        kit: Kit, tmp_path: Path) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    fake.send(P.Tree(1, (TreeOp(Op.MKDIR, b"ok", mode=0o40755),
                         TreeOp(Op.MKDIR, b"ok/" + b"n" * 300, mode=0o40755))))
    ab = _aborted(fake)
    assert ab.exit_code == 7 and "name too long" in ab.message, ab
    wait_done(recv, 7)
    fake.close()
    assert leftovers(tmp_path, "dest") == []


# -- refused session starts ----------------------------------------------------------------------


def _refused(kit: Kit, dest: Path, root: P.TreeRoot, *args: str) -> tuple[Any, P.Message]:
    recv, uri = kit.recv(dest, *args)
    fake = FakeTreeSource(uri, root=root)
    answer = fake.answer
    fake.close()
    return recv, answer


def test_dest_inside_the_source_is_refused_and_recv_keeps_listening(
        kit: Kit, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    dest = src / "sub" / "dest"
    root = P.TreeRoot(boot_id(), (dev_ino(src), dev_ino(tmp_path)))
    recv, answer = _refused(kit, dest, root)
    assert isinstance(answer, P.Abort) and answer.exit_code == 2, answer
    assert "inside the source" in answer.message, answer
    time.sleep(0.2)
    assert recv.alive(), recv.stderr  # no session yet: a real source may still come
    # The negative control: the same ids from another host say nothing about ours.
    other = P.TreeRoot(bytes(16), root.ids)
    recv.kill()
    recv2, answer2 = _refused(kit, dest, other)
    assert isinstance(answer2, P.Accept), answer2
    recv2.kill()
    assert "dest" not in os.listdir(src / "sub")


def test_source_inside_dest_is_refused_even_with_force(kit: Kit, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "src").mkdir(parents=True)
    root = P.TreeRoot(boot_id(), (dev_ino(dest / "src"), dev_ino(dest), dev_ino(tmp_path)))
    recv, answer = _refused(kit, dest, root, "--force")
    assert isinstance(answer, P.Abort) and answer.exit_code == 2, answer
    assert "inside the destination" in answer.message, answer
    assert os.listdir(dest) == ["src"]


@pytest.mark.parametrize("flag", ["--resume", "--keep-partial"])
def test_resume_and_keep_partial_refuse_a_tree(kit: Kit, tmp_path: Path, flag: str) -> None:
    recv, answer = _refused(kit, tmp_path / "dest", P.TreeRoot(bytes(16), ((1, 1),)), flag)
    assert isinstance(answer, P.Abort) and answer.exit_code == 2, answer
    assert flag in answer.message, answer
    assert leftovers(tmp_path, "dest") == []


def test_a_killed_recv_leaves_a_staging_dir_that_the_next_one_removes(
        kit: Kit, tmp_path: Path) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    fake.send(P.Tree(1, (TreeOp(Op.MKDIR, b"x", mode=0o40755),)))
    assert_within(lambda: (stage := staged(dest)) is not None and (stage / "x").exists(), 5,
                  "the staging tree")
    recv.signal(signal.SIGKILL)
    recv.wait(10)
    fake.close()
    stale = leftovers(tmp_path, "dest")
    assert stale and all(n.startswith(".dest.multifd-") for n in stale), stale
    recv2, uri = kit.recv(dest)
    assert leftovers(tmp_path, "dest") == []
    recv2.kill()


# -- end to end, with the real send ---------------------------------------------------------------


def describe(root: Path, owners: bool = IS_ROOT) -> dict[str, tuple[Any, ...]]:
    """Every path below ROOT with its type, mode, size, mtime, target, content hash and
    hard-link group (the sorted paths sharing its inode): computed here, not by the
    manifest code both sides share."""
    out: dict[str, tuple[Any, ...]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_size if kind != stat.S_IFDIR else 0,
                        mtime, extra, (st.st_uid, st.st_gid) if owners else None)
    for members in groups.values():
        for rel in members:
            out[rel] = (*out[rel], tuple(sorted(members)))
    return out


def make_static_tree(src: Path, many: int = 300) -> None:
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty" / "deeper").mkdir(parents=True)
    (src / "a" / "big").write_bytes(os.urandom(300 * KiB + 17))
    (src / "a" / "b" / "small").write_bytes(b"hello\n")
    (src / "zeros").write_bytes(bytes(3 * PS + 5))
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.seek(512 * KiB)
        f.write(b"middle")
    (src / "empty-file").write_bytes(b"")
    os.link(src / "a" / "big", src / "hard")
    os.link(src / "a" / "big", src / "a" / "b" / "hard2")
    os.symlink("a/b/small", src / "link")
    os.symlink("/nowhere/at/all", src / "dangling")
    os.mkfifo(src / "fifo")
    for i in range(many):  # more files than a channel's descriptor cache holds
        (src / "many" / f"{i % 7}").mkdir(parents=True, exist_ok=True)
        (src / "many" / f"{i % 7}" / f"f{i}").write_bytes(os.urandom(i * 37 % 20000))
    os.chmod(src / "a" / "b" / "small", 0o400)
    os.chmod(src / "a" / "big", 0o751)
    os.chmod(src / "a" / "b", 0o555)
    os.chmod(src / "empty" / "deeper", 0o700)
    os.utime(src / "a", ns=(1_500_000_000_123_456_789,) * 2)
    os.utime(src / "fifo", ns=(1_400_000_000_000_000_000,) * 2)


def _under_ulimit(argv: list[str], n: int) -> list[str]:
    return ["sh", "-c", f'ulimit -n {n} && exec "$@"', "sh", *argv]


def migrate(recv_argv: list[str], send_argv: list[str], src: Path, dest: Path) -> str:
    """Run recv and send, each argv ending with its subcommand (and options), prefixed
    by what runs it (a ulimit, another user); both must succeed. Returns recv's stderr."""
    def cmd(argv: list[str]) -> list[str]:
        i = argv.index("recv" if "recv" in argv else "send")
        return [*argv[:i], sys.executable, "-m", "multifd_cli", *argv[i:]]

    recv = subprocess.Popen([*cmd(recv_argv), "--json", "--timeout", "30", "--listen",
                             "tcp:127.0.0.1:0", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert recv.stdout is not None
        uri = json.loads(recv.stdout.readline())["uri"]
        send = subprocess.run([*cmd(send_argv), "--timeout", "30", str(src), "--to", uri],
                              capture_output=True, text=True, timeout=120)
        assert send.returncode == 0, send.stderr
        _, err = recv.communicate(timeout=60)
        assert recv.returncode == 0, err
        return err
    finally:
        if recv.poll() is None:
            recv.kill()


def test_a_static_tree_is_copied_path_by_path_under_ulimit_256(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_static_tree(src, many=1000)  # over 256 files per channel: no descriptor may leak
    dest = tmp_path / "dest"
    before = describe(src)
    migrate(_under_ulimit(["recv"], 256), _under_ulimit(["send", "--channels", "3"], 256),
            src, dest)
    assert describe(dest) == before
    assert describe(src) == before
    assert leftovers(tmp_path, "dest") == ["dest"]
    # Negative control: the comparison sees a one-byte change of a mode.
    os.chmod(dest / "zeros", 0o600)
    assert describe(dest) != before


def test_force_swaps_an_old_tree_out(kit: Kit, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_static_tree(src)
    dest = tmp_path / "dest"
    (dest / "old" / "ro").mkdir(parents=True)
    (dest / "old" / "ro" / "stale").write_text("old")
    os.chmod(dest / "old" / "ro", 0o555)
    recv, uri = kit.recv(dest, "--force")
    send = kit.send(src, uri)
    assert send.wait(120).code == 0, send.stderr
    wait_done(recv, 0)
    assert describe(dest) == describe(src)
    assert leftovers(tmp_path, "dest") == ["dest"]


def test_dest_inside_the_source_is_refused_end_to_end(kit: Kit, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    recv, uri = kit.recv(src / "dest")
    send = kit.send(src, uri)
    done = send.wait(60)
    assert done.code == 2 and "inside the source" in done.error(2), done
    assert sorted(os.listdir(src)) == ["f"]


SHAPE_WRITER = r'''
import os, random, sys, time
root = sys.argv[1]
rng = random.Random(int(sys.argv[2]))
def scan():
    fs, ds = [], []
    for top, _, names in os.walk(root):
        ds.append(top)
        fs += [p for f in names if os.path.isfile(p := os.path.join(top, f))
               and not os.path.islink(p)]
    return fs, ds
fs, ds = scan()  # kept up to date below; a rescan after any surprise
n = 0
while True:
    n += 1
    r = rng.random()
    try:
        if r < 0.25 or not fs:
            p = os.path.join(rng.choice(ds), f"new{n}")
            with open(p, "wb") as f:
                f.write(os.urandom(rng.randrange(0, 20000)))
            fs.append(p)
        elif r < 0.45:
            with open(rng.choice(fs), "ab") as f:
                f.write(os.urandom(rng.randrange(1, 9000)))
        elif r < 0.55:
            p = rng.choice(fs)
            with open(p + ".tmp", "wb") as f:
                f.write(os.urandom(rng.randrange(0, 12000)))
            os.rename(p + ".tmp", p)
        elif r < 0.65:
            p, q = rng.choice(fs), os.path.join(rng.choice(ds), f"moved{n}")
            os.rename(p, q)
            fs[fs.index(p)] = q
        elif r < 0.73:
            p = rng.choice(fs)
            os.unlink(p)
            fs.remove(p)
        elif r < 0.80:
            d = os.path.join(rng.choice(ds), f"dir{n}")
            os.mkdir(d)
            ds.append(d)
        elif r < 0.85:
            d = rng.choice(ds)
            if d != root and not os.listdir(d):
                os.rmdir(d)
                ds.remove(d)
        elif r < 0.90:
            q = os.path.join(rng.choice(ds), f"link{n}")
            os.link(rng.choice(fs), q)
            fs.append(q)
        elif r < 0.94:
            os.symlink(f"target{n}", os.path.join(rng.choice(ds), f"sym{n}"))
        else:
            p = rng.choice(fs)
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, max(1, os.path.getsize(p))))
                f.write(os.urandom(100))
            os.chmod(p, rng.choice([0o600, 0o644, 0o640]))
    except (OSError, ValueError):
        fs, ds = scan()
    time.sleep(0.004)
'''


@pytest.mark.parametrize("stale", [False, True], ids=["live", "stale-final-walk"])
def test_a_live_tree_is_copied_as_it_was_at_the_pause(
        kit: Kit, tmp_path: Path, stale: bool) -> None:
    """A writer creates, appends, saves atomically, renames, links and deletes files and
    directories while send runs; the copy equals the tree at the pause, path by path.

    The negative control: a final pass that does not walk the tree again
    (MULTIFD_TEST_STALE_TREE=1) may verify, but the path-by-path comparison sees the
    changes it missed."""
    src = tmp_path / "src"
    src.mkdir()
    make_static_tree(src)
    os.chmod(src / "a" / "b", 0o755)  # the writer may add entries anywhere
    script = tmp_path / "shape_writer.py"
    script.write_text(SHAPE_WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(src), "7"])
    try:
        time.sleep(0.5)
        dest = tmp_path / "dest"
        recv, uri = kit.recv(dest, timeout=60)
        env = {"MULTIFD_TEST_STALE_TREE": "1"} if stale else None
        send = kit.send(src, uri, "--pause-pid", str(writer.pid), "--channels", "3",
                        timeout=60, env=env)
        done = send.wait(180)
        if stale and done.code != 0:
            # Send may notice the stale walk itself: a file it sends the reader to where
            # it no longer is (exit 7, "the source changed"), or that no pass read (a
            # refused digest, 6). Refusing is right too, as long as nothing lands at DEST.
            done.error(6, 7)
            recv.wait(30)
            assert leftovers(tmp_path, "dest") == []
            return
        done.ok()
        wait_done(recv, 0)
        assert writer.poll() is None  # still stopped at the pause (keep-paused)
        passes = [e for e in done.events if e.get("event") == "pass"]
        assert len(passes) >= 2 and sum(p["tree_ops"] for p in passes[1:]) > 0, [
            {k: p.get(k) for k in ("pass", "tree_ops", "files_read", "entries")} for p in passes]
        assert (describe(dest) != describe(src)) if stale else (describe(dest) == describe(src))
        assert leftovers(tmp_path, "dest") == ["dest"]
    finally:
        writer.kill()
        writer.wait()


# -- EPOCH_ACK, for every session --------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["file", "tree"])
def test_every_closed_epoch_is_acknowledged_with_what_recv_applied(
        kit: Kit, tmp_path: Path, shape: str) -> None:
    """Recorded between the two ends: one EPOCH_ACK per pass, in order, with recv's
    byte counters rising to what it wrote."""
    if shape == "file":
        src = tmp_path / "src.img"
        src.write_bytes(os.urandom(3 << 20))
        total = 3 << 20
    else:
        src = tmp_path / "src"
        src.mkdir()
        make_static_tree(src)
        inodes = {(st.st_ino, st.st_size) for t, _, fs in os.walk(src) for f in fs
                  if stat.S_ISREG((st := os.lstat(os.path.join(t, f))).st_mode)}
        total = sum(size for _, size in inodes)  # hard links once
    recv, uri = kit.recv(tmp_path / "dest")
    proxy = kit.proxy(uri)
    send = kit.send(src, proxy.uri)
    done = send.wait(60)
    done.ok()
    wait_done(recv, 0)
    passes = len([e for e in done.events if e.get("event") == "pass"])
    main = proxy.leg(P.ROLE_MAIN)
    assert main is not None
    dec = P.Decoder()
    dec.feed(bytes(main.s2c))
    acks = []
    while (m := dec.next_message()) is not None:
        if isinstance(m, P.EpochAck):
            acks.append(m)
    assert [a.epoch for a in acks] == list(range(1, passes + 1)), acks
    written = [a.written_bytes for a in acks]
    assert written == sorted(written) and written[0] > 0, acks
    # Zero pages are punched, not written: "sparse" has one page of data, "zeros" none.
    holes = 0 if shape == "file" else (1 << 20) - PS + 3 * PS + 5
    assert written[-1] == total - holes, (written, total)
    assert all(a.wire_bytes >= a.written_bytes for a in acks), acks
    assert acks[0].flush_us == 0, acks  # no flush of DEST has finished before the first close


@pytest.mark.skipif(not IS_ROOT, reason="runs recv as nobody and makes a device node: needs root")
def test_a_recv_without_root_skips_device_nodes_with_one_warning(tmp_path: Path) -> None:
    """Without root recv keeps no owners and cannot make device nodes: ACCEPT says so,
    both manifests leave them out, and one warning names what was skipped. Read-only
    directories and a 0400 file still land (the applier lifts a mode just to open)."""
    src = tmp_path / "src"
    src.mkdir()
    make_static_tree(src)
    os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.chown(src / "a" / "big", 1234, 1234)
    work = Path(tempfile.mkdtemp(prefix="mfd-tree-nonroot-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        os.chown(work, 65534, 65534)
        dest = work / "dest"
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        err = migrate([*as_nobody, "recv"], ["send"], src, dest)
        warnings = [ln for ln in err.splitlines() if "skipped" in ln]
        assert len(warnings) == 1 and "null" in warnings[0], err
        want = describe(src, owners=False)
        del want["null"]
        assert describe(dest, owners=False) == want
        assert {os.lstat(os.path.join(t, f)).st_uid for t, _, fs in os.walk(dest) for f in fs} \
            == {65534}
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.parametrize("how", ["source-abort", "sigterm"])
def test_a_session_that_ends_early_leaves_nothing_at_dest(
        kit: Kit, tmp_path: Path, how: str) -> None:
    recv, fake, dest = _accepted(kit, tmp_path)
    data = os.urandom(3 * PS)
    fake.send(P.Tree(1, (TreeOp(Op.MKDIR, b"d", mode=0o40555),
                         TreeOp(Op.CREATE, b"d/f", 0, mode=0o100400, size=len(data)))),
              P.EpochStart(1, (len(data),)))
    fake.pages(0, 1, 0, data)
    assert_within(lambda: (stage := staged(dest)) is not None and (stage / "d" / "f").exists(),
                  5, "the staged file")
    if how == "source-abort":
        fake.send(P.Abort(7, "source: reading went wrong"))
        assert "reading went wrong" in wait_done(recv, 7)
    else:
        recv.signal(signal.SIGTERM)
        done = recv.wait(30)
        assert done.code != 0 and "Traceback" not in done.err, done
    fake.close()
    assert leftovers(tmp_path, "dest") == []


@pytest.mark.skipif(not IS_ROOT, reason="runs recv as nobody: needs root")
def test_a_failed_tree_with_read_only_directories_is_removed_without_root(
        tmp_path: Path) -> None:
    """DIRMETA may leave the staging tree's directories 0555; recv without root must
    still remove all of it when verification then fails."""
    work = Path(tempfile.mkdtemp(prefix="mfd-tree-nonroot-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        os.chown(work, 65534, 65534)
        dest = work / "dest"
        recv = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-m", "multifd_cli", "recv", "--json", "--timeout", "30", "--listen",
             "tcp:127.0.0.1:0", str(dest)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        try:
            assert recv.stdout is not None
            fake = FakeTreeSource(json.loads(recv.stdout.readline())["uri"], size=100)
            assert isinstance(fake.answer, P.Accept) and not fake.answer.owners, fake.answer
            fake.connect_channels()
            data = os.urandom(100)
            fake.send(P.Tree(1, (TreeOp(Op.MKDIR, b"d", mode=0o40555),
                                 TreeOp(Op.CREATE, b"d/f", 0, mode=0o100400, size=100))),
                      P.EpochStart(1, (100,)))
            fake.pages(0, 1, 0, data)
            fake.sync(0, 1)
            fake.sync(1, 1)
            fake.end(1)
            fake.send(P.Tree(1, (TreeOp(Op.TIMES, b"d/f", 0, mtime_ns=10**18),
                                 TreeOp(Op.DIRMETA, b"d", mode=0o40555, mtime_ns=10**18),
                                 TreeOp(Op.DIRMETA, b"", mode=0o40555, mtime_ns=10**18))),
                      P.Manifest(3, bytes(32)), P.Digest(1, fake.digest()))
            _, err = recv.communicate(timeout=60)
            fake.close()
        finally:
            if recv.poll() is None:
                recv.kill()
        assert recv.returncode == 6 and "tree verification failed" in err, err
        assert os.listdir(work) == [], os.listdir(work)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
