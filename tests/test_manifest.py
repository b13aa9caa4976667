"""The tree manifest: exact bytes (a golden vector), canonical order, hard-link groups
that do not depend on inode numbers, selectable fields, and send's snapshot and
recv's walk agreeing on a real tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from multifd_cli.common.manifest import ManifestBuilder, ManifestOptions, walk_manifest
from multifd_cli.errors import ProtocolError
from multifd_cli.send.tree import scan_tree, snapshot_manifest
from multifd_cli.wire.treeops import EntryType as T
from multifd_cli.wire.treeops import split_path

# A PostgreSQL-like root (0700, owned by uid 26), a 16 MiB segment with a hard link,
# a symlink whose name sorts between "a" and "a/x" bytewise but after them in
# canonical (pre-order) order, a device node and a fifo.
GOLDEN_HEX = (
    "4d464454524545010700000201c0000000000000000017979cfe362a00000000001a0000001a00000000"
    "00000000ffffffffffffffff000000010201ed000000000000000000000000000000010000001a000000"
    "1a0000000000000000ffffffffffffffff6100000003010180000000000100000000000000000000020000"
    "001a0000001a0000000000000000ffffffffffffffff612f780000000303000000000000000000030000"
    "00000000000300000000000000000000000000000000ffffffffffffffff612e620003612f7800040101"
    "a4000000000100000000000000000000020000001a0000001a00000000000000000000000000000002686172"
    "64000000040501b60000000000000000000000000000000400000000000000000000000000000103ffff"
    "ffffffffffff6e756c6c000000040401a000000000000000000000000000000005000000000000000000"
    "00000000000000ffffffffffffffff706970650000"
)
GOLDEN_DIGEST = "d1954c963125945ecc71f81af3ca669ddae0db38240f51ec70743a693806bf72"
EMPTY_DIGEST = "fb2966b950c8e12a9863d28e0f1ce3f014ceafe2f38d06e4f617b19d3814ee4d"


def _golden(builder: ManifestBuilder) -> ManifestBuilder:
    b = builder
    b.add(b"", T.DIR, mode=0o40700, mtime_ns=1_700_000_000_000_000_000, uid=26, gid=26)
    b.add(b"a", T.DIR, mode=0o40755, size=4096, mtime_ns=1, uid=26, gid=26)
    b.add(b"a/x", T.FILE, mode=0o100600, size=16 << 20, mtime_ns=2, uid=26, gid=26, key=(1, 10))
    b.add(b"a.b", T.SYMLINK, mode=0o120777, size=99, mtime_ns=3, target=b"a/x")
    b.add(b"hard", T.FILE, mode=0o100644, size=16 << 20, mtime_ns=2, uid=26, gid=26, key=(1, 10))
    b.add(b"null", T.CHR, mode=0o20666, rdev=259, mtime_ns=4)
    b.add(b"pipe", T.FIFO, mode=0o10640, mtime_ns=5, rdev=7)
    return b


def test_golden_vector() -> None:
    b = _golden(ManifestBuilder(ManifestOptions(mtimes=True, owners=True, devices=True), keep=True))
    assert b.encoded is not None
    assert bytes(b.encoded).hex() == GOLDEN_HEX
    assert b.digest().hex() == GOLDEN_DIGEST
    assert ManifestBuilder().digest().hex() == EMPTY_DIGEST
    assert b.entries is not None
    assert [e.link for e in b.entries] == [-1, -1, -1, -1, 2, -1, -1]


def test_what_is_left_out_is_zeroed_and_flagged() -> None:
    full = _golden(ManifestBuilder(ManifestOptions(True, True, True), keep=True))
    bare = _golden(ManifestBuilder(ManifestOptions(False, False, False), keep=True))
    assert full.digest() != bare.digest()
    assert bare.entries is not None
    assert [e.path for e in bare.entries] == [b"", b"a", b"a/x", b"a.b", b"hard", b"pipe"]
    assert all(e.mtime_ns == e.uid == e.gid == 0 for e in bare.entries)
    # Directory sizes differ between filesystems; a symlink's size is its target's.
    assert [e.size for e in bare.entries][:4] == [0, 0, 16 << 20, 3]


def test_owners_and_mtimes_count_only_when_selected() -> None:
    def digest(opts: ManifestOptions, uid: int, mtime: int) -> bytes:
        b = ManifestBuilder(opts)
        b.add(b"f", T.FILE, mode=0o644, size=1, uid=uid, mtime_ns=mtime)
        return b.digest()

    off = ManifestOptions(mtimes=False, owners=False)
    assert digest(off, 0, 1) == digest(off, 1000, 2)
    assert digest(ManifestOptions(owners=True), 0, 1) != digest(ManifestOptions(owners=True), 7, 1)
    assert digest(ManifestOptions(), 0, 1) != digest(ManifestOptions(), 0, 2)


def test_link_groups_do_not_depend_on_inode_numbers_or_spare_keys() -> None:
    def digest(keys: list[object]) -> bytes:
        b = ManifestBuilder()
        for name, key in zip([b"a", b"b", b"c"], keys):
            b.add(name, T.FILE, mode=0o644, size=1, key=key)
        return b.digest()

    assert digest([(1, 5), (1, 9), (1, 5)]) == digest([(2, 7), None, (2, 7)])
    # recv's files all carry a key (its id names add a link): singletons still match.
    assert digest([None, None, None]) == digest([(1, 1), (1, 2), (1, 3)])
    assert digest([(1, 5), (1, 5), None]) != digest([(1, 5), None, (1, 5)])


def _tree(root: Path) -> None:
    (root / "base" / "1").mkdir(parents=True)
    (root / "empty").mkdir(mode=0o700)
    (root / "base" / "1" / "1259").write_bytes(b"p" * 8192)
    os.link(root / "base" / "1" / "1259", root / "hard")
    os.symlink("base/1", root / "base.lnk")
    (root / "a.b").write_bytes(b"")
    os.mkfifo(root / "pipe")
    os.chmod(root, 0o700)


def test_snapshot_and_walk_agree_on_a_real_tree(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    _tree(root)
    opts = ManifestOptions(mtimes=True, owners=True, devices=True)
    sent = snapshot_manifest(scan_tree(root), opts, keep=True)
    walked = walk_manifest(root, opts, keep=True)
    assert sent.entries == walked.entries
    assert sent.digest() == walked.digest()
    assert sent.entries is not None
    assert [e.path for e in sent.entries] == [
        b"", b"a.b", b"base", b"base/1", b"base/1/1259", b"base.lnk", b"empty", b"hard", b"pipe"
    ]


def test_a_difference_in_shape_or_mode_changes_the_digest(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    _tree(root)
    before = walk_manifest(root).digest()
    os.chmod(root, 0o750)  # PostgreSQL accepts 0750 too, but it is not the same tree
    assert walk_manifest(root).digest() != before
    os.chmod(root, 0o700)
    assert walk_manifest(root).digest() == before
    mtime = os.lstat(root).st_mtime_ns
    os.rmdir(root / "empty")
    os.utime(root, ns=(mtime, mtime))
    assert walk_manifest(root).digest() != before


def test_walk_can_leave_out_a_hidden_top_level_name(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "x").write_bytes(b"x")
    plain = walk_manifest(root, ManifestOptions(mtimes=False)).digest()
    (root / ".multifd-ids").mkdir()
    skipped = walk_manifest(
        root, ManifestOptions(mtimes=False), skip_names=frozenset({b".multifd-ids"})
    ).digest()
    assert skipped == plain


@pytest.mark.parametrize("path", [b"/a", b"..", b"a/..", b"a//b", b".", b"a/", b"a\0"])
def test_split_path_refuses_what_leaves_the_tree(path: bytes) -> None:
    with pytest.raises(ProtocolError):
        split_path(path)


def test_split_path_accepts_plain_relative_paths() -> None:
    assert split_path(b"") == []
    assert split_path(b"pg_wal/000000010000000000000001") == [b"pg_wal", b"000000010000000000000001"]
    assert split_path(b"..x/.y") == [b"..x", b".y"]
