"""What a directory tree costs per entry (issue 12): send's Snapshot columns and their
fallbacks when a value does not fit, and recv's two per-file structures (the
manifest walk's link keys, the TREE operations held until an epoch closes).

Send holds two Snapshots at once while it diffs a pass; the issue allows about 200
bytes per file on each side. These tests bound the bytes the arrays really hold
(buffer_info), so a column that goes back to 8 bytes fails here, and check that a
value too big for a narrow column widens that column without losing a value.
The RSS figure itself comes from benchmarks/tree_memory.py, not from a test.
"""

from __future__ import annotations

import os
import sys
from array import array
from pathlib import Path

from multifd_cli.common.manifest import ManifestOptions, walk_manifest
from multifd_cli.recv.treeorder import HeldOps
from multifd_cli.send.tree.diff import diff_snapshots
from multifd_cli.send.tree.scan import DIR, FILE, NARROW, Snapshot, scan_tree
from multifd_cli.wire.treecodec import encode_xattrs
from multifd_cli.wire.treeops import Op, TreeOp

# Fixed-width bytes per entry of one Snapshot: 48 today (kind 1, mode 2, uid 2, gid 2,
# size 4, mtime 8, ctime 8, dev 4, ino 4, nlink 1, parent 4, fid 4, name_end 4). Two of
# them plus names and the diff's 4-byte index arrays stay well under 200 B/file.
MAX_FIXED_PER_ENTRY = 48
NS = 1_000_000_000


def _held(snap: Snapshot) -> int:
    """Bytes the per-entry arrays hold, from their buffers (names aside)."""
    cols = [snap.kind, snap.mode, snap.uid, snap.gid, snap.size, snap.mtime, snap.ctime,
            snap.dev, snap.ino, snap.nlink, snap.parent, snap.fid, snap.name_end]
    return sum(a.buffer_info()[1] * a.itemsize for a in cols)


def _stat(mode: int, *, ino: int, dev: int = 2049, nlink: int = 1, uid: int = 1000,
          gid: int = 1000, size: int = 100, t: int = 1_700_000_000 * NS) -> os.stat_result:
    """A stat result as lstat would return it, for a synthetic walk."""
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, t // NS, t // NS, t // NS),
                          {"st_mtime_ns": t, "st_ctime_ns": t, "st_atime_ns": t})


def _synthetic(entries: list[tuple[bytes, os.stat_result]]) -> Snapshot:
    """A root directory holding ENTRIES, as scan_tree would record them, walked well
    after their ctimes (no entry is racily clean)."""
    snap = Snapshot(b"/nonexistent", 1_800_000_000 * NS)
    snap.add(b"", -1, _stat(0o40755, ino=2, nlink=2), DIR)
    for name, st in entries:
        snap.add(name, 0, st, FILE)
    snap.children[0] = (1, len(entries))
    return snap


def test_real_walk_stays_within_the_per_entry_bound(tmp_path: Path) -> None:
    for d in range(10):
        sub = tmp_path / f"d{d}"
        sub.mkdir()
        for f in range(100):
            (sub / f"f{f:04d}").write_bytes(b"x" * f)
    snap = scan_tree(tmp_path)
    assert len(snap) == 1 + 10 + 1000
    assert snap.per_entry() <= MAX_FIXED_PER_ENTRY, snap.per_entry()
    # What the buffers hold, growth slack included, per entry.
    assert _held(snap) / len(snap) <= MAX_FIXED_PER_ENTRY * 1.15, _held(snap) / len(snap)
    assert snap.nbytes() == snap.per_entry() * len(snap) + len(snap.names)


def test_the_bound_catches_an_eight_byte_column() -> None:
    """Negative control: the same walk with one column back at 8 bytes fails the bound."""
    snap = _synthetic([(b"f%d" % i, _stat(0o100644, ino=100 + i)) for i in range(100)])
    assert snap.per_entry() <= MAX_FIXED_PER_ENTRY
    snap.ino = array("Q", snap.ino)
    snap.fid = array("q", snap.fid)
    assert snap.per_entry() > MAX_FIXED_PER_ENTRY


def test_values_too_big_for_a_column_widen_it_and_keep_every_value() -> None:
    small = [(b"a", _stat(0o100644, ino=10)), (b"b", _stat(0o100644, ino=11, nlink=2))]
    big = [
        (b"uid", _stat(0o100644, ino=12, uid=70_000, gid=4_000_000_000)),
        (b"size", _stat(0o100644, ino=13, size=5 << 30)),
        (b"ino", _stat(0o100644, ino=1 << 40)),
        (b"links", _stat(0o100644, ino=14, nlink=300)),
    ]
    snap = _synthetic(small + big)
    assert (snap.uid.typecode, snap.gid.typecode, snap.size.typecode) == ("I", "I", "Q")
    assert (snap.ino.typecode, snap.nlink.typecode) == ("Q", "H")
    for i, (name, st) in enumerate(small + big, start=1):
        assert snap.name(i) == name
        assert (snap.uid[i], snap.gid[i], snap.size[i]) == (st.st_uid, st.st_gid, st.st_size)
        assert snap.key(i) == (st.st_dev, st.st_ino)
        assert snap.nlink[i] == st.st_nlink
        assert (snap.mtime[i], snap.ctime[i], snap.parent[i], snap.fid[i]) == (
            st.st_mtime_ns, st.st_ctime_ns, 0, -1)
    columns = [getattr(snap, c) for c in NARROW]
    assert {len(a) for a in columns} == {len(snap)}


def test_a_device_number_over_32_bits_widens_dev_and_the_diff_still_matches() -> None:
    """Two walks of the same files, one on a device whose number needs 8 bytes: the
    second walk finds nothing to do. Negative control: a file whose device changed is
    a new file, its old id dropped."""
    wide = (1 << 40) | 5
    entries = [(b"a", _stat(0o100644, ino=5, dev=2049)), (b"b", _stat(0o100644, ino=5, dev=wide))]
    first = _synthetic(entries)
    assert first.dev.typecode == "Q" and first.key(2) == (wide, 5)
    _, next_fid = diff_snapshots(None, first)
    delta, _ = diff_snapshots(first, _synthetic(entries), next_fid)
    assert delta.empty(), delta.summary()

    moved = _synthetic([entries[0], (b"b", _stat(0o100644, ino=5, dev=wide + 1))])
    delta, _ = diff_snapshots(first, moved, next_fid)
    assert delta.summary()["created"] == 1 and delta.dropped == [first.fid[2]]


def _linked_tree(root: Path) -> None:
    root.mkdir()
    for i in range(20):
        (root / f"f{i}").write_bytes(b"%d" % i)
    os.link(root / "f0", root / "f0-again")  # one real hard-link group


def test_recv_manifest_ignores_the_id_links_but_keeps_link_groups(tmp_path: Path) -> None:
    """recv's staged files each have one more link, in its id directory, outside the
    walked tree: with links_outside=1 its manifest equals the source's, hard-link
    group included, without remembering every file. Negative control: the same count
    on a tree without those links drops the group, so the digest changes."""
    src, staged, ids = tmp_path / "src", tmp_path / "staged", tmp_path / "ids"
    _linked_tree(src)
    _linked_tree(staged)
    ids.mkdir()
    for i, p in enumerate(sorted(staged.iterdir())):
        if p.name != "f0-again":
            os.link(p, ids / f"{i:x}")
    opts = ManifestOptions(mtimes=False)
    want = walk_manifest(src, opts)
    got = walk_manifest(staged, opts, links_outside=1)
    assert (got.count, got.digest()) == (want.count, want.digest())
    assert walk_manifest(src, opts, links_outside=1).digest() != want.digest()


def test_held_ops_come_back_as_they_arrived() -> None:
    """recv holds a pass's TIMES (and early shape ops) encoded; applied later, they
    must be the same operations in the same order, message by message."""
    first = (TreeOp(Op.MKDIR, b"d", mode=0o755),
             TreeOp(Op.CREATE, b"d/f\xff", 7, 0o640, 1000, 1000, 4096),
             TreeOp(Op.SYMLINK, b"d/l", uid=0, gid=0, target=b"../elsewhere"))
    second = (TreeOp(Op.XATTRS, b"d/f\xff", 7, target=encode_xattrs([(b"user.a", b"1")])),
              TreeOp(Op.TIMES, b"d/f\xff", 7, mtime_ns=1_700_000_000_123_456_789))
    held = HeldOps()
    held.extend(first)
    held.extend(second)
    assert list(held.batches()) == [first, second]
    assert sum(map(len, held.payloads)) < sum(map(sys.getsizeof, first + second))
