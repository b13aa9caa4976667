"""Golden byte vectors for the multifd wire format, one file per message type.

The vectors are committed as tests/golden/*.bin; tests/test_protocol.py checks
that encoding the inputs below gives exactly those bytes and that decoding the
bytes gives exactly the messages below. Regenerate them only on purpose, after
a deliberate change of the wire format:

    .venv/bin/python tests/golden/make_golden.py          # check, exit 1 if stale
    .venv/bin/python tests/golden/make_golden.py --write  # rewrite the files

Tests import this file by path (tests/ is not a package).
"""

from __future__ import annotations

import sys
from pathlib import Path

import xxhash

from multifd_cli import wire as P
from multifd_cli.wire.treecodec import encode_xattrs
from multifd_cli.wire.treeops import Op, TreeOp

HERE = Path(__file__).resolve().parent

SESSION = bytes(range(16))
PAGE_SIZE = P.MIN_PAGE_SIZE
# Block 0 of the golden layout is 1300 bytes: pages at 0 and 512 are full, the
# page at 1024 is a short tail page of 276 bytes.
BLOCK0_SIZE = 1300
BLOCK1_SIZE = 4096
PAGE0 = bytes(range(256)) * 2
TAIL = b"multifd tail page " + bytes(258)  # 276 bytes, not a multiple of 8 on purpose
assert len(PAGE0) == PAGE_SIZE and len(TAIL) == BLOCK0_SIZE - 2 * PAGE_SIZE


def page_hash(data: bytes) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


def table_digest() -> bytes:
    """xxh3-128 over each block's size and little-endian u64 page-hash table, in
    layout order, after the golden PACKET: block 0 pages 0 and 1024 carry data,
    every other page of both blocks is zero."""
    zero = page_hash(bytes(PAGE_SIZE))
    block0 = [page_hash(PAGE0), zero, page_hash(TAIL)]
    block1 = [zero] * (BLOCK1_SIZE // PAGE_SIZE)
    parts = [P.BLOCK_SIZE.pack(BLOCK0_SIZE), *map(P.HASH.pack, block0)]
    parts += [P.BLOCK_SIZE.pack(BLOCK1_SIZE), *map(P.HASH.pack, block1)]
    return bytes(xxhash.xxh3_128_digest(b"".join(parts)))


CONFIG = P.Config(
    channels=4, compression=0, level=-3, page_size=PAGE_SIZE, packet_size=8 * PAGE_SIZE,
    features=0,
)
LAYOUT = P.Layout(
    (
        P.BlockInfo("disk.img", BLOCK0_SIZE, 1024),
        P.BlockInfo("données-ñ-日本", BLOCK1_SIZE, 0, P.KIND_BLOB),
    )
)
# One operation of each shape: a file id with a size, a symlink with a target, a
# non-UTF-8 path, a removal that uses only the path, and (--preserve) a file id's
# whole xattr set (one value not UTF-8) and a directory's set emptied.
TREE = P.Tree(4, (
    TreeOp(Op.MKDIR, b"pg_wal"),
    TreeOp(Op.CREATE, b"pg_wal/000000010000000000000001", 7, 0o100600, 26, 26, 16 << 20),
    TreeOp(Op.SYMLINK, b"latest", -1, 0o120777, 0, 0, -1, b"pg_wal/\xff"),
    TreeOp(Op.TIMES, b"", 7, mtime_ns=1_700_000_000_123_456_789),
    TreeOp(Op.REMOVE, b"caf\xc3\xa9.sock"),
    TreeOp(Op.XATTRS, b"pg_wal/000000010000000000000001", 7,
           target=encode_xattrs([(b"user.mime_type", b"application/octet-stream"),
                                 (b"user.checksum", b"\x00\xff\x10")])),
    TreeOp(Op.XATTRS, b"pg_wal"),
))
TREE_ROOT = P.TreeRoot(bytes(range(16, 32)), ((2049, 131073), (2049, 2)))

PACKET_FIELDS = {
    "epoch": 3,
    "packet_num": 7,
    "block": 0,
    "normal_offsets": [0, 1024],
    "zero_offsets": [512],
    "hashes": [page_hash(PAGE0), page_hash(TAIL)],
    "payload": PAGE0 + TAIL,
}

# name -> (expected decoded message, encoded bytes). For PACKET the expected
# message is given as PACKET_FIELDS (a Packet holds memoryviews).
VECTORS: dict[str, tuple[object, bytes]] = {
    "hello": (
        P.Hello(P.VERSION, P.ROLE_MAIN, SESSION, 0),
        P.encode_hello(P.ROLE_MAIN, SESSION),
    ),
    "welcome": (P.Welcome(P.VERSION, SESSION), P.encode_welcome(SESSION)),
    "config": (CONFIG, P.encode_config(CONFIG)),
    "layout": (LAYOUT, P.encode_layout(LAYOUT)),
    "accept": (P.Accept(), P.encode_accept()),
    "metadata": (
        P.Metadata(0, 0o100644, 1000, 100, 1_700_000_000_123_456_789, ((b"user.k", b"v\x00"),)),
        P.encode_metadata(
            P.Metadata(0, 0o100644, 1000, 100, 1_700_000_000_123_456_789, ((b"user.k", b"v\x00"),))
        ),
    ),
    "accept_resume": (P.Accept(P.ACCEPT_RESUME), P.encode_accept(P.ACCEPT_RESUME)),
    "resume_hashes": (
        P.ResumeHashes(0, 1024, (1, 2, 0xFFFFFFFFFFFFFFFF)),
        P.encode_resume_hashes(0, 1024, [1, 2, 0xFFFFFFFFFFFFFFFF]),
    ),
    "epoch_start": (
        P.EpochStart(3, (BLOCK0_SIZE, BLOCK1_SIZE)),
        P.encode_epoch_start(3, [BLOCK0_SIZE, BLOCK1_SIZE]),
    ),
    "epoch_end": (
        P.EpochEnd(3, P.Counts(5, 17, 9)),
        P.encode_epoch_end(3, P.Counts(5, 17, 9)),
    ),
    "packet": (PACKET_FIELDS, b"".join(bytes(b) for b in P.encode_packet(**PACKET_FIELDS))),
    "sync": (P.Sync(3, P.Counts(2, 10, 4)), P.encode_sync(3, 8, P.Counts(2, 10, 4))),
    "heartbeat": (P.Heartbeat(), P.encode_heartbeat()),
    "digest": (P.Digest(3, table_digest()), P.encode_digest(3, table_digest())),
    "complete": (
        P.Complete(table_digest(), BLOCK0_SIZE + BLOCK1_SIZE),
        P.encode_complete(table_digest(), BLOCK0_SIZE + BLOCK1_SIZE),
    ),
    "abort": (
        P.Abort(6, "verify failed: page 3 — ü"),
        P.encode_abort(6, "verify failed: page 3 — ü"),
    ),
    "auth_challenge": (P.AuthChallenge(bytes(range(32))), P.encode_auth_challenge(bytes(range(32)))),
    "auth_response": (
        P.AuthResponse(bytes(range(32, 64)), bytes(range(64, 96))),
        P.encode_auth_response(bytes(range(32, 64)), bytes(range(64, 96))),
    ),
    "auth_ok": (P.AuthOk(bytes(range(96, 128))), P.encode_auth_ok(bytes(range(96, 128)))),
    "tree": (TREE, P.encode_tree(TREE.epoch, TREE.ops)),
    "tree_root": (TREE_ROOT, P.encode_tree_root(TREE_ROOT.boot_id, TREE_ROOT.ids)),
    "manifest": (P.Manifest(3, bytes(range(32))), P.encode_manifest(3, bytes(range(32)))),
    "epoch_ack": (P.EpochAck(3, 1 << 33, 5000, 1234), P.encode_epoch_ack(P.EpochAck(3, 1 << 33, 5000, 1234))),
}

# The order of a whole session, used for the concatenated-stream test.
STREAM_ORDER = [
    "hello", "auth_challenge", "auth_response", "auth_ok", "welcome", "config", "layout", "accept_resume", "resume_hashes", "epoch_start", "packet", "sync",
    "heartbeat", "epoch_end", "epoch_ack", "tree", "tree_root", "manifest", "metadata", "digest",
    "complete", "abort",
]


def path_of(name: str) -> Path:
    return HERE / f"{name}.bin"


def main(argv: list[str]) -> int:
    write = "--write" in argv
    stale = 0
    for name, (_, data) in VECTORS.items():
        path = path_of(name)
        current = path.read_bytes() if path.exists() else None
        if current == data:
            continue
        stale += 1
        if write:
            path.write_bytes(data)
            print(f"wrote {path.name} ({len(data)} bytes)")
        else:
            print(f"stale: {path.name}")
    if not write and stale:
        print(f"{stale} vector(s) differ; rerun with --write only if the format changed on purpose")
        return 1
    if not stale:
        print(f"all {len(VECTORS)} vectors up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
