"""A directory source's extended attributes under --preserve (issue 12).

The referee here reads xattrs with plain os.listxattr/getxattr on both trees, never with
multifd's code. Static trees: files, directories (the root too), hard links, a value
near ext4's one-block limit, many names; on tmpfs a 64 KiB value and 200 names. Without
--preserve the copy has none. Live: a writer sets, changes and removes xattrs, renames
tagged files and appends to them while the passes run, with --pause-pid; the copy's
xattrs equal the source's at the pause. Negative controls: an xattr removed from the
copy behind recv's back (between passes) fails verification with exit 6, proving the
manifest covers xattrs; a destination that cannot hold a value fails with exit 7.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers.mfdkit import MULTIFD, Kit, assert_within, child_env, read_event
from helpers.treekit import TreeWriter, assert_replica, python_for
from test_tree_shape import migrate, tree_ok

from multifd_cli.common.manifest import ManifestOptions, walk_manifest, xattr_digest
from multifd_cli.errors import ProtocolError
from multifd_cli.recv.tree import TreeApplier
from multifd_cli.send.tree.diff import TreeTracker
from multifd_cli.send.tree.scan import scan_tree
from multifd_cli.wire.treecodec import decode_xattrs, encode_xattrs, parse_tree, tree_payload
from multifd_cli.wire.treeops import Op, TreeOp

ROOT = os.geteuid() == 0
XATTRWRITER = Path(__file__).resolve().parent / "helpers" / "xattrwriter.py"
CARRIED = ("user.", "trusted.", "security.") if ROOT else ("user.",)


def takes_user_xattrs(d: Path, size: int = 1) -> bool:
    probe = d / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"x" * size)
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture(autouse=True)
def _user_xattrs(tmp_path: Path) -> None:
    if not takes_user_xattrs(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses user.* xattrs")


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs, whose xattr values may be 64 KiB (ext4 keeps one block)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path(tempfile.mkdtemp(prefix="mfd-xattr-", dir="/dev/shm"))
    try:
        if not takes_user_xattrs(d, 65536):
            pytest.skip("tmpfs here refuses 64 KiB user.* xattrs")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def xattr_map(root: Path) -> dict[str, dict[bytes, bytes]]:
    """Every entry's carried xattrs (the root is "."), entries without any left out."""
    out: dict[str, dict[bytes, bytes]] = {}
    paths = [str(root)]
    for top, dnames, fnames in os.walk(root):
        paths += [os.path.join(top, n) for n in dnames + fnames]
    for p in paths:
        got = {}
        for name in os.listxattr(p, follow_symlinks=False):
            if name.startswith(CARRIED):
                got[os.fsencode(name)] = os.getxattr(p, name, follow_symlinks=False)
        if got:
            out[os.path.relpath(p, root)] = got
    return out


def assert_same_xattrs(src: Path, dest: Path) -> int:
    """Fail with the first differences unless both trees carry the same xattrs; returns
    how many entries have some, so a test can say its tree was not bare."""
    a, b = xattr_map(src), xattr_map(dest)
    diffs = [f"{p}: {sorted(a.get(p, {}))} != {sorted(b.get(p, {}))}"
             for p in sorted(a.keys() | b.keys()) if a.get(p) != b.get(p)]
    assert not diffs, f"{len(diffs)} entries differ:\n" + "\n".join(diffs[:20])
    return len(a)


def build_tagged(src: Path, big: int = 3900, names: int = 60) -> None:
    """Files, directories and the root with user.* xattrs, and some without."""
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "emptydir").mkdir()
    (src / "plain").write_bytes(b"no xattrs here\n")
    (src / "tagged").write_bytes(b"tagged\n" * 100)
    os.setxattr(src / "tagged", "user.mime_type", b"text/plain")
    os.setxattr(src / "tagged", "user.empty", b"")
    os.setxattr(src / "tagged", "user.binary", bytes(range(256)))
    (src / "big").write_bytes(os.urandom(70000))
    os.setxattr(src / "big", "user.big", os.urandom(big))
    (src / "many").write_bytes(b"")
    for i in range(names):
        os.setxattr(src / "many", f"user.n{i:03}", b"%d" % i)
    (src / "dir" / "sub" / "f").write_bytes(b"deep")
    os.setxattr(src / "dir" / "sub" / "f", "user.deep", b"yes")
    os.link(src / "tagged", src / "dir" / "hardlink")
    os.symlink("tagged", src / "link")  # Linux takes no user.* on a symlink
    (src / "readonly").write_bytes(b"0444")
    os.setxattr(src / "readonly", "user.ro", b"kept though the file is read-only")
    os.chmod(src / "readonly", 0o444)
    for d in (src, src / "dir", src / "emptydir"):
        os.setxattr(d, "user.dirtag", d.name.encode())


# -- static trees ------------------------------------------------------------------------------------


def test_static_tree_keeps_xattrs_with_preserve(tmp_path: Path, kit: Kit) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    build_tagged(src)
    tree_ok(*migrate(kit, src, dest, "--preserve"))
    assert_replica(src, dest, owners=ROOT)
    assert assert_same_xattrs(src, dest) >= 9
    assert len(os.listxattr(dest / "many")) >= 60


def test_without_preserve_the_copy_has_no_xattrs(tmp_path: Path, kit: Kit) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    build_tagged(src)
    tree_ok(*migrate(kit, src, dest))
    assert_replica(src, dest, owners=ROOT)
    assert xattr_map(src) and xattr_map(dest) == {}


def test_big_values_and_many_names_on_tmpfs(shm: Path, kit: Kit) -> None:
    src, dest = shm / "src", shm / "dest"
    src.mkdir()
    build_tagged(src, big=65536, names=200)
    send, recv = migrate(kit, src, dest, "--preserve")
    tree_ok(send, recv)
    assert_same_xattrs(src, dest)
    assert len(os.getxattr(dest / "big", "user.big")) == 65536


def test_sets_over_the_limits_are_cut_with_one_warning(shm: Path, kit: Kit) -> None:
    """More than MAX_XATTRS names, or a set over 1 MiB: the first names (bytewise) travel,
    the rest are named in one warning, and both manifests leave out the same ones."""
    src, dest = shm / "src", shm / "dest"
    src.mkdir()
    (src / "names").write_bytes(b"")
    for i in range(300):
        os.setxattr(src / "names", f"user.n{i:03}", b"v")
    (src / "bytes").write_bytes(b"")
    for i in range(20):
        os.setxattr(src / "bytes", f"user.b{i:02}", os.urandom(65536))
    send, recv = migrate(kit, src, dest, "--preserve")
    tree_ok(send, recv)
    assert sorted(os.listxattr(dest / "names")) == [f"user.n{i:03}" for i in range(256)]
    kept = sorted(os.listxattr(dest / "bytes"))
    assert kept == [f"user.b{i:02}" for i in range(15)], kept
    for name in kept:
        assert os.getxattr(dest / "bytes", name) == os.getxattr(src / "bytes", name)
    warned = [ln for ln in send.err.splitlines() if "over the size limits" in ln]
    assert len(warned) == 1 and "skipped 49 extended attributes" in warned[0], send.err


def test_a_destination_that_cannot_hold_a_value_fails_with_exit_7(shm: Path, tmp_path: Path,
                                                                  kit: Kit) -> None:
    if takes_user_xattrs(tmp_path, 8192):
        pytest.skip(f"{tmp_path} holds 8 KiB values: nothing to refuse")
    src, dest = shm / "src", tmp_path / "dest"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", "user.huge", os.urandom(8192))
    send, recv = migrate(kit, src, dest, "--preserve")
    message = recv.error(7)
    assert message.startswith("destination: f: ") or "f: the destination" in message, message
    assert "cannot keep extended attribute user.huge" in message, message
    send.error(7)
    assert not dest.exists()


@pytest.mark.skipif(not ROOT, reason="needs root to run recv as another user")
def test_a_recv_without_root_gets_the_user_namespace_only(tmp_path: Path, kit: Kit) -> None:
    """trusted.* travels to a root recv only; a recv without root gets user.*, also on a
    file whose mode it may not write, and both manifests leave trusted.* out."""
    nobody = python_for("nobody")
    if nobody is None:
        pytest.skip("the user nobody cannot run this checkout's Python")
    src = tmp_path / "src"
    src.mkdir()
    build_tagged(src)
    os.setxattr(src / "tagged", "trusted.t", b"root only")
    os.setxattr(src / "dir", "trusted.d", b"root only")
    public = Path(tempfile.mkdtemp(prefix="mfd-xattr-", dir="/tmp"))
    try:
        os.chown(public, pwd.getpwnam("nobody").pw_uid, -1)
        dest = public / "dest"
        recv = subprocess.Popen([*nobody, "recv", "--json", "--timeout", "60", "--listen",
                                 "tcp:127.0.0.1:0", str(dest)], cwd="/", text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, ev = read_event(recv)
            assert ev["event"] == "listening", ev
            kit.send(src, ev["uri"], "--preserve", timeout=60).wait(120).ok()
            _, err = recv.communicate(timeout=60)
            assert recv.returncode == 0, err
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.communicate()
        got = {p: {n: v for n, v in names.items() if n.startswith(b"user.")}
               for p, names in xattr_map(src).items()}
        assert {p: names for p, names in got.items() if names} == xattr_map(dest)
        assert os.getxattr(dest / "readonly", "user.ro") == b"kept though the file is read-only"
        assert stat.S_IMODE((dest / "readonly").stat().st_mode) == 0o444
        assert "trusted.t" not in os.listxattr(dest / "tagged")
    finally:
        shutil.rmtree(public, ignore_errors=True)
    # The control: a root recv gets trusted.* too.
    root_dest = tmp_path / "root-dest"
    tree_ok(*migrate(kit, src, root_dest, "--preserve"))
    assert os.getxattr(root_dest / "dir", "trusted.d") == b"root only"
    assert_same_xattrs(src, root_dest)


# -- a tree whose xattrs change while it is migrated -------------------------------------------------


class XattrWriter(TreeWriter):
    """helpers/xattrwriter.py, handled as TreeWriter handles its writer."""

    def __init__(self, root: Path, status: Path, rate: int, seed: int) -> None:
        self.status = status
        self.popen = subprocess.Popen(
            [sys.executable, str(XATTRWRITER), str(root), "--status", str(status),
             "--rate", str(rate), "--seed", str(seed)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        assert_within(lambda: self.counts().get("ops", 0) > 0 or self.popen.poll() is not None,
                      15, "the xattr writer's first operation")
        assert self.popen.poll() is None, self.stderr()


@pytest.mark.parametrize("seed", [1, 2])
def test_live_xattrs_equal_the_source_at_the_pause(tmp_path: Path, kit: Kit, seed: int) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    subprocess.run([sys.executable, str(XATTRWRITER), str(src), "--populate", "150",
                    "--seed", str(seed)], check=True, timeout=60)
    w = XattrWriter(src, tmp_path / "counts", rate=300, seed=seed)
    try:
        before = w.counts()
        send, recv = migrate(kit, src, dest, "--preserve", "--pause-pid", str(w.pid))
        tree_ok(send, recv)
        assert w.stopped(), "keep-paused is the default: the writer must be stopped"
        after = w.counts()
        ops = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        for kind in ("set", "change", "remove", "rename", "append", "dir"):
            assert ops.get(kind, 0) > 0, f"no {kind} during the migration: {ops}"
        passes = [e for e in send.events if e["event"] == "pass"]
        assert len(passes) >= 2, passes
        assert sum(p["tree_ops"] for p in passes[1:]) > 0, "later passes sent no changes"
        assert_replica(src, dest, owners=ROOT)
        assert assert_same_xattrs(src, dest) > 50
    finally:
        w.kill()


# -- what it costs ----------------------------------------------------------------------------------


def _traced_send(kit: Kit, tmp_path: Path, src: Path, *args: str) -> str:
    """Migrate SRC with send under strace; the xattr calls send made on SRC's entries."""
    log = tmp_path / "strace.log"
    r, uri = kit.recv(tmp_path / "dest", timeout=60)
    calls = "listxattr,llistxattr,flistxattr,getxattr,lgetxattr,fgetxattr"
    subprocess.run(["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(log), *MULTIFD,
                    "send", "--timeout", "60", str(src), "--to", uri, *args],
                   check=True, timeout=180, capture_output=True, env=child_env())
    r.wait(60).ok()
    return "\n".join(ln for ln in log.read_text().splitlines() if str(src) in ln)


def test_without_preserve_send_makes_no_xattr_call(tmp_path: Path, kit: Kit,
                                                   strace_ok: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_tagged(src)
    assert _traced_send(kit, tmp_path, src) == ""
    # The control: the same trace sees them with --preserve, one listing per entry.
    shutil.rmtree(tmp_path / "dest")
    traced = _traced_send(kit, tmp_path, src, "--preserve")
    listed = [ln for ln in traced.splitlines() if "listxattr(" in ln]
    assert len(listed) >= len(list(src.rglob("*"))) + 1, traced


def test_a_pass_reads_xattrs_only_of_entries_whose_ctime_moved(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_tagged(src)
    tracker = TreeTracker()
    tracker.carry_xattrs(os.fsencode(src), privileged=ROOT)

    def xattr_pass() -> tuple[list[int], list[TreeOp]]:
        delta = tracker.advance(scan_tree(src))
        late = [op for op in delta.times() if op.op == Op.XATTRS]
        checked = delta.found.xattrs
        assert checked is not None
        return list(checked.reads()), late

    checked, ops = xattr_pass()
    assert len(checked) == len(tracker.snapshot or []) and len(ops) >= 8
    time.sleep(0.05)  # past the racy window of the walk (diff.RACY_NS)
    xattr_pass()
    checked, ops = xattr_pass()
    assert (checked, ops) == ([], []), "an unchanged tree was read again"
    os.setxattr(src / "dir" / "sub" / "f", "user.deep", b"changed")
    os.chmod(src / "plain", 0o600)  # ctime moves, the (empty) set does not
    checked, ops = xattr_pass()
    snap = tracker.snapshot
    assert snap is not None
    assert sorted(snap.path(c) for c in checked) == [b"dir/sub/f", b"plain"]
    assert [(op.path, decode_xattrs(op.target)) for op in ops] == [
        (b"dir/sub/f", [(b"user.deep", b"changed")])]


def test_an_entry_gone_from_its_path_before_its_read_is_read_next_pass(tmp_path: Path) -> None:
    """A new tagged file whose directory is renamed between the walk and the read: the
    move leaves the file's ctime alone, so only remembering the failed read gets its
    set to recv."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    os.setxattr(src / "d" / "f", "user.a", b"1")
    time.sleep(0.05)  # not racy at the first walk either
    tracker = TreeTracker()
    tracker.carry_xattrs(os.fsencode(src), privileged=ROOT)
    delta = tracker.advance(scan_tree(src))
    os.rename(src / "d", src / "e")
    assert [op.path for op in delta.times() if op.op == Op.XATTRS] == []
    time.sleep(0.05)
    delta = tracker.advance(scan_tree(src))
    ops = [op for op in delta.times() if op.op == Op.XATTRS]
    assert [(op.path, decode_xattrs(op.target)) for op in ops] == [(b"e/f", [(b"user.a", b"1")])]


# -- negative controls -------------------------------------------------------------------------------


def test_a_copy_that_lost_an_xattr_fails_verification_with_exit_6(tmp_path: Path,
                                                                  kit: Kit) -> None:
    """Between two passes, an xattr is removed from recv's copy in the making, where
    nothing on the source moves to send it again: only the manifest can notice."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    build_tagged(src)
    marker = tmp_path / "removed"
    # recv sets a pass's xattrs as it closes the epoch, which may come after send's
    # hook starts (no pause: send does not wait for the ack), so wait for it first.
    script = tmp_path / "hook.py"
    script.write_text(f"""import errno, glob, os, time
if not os.path.exists({str(marker)!r}):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            for p in glob.glob({str(tmp_path)!r} + "/.dest.multifd-*/tree/dir/sub/f"):
                os.removexattr(p, "user.deep")
                open({str(marker)!r}, "w").close()
                raise SystemExit(0)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        time.sleep(0.02)
""")
    hook = f"{sys.executable} {script}"
    send, recv = migrate(kit, src, dest, "--preserve",
                         env={"MULTIFD_TEST_BETWEEN_PASSES": hook})
    assert marker.exists(), f"the hook never found the copy in the making: {send}"
    assert "tree verification failed" in recv.error(6)
    send.error(6)
    assert not dest.exists()


def test_the_manifest_digest_covers_xattrs(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    opts = ManifestOptions(xattrs=True)
    bare = walk_manifest(root, opts).digest()
    assert walk_manifest(root, ManifestOptions()).digest() != bare  # the flag is in it
    os.setxattr(root / "f", "user.a", b"1")
    one = walk_manifest(root, opts).digest()
    os.setxattr(root / "f", "user.a", b"2")
    two = walk_manifest(root, opts).digest()
    os.removexattr(root / "f", "user.a")
    assert len({bare, one, two}) == 3
    assert walk_manifest(root, opts).digest() == bare
    os.setxattr(root, "user.a", b"1")  # the root's count too
    assert walk_manifest(root, opts).digest() != bare
    assert xattr_digest([]) == 0 and xattr_digest([(b"user.a", b"")]) != 0


# -- the XATTRS op at recv ---------------------------------------------------------------------------


def test_recv_replaces_the_set_and_refuses_what_is_not_carried(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "ids").mkdir()
    flags = os.O_RDONLY | os.O_DIRECTORY
    root_fd = os.open(tmp_path / "tree", flags)
    ids_fd = os.open(tmp_path / "ids", flags)
    applier = TreeApplier(root_fd, ids_fd, keep_owner=False, can_mknod=False)
    try:
        applier.apply([TreeOp(Op.MKDIR, b"d")])
        applier.begin_epoch()
        applier.apply([TreeOp(Op.XATTRS, b"d", target=encode_xattrs([(b"user.a", b"1"),
                                                                       (b"user.b", b"2")]))])
        assert sorted(os.listxattr(tmp_path / "tree" / "d")) == ["user.a", "user.b"]
        applier.begin_epoch()
        applier.apply([TreeOp(Op.XATTRS, b"d", target=encode_xattrs([(b"user.b", b"3")]))])
        assert os.listxattr(tmp_path / "tree" / "d") == ["user.b"]
        assert os.getxattr(tmp_path / "tree" / "d", "user.b") == b"3"
        applier.begin_epoch()
        applier.apply([TreeOp(Op.XATTRS, b"")])  # the root, emptied
        applier.apply([TreeOp(Op.XATTRS, b"d")])
        assert os.listxattr(tmp_path / "tree" / "d") == []
        applier.begin_epoch()
        with pytest.raises(ProtocolError, match="not carried"):  # trusted.* needs a root recv
            applier.apply([TreeOp(Op.XATTRS, b"d", target=encode_xattrs([(b"trusted.t", b"")]))])
        applier.begin_epoch()
        with pytest.raises(ProtocolError, match="out of order"):
            applier.apply([TreeOp(Op.TIMES, b"d", mtime_ns=1), TreeOp(Op.XATTRS, b"d")])
    finally:
        applier.close()
        os.close(root_fd)
        os.close(ids_fd)


# -- the XATTRS codec --------------------------------------------------------------------------------


def _op(data: bytes) -> bytes:
    return tree_payload(3, [TreeOp(Op.XATTRS, b"d", target=data)])


def test_an_xattr_set_round_trips_sorted() -> None:
    pairs = [(b"user.b", b"\x00\xff"), (b"user.a", b""), (b"security.x", b"v" * 65536)]
    data = encode_xattrs(pairs)
    assert decode_xattrs(data) == sorted(pairs)
    (op,) = parse_tree(_op(data)).ops
    assert op.op == Op.XATTRS and op.target == data and op.path == b"d"
    (op,) = parse_tree(_op(b"")).ops  # the empty set: remove every name
    assert decode_xattrs(op.target) == []


@pytest.mark.parametrize(("data", "why"), [
    (encode_xattrs([(b"user.a", b"1")])[:-1], "XATTRS lengths"),  # value cut short
    (encode_xattrs([(b"user.a", b"1")]) + b"\x01", "cut entry"),  # a stray byte
    (b"\x00\x00\x00\x00\x00\x00", "XATTRS lengths"),  # an empty name
    (b"\x00\x01" + b"\x00\x00\x00\x00" + b"a" * 256, "XATTRS lengths"),  # a 256-byte name
    (b"\x06\x00\x01\x00\x01\x00" + b"user.a" + b"x" * 65537, "XATTRS lengths"),  # value > 64 KiB
    (encode_xattrs([(b"user.b", b"")]) + encode_xattrs([(b"user.a", b"")]), "increasing"),
    (encode_xattrs([(b"user.a", b"")]) * 2, "increasing"),  # a name twice
    (encode_xattrs([(b"user.\x00", b"")]), "NUL"),
    (b"".join(encode_xattrs([(b"user.%03d" % i, b"")]) for i in range(257)), "more than"),
])
def test_a_malformed_xattr_set_is_a_protocol_error(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_xattrs(data)
    with pytest.raises(ProtocolError, match=why):
        parse_tree(_op(data))


def test_an_xattrs_op_longer_than_its_payload_is_a_protocol_error() -> None:
    data = _op(encode_xattrs([(b"user.a", b"12345")]))
    with pytest.raises(ProtocolError, match="TREE path and target lengths"):
        parse_tree(data[:-3])
