"""The codec of the directory-tree messages (TREE, TREE_ROOT), apart from codec.py
so that each stays a size one can read; codec.py's encode() and parse_control()
dispatch here. Also the encoding of one entry's xattr set, which XATTRS carries and
both sides' manifests hash (common.manifest), so the two cannot drift apart."""

from __future__ import annotations

from typing import Iterable, Sequence

from multifd_cli.errors import ProtocolError, expect
from multifd_cli.wire.messages import (
    DEV_INO,
    MAX_FILE_ID,
    MAX_TREE_DEPTH,
    MAX_TREE_FILE_SIZE,
    MAX_TREE_OPS,
    MAX_TREE_PATH,
    MAX_XATTR_VALUE,
    MAX_XATTRS,
    TREE,
    TREE_OP,
    TREE_ROOT,
    XATTR,
    Tree,
    TreeRoot,
)
from multifd_cli.wire.treeops import Op, TreeOp

MAX_XATTR_NAME = 255  # XATTR_NAME_MAX of Linux


def encode_xattrs(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The canonical bytes of an xattr set: XATTR entries in bytewise name order."""
    return b"".join(XATTR.pack(len(n), len(v)) + n + v for n, v in sorted(pairs))


def decode_xattrs(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of an encoded set, or ProtocolError: names 1..255 bytes
    without NUL, in strictly increasing order (so each once), at most MAX_XATTRS of
    them, values at most MAX_XATTR_VALUE, and nothing left over."""
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(pairs) >= MAX_XATTRS or pos + XATTR.size > len(data):
            raise ProtocolError(f"XATTRS set: more than {MAX_XATTRS} entries or a cut entry")
        nlen, vlen = XATTR.unpack_from(data, pos)
        pos += XATTR.size
        if not 1 <= nlen <= MAX_XATTR_NAME or vlen > MAX_XATTR_VALUE or pos + nlen + vlen > len(data):
            raise ProtocolError(
                f"XATTRS lengths: got {nlen} and {vlen}, expected 1..{MAX_XATTR_NAME} and at "
                f"most {MAX_XATTR_VALUE} within the set"
            )
        name = data[pos : pos + nlen]
        if b"\0" in name or (pairs and name <= pairs[-1][0]):
            raise ProtocolError(f"XATTRS name {name!r}: holds NUL, or not in increasing order")
        pairs.append((name, data[pos + nlen : pos + nlen + vlen]))
        pos += nlen + vlen
    return pairs


def tree_payload(epoch: int, ops: Sequence[TreeOp]) -> bytes:
    """TREE's payload."""
    parts = [TREE.pack(epoch, len(ops))]
    for op in ops:
        parts.append(TREE_OP.pack(op.op, op.fid, op.mode, op.uid, op.gid, op.size, op.rdev,
                                  op.mtime_ns, len(op.path), len(op.target)))
        parts.append(op.path)
        parts.append(op.target)
    return b"".join(parts)


def tree_root_payload(boot_id: bytes, ids: Sequence[tuple[int, int]]) -> bytes:
    """TREE_ROOT's payload."""
    return TREE_ROOT.pack(boot_id, len(ids)) + b"".join(DEV_INO.pack(d, i) for d, i in ids)


def parse_tree(p: bytes) -> Tree:
    """TREE: each operation's fields are checked here only for what the codec can tell
    (known op, lengths within the payload); wire.treeops.split_path and the
    receiver's applier check the paths and the order."""
    epoch, n = TREE.unpack_from(p)
    if n > MAX_TREE_OPS:
        raise ProtocolError(f"TREE count: got {n}, expected at most {MAX_TREE_OPS}")
    pos = TREE.size
    ops = []
    for _ in range(n):
        op, fid, mode, uid, gid, size, rdev, mtime_ns, plen, tlen = TREE_OP.unpack_from(p, pos)
        pos += TREE_OP.size
        try:
            kind = Op(op)
        except ValueError:
            raise ProtocolError(f"TREE operation: got {op}, expected 1..{max(Op)}") from None
        tmax = len(p) if kind == Op.XATTRS else MAX_TREE_PATH  # a set is bounded by the payload
        if plen > MAX_TREE_PATH or tlen > tmax or pos + plen + tlen > len(p):
            raise ProtocolError(
                f"TREE path and target lengths: got {plen} and {tlen}, expected at most "
                f"{MAX_TREE_PATH} each (a set: any) within the payload"
            )
        if fid > MAX_FILE_ID or size >= MAX_TREE_FILE_SIZE or size < -1 or fid < -1:
            raise ProtocolError(f"TREE {kind.name}: file id {fid} or size {size} out of range")
        path = p[pos : pos + plen]
        target = p[pos + plen : pos + plen + tlen]
        pos += plen + tlen
        if kind == Op.XATTRS:
            decode_xattrs(target)
        ops.append(TreeOp(kind, path, fid, mode, uid, gid, size, target, rdev, mtime_ns))
    expect("TREE length", len(p), pos)
    return Tree(epoch, tuple(ops))


def parse_tree_root(p: bytes) -> TreeRoot:
    boot_id, n = TREE_ROOT.unpack_from(p)
    if not 1 <= n <= MAX_TREE_DEPTH:
        raise ProtocolError(f"TREE_ROOT count: got {n}, expected 1..{MAX_TREE_DEPTH}")
    expect("TREE_ROOT length", len(p), TREE_ROOT.size + DEV_INO.size * n)
    ids = tuple(DEV_INO.unpack_from(p, TREE_ROOT.size + DEV_INO.size * i) for i in range(n))
    return TreeRoot(boot_id, ids)
