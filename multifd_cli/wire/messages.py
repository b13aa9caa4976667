"""Every constant, header layout and message of the multifd wire protocol, once.

docs/protocol.md describes the same things, and tests/test_protocol_doc.py holds
the two to each other. Messages are plain typed tuples; turning them into bytes
and back is codec.py's job, and the order they may come in is states.py's.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, NamedTuple, Sequence, Union

from multifd_cli.wire.treeops import TreeOp

Buffer = Union[bytes, bytearray, memoryview]

# --- constants (docs/protocol.md, "Constants") -------------------------------
MAGIC = 0x4D464431  # b"MFD1" read as a big-endian u32; on the wire it is little-endian
VERSION = 2  # 2: directory trees (KIND_TREE, TREE, TREE_ROOT, MANIFEST) and EPOCH_ACK
ROLE_MAIN = 0xFFFF

MAX_CHANNELS = 64
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
MAX_PACKET_SIZE = 64 << 20
MAX_PAGES_PER_PACKET = MAX_PACKET_SIZE // MIN_PAGE_SIZE
MAX_CONTROL_PAYLOAD = 16 << 20
MAX_BLOCKS = 4096
MAX_NAME_LEN = 4096
MAX_BLOCK_SIZE = 1 << 50
MAX_ABORT_MESSAGE = 4096
DIGEST_LEN = 16
UUID_LEN = 16
NONCE_LEN = 32
MAC_LEN = 32
FEATURE_PSK = 0x01  # HELLO features: the sender will prove it knows the pre-shared key
ACCEPT_RESUME = 0x01  # ACCEPT flags: DEST holds an old copy; RESUME_HASHES follow
ACCEPT_OWNERS = 0x02  # ACCEPT flags: recv keeps owners and makes device nodes (a tree's manifest)
CONFIG_XATTRS = 0x01  # CONFIG features: a tree's xattrs travel (--preserve); its manifest covers them
MAX_RESUME_HASHES = 65536  # page hashes in one RESUME_HASHES message
COMPRESSION_AUTO = 127  # CONFIG: each packet's header names its own codec (--compress auto)
KIND_PAGES = 0  # a block copied page by page, pass after pass (a file or device)
KIND_BLOB = 1  # a blob sent whole after the pause (device state); packet-size "pages"
KIND_TREE = 2  # a directory tree: the only block of its layout, named ""; see TREE
# A tree's pages are addressed as (file id << TREE_SHIFT) | byte offset in that file,
# so one packet carries the pages of many small files.
TREE_SHIFT = 40
MAX_TREE_FILE_SIZE = 1 << TREE_SHIFT
MAX_FILE_ID = (1 << (64 - TREE_SHIFT)) - 1
MAX_TREE_OPS = 65536  # operations in one TREE message
MAX_TREE_PATH = 4096  # bytes of a path or symlink target in a TREE operation
MAX_TREE_DEPTH = 4096  # (dev, ino) pairs in TREE_ROOT
MAX_XATTRS = 256
MAX_XATTR_VALUE = 65536


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    CONFIG = 3
    LAYOUT = 4
    ACCEPT = 5
    EPOCH_START = 6
    EPOCH_END = 7
    PACKET = 8
    HEARTBEAT = 9
    DIGEST = 10
    COMPLETE = 11
    ABORT = 12
    AUTH_CHALLENGE = 13
    AUTH_RESPONSE = 14
    AUTH_OK = 15
    RESUME_HASHES = 16
    METADATA = 17
    TREE = 18
    TREE_ROOT = 19
    MANIFEST = 20
    EPOCH_ACK = 21


FLAG_SYNC = 0x01  # a PACKET that closes the channel's epoch; carries SYNC_COUNTS
FLAG_RAW = 0x02  # payload is stored uncompressed although the session compresses
KNOWN_FLAGS = FLAG_SYNC | FLAG_RAW

# magic, type, flags, compression id, reserved, block id, reserved, epoch,
# packet number, normal pages, zero pages, payload length, header CRC32
HEADER = struct.Struct("<IBBBBHHIQIIII")
HEADER_SIZE = HEADER.size  # 40
HEADER_CRC_SPAN = HEADER_SIZE - 4
OFFSET = struct.Struct("<Q")
HASH = struct.Struct("<Q")

HELLO = struct.Struct("<HH16sI")  # version, role, session uuid, features
WELCOME = struct.Struct("<H16s")  # version, session uuid
CONFIG = struct.Struct("<HBbIII")  # channels, compression id, level, page size, packet size, features
LAYOUT_COUNT = struct.Struct("<H")
LAYOUT_BLOCK = struct.Struct("<QQBH")  # size, allocated bytes, kind, name length; name follows
EPOCH_START = struct.Struct("<IH")  # epoch, block count; one u64 size per block follows
BLOCK_SIZE = struct.Struct("<Q")
EPOCH_END = struct.Struct("<IQQQ")  # epoch, packets, normal pages, zero pages (all channels)
SYNC_COUNTS = struct.Struct("<QQQ")  # packets, normal pages, zero pages (this channel)
DIGEST = struct.Struct("<I16s")  # final epoch, digest of the page-hash table
COMPLETE = struct.Struct("<16sQ")  # digest, bytes written by the destination
ABORT = struct.Struct("<B")  # exit code; UTF-8 message follows
AUTH_CHALLENGE = struct.Struct("<32s")  # the receiver's nonce
AUTH_RESPONSE = struct.Struct("<32s32s")  # the sender's nonce, its HMAC-SHA256
AUTH_OK = struct.Struct("<32s")  # the receiver's HMAC-SHA256
ACCEPT = struct.Struct("<I")  # flags
RESUME_HASHES = struct.Struct("<HQI")  # block id, first page, count; count u64 hashes follow
METADATA = struct.Struct("<HIIIqH")  # block id, mode, uid, gid, mtime ns, xattr count
XATTR = struct.Struct("<HI")  # name length, value length; name and value follow
TREE = struct.Struct("<II")  # epoch, operation count; the operations follow
# op, file id, mode, uid, gid, size, rdev, mtime ns, path length, data length;
# the path and the data (a symlink's target, or XATTRS's set) follow
TREE_OP = struct.Struct("<BqIiiqQqHI")
TREE_ROOT = struct.Struct("<16sH")  # boot id, count; count (dev, ino) u64 pairs follow
DEV_INO = struct.Struct("<QQ")
MANIFEST = struct.Struct("<Q32s")  # entries, SHA-256 of the tree's manifest
EPOCH_ACK = struct.Struct("<IQQI")  # epoch, bytes read from channels, bytes applied, flush us


# --- messages ------------------------------------------------------------------
class Header(NamedTuple):
    type: MsgType
    flags: int = 0
    compression: int = 0
    block: int = 0
    epoch: int = 0
    packet_num: int = 0
    normal: int = 0
    zero: int = 0
    payload_len: int = 0

    @property
    def body_len(self) -> int:
        """Bytes that follow the header: offsets, hashes, then the payload."""
        return 8 * (self.normal + self.zero) + 8 * self.normal + self.payload_len

    @property
    def is_sync(self) -> bool:
        return self.type == MsgType.PACKET and bool(self.flags & FLAG_SYNC)


class Packet(NamedTuple):
    """A PACKET: normal pages with their hashes and payload, and zero pages."""

    header: Header
    normal_offsets: Sequence[int]
    zero_offsets: Sequence[int]
    hashes: Sequence[int]
    payload: memoryview


class Hello(NamedTuple):
    version: int
    role: int
    session: bytes
    features: int = 0


class Welcome(NamedTuple):
    version: int
    session: bytes


class Config(NamedTuple):
    channels: int
    compression: int
    level: int
    page_size: int
    packet_size: int
    features: int = 0

    @property
    def pages_per_packet(self) -> int:
        return self.packet_size // self.page_size


class BlockInfo(NamedTuple):
    name: str
    size: int
    allocated: int
    kind: int = KIND_PAGES


class Layout(NamedTuple):
    blocks: tuple[BlockInfo, ...]


class EpochStart(NamedTuple):
    epoch: int
    sizes: tuple[int, ...]


class Counts(NamedTuple):
    packets: int = 0
    normal: int = 0
    zero: int = 0

    def __add__(self, other: Counts) -> Counts:  # type: ignore[override]
        return Counts(
            self.packets + other.packets, self.normal + other.normal, self.zero + other.zero
        )


class EpochEnd(NamedTuple):
    epoch: int
    counts: Counts


class Sync(NamedTuple):
    epoch: int
    counts: Counts


class Digest(NamedTuple):
    epoch: int
    digest: bytes


class Complete(NamedTuple):
    digest: bytes
    written: int


class Abort(NamedTuple):
    exit_code: int
    message: str


class Heartbeat(NamedTuple):
    pass


class AuthChallenge(NamedTuple):
    nonce: bytes


class AuthResponse(NamedTuple):
    nonce: bytes
    mac: bytes


class AuthOk(NamedTuple):
    mac: bytes


class Accept(NamedTuple):
    flags: int = 0

    @property
    def resume(self) -> bool:
        return bool(self.flags & ACCEPT_RESUME)

    @property
    def owners(self) -> bool:
        return bool(self.flags & ACCEPT_OWNERS)


class Metadata(NamedTuple):
    """What --preserve keeps of one block, applied at completion."""

    block: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


class ResumeHashes(NamedTuple):
    """xxh3-64 of the destination's pages [first, first + len(hashes)) of a block."""

    block: int
    first: int
    hashes: tuple[int, ...]


class Tree(NamedTuple):
    """Operations on a directory tree (wire.treeops), ordered by the epoch barrier.

    Sent before EPOCH_START of `epoch`: the ops that bring the replica's shape to the
    pass's snapshot, applied before any page of the epoch. Sent after EPOCH_END of
    `epoch`: TIMES (and, for the final epoch, DIRMETA), applied once every page of
    the epoch is.
    """

    epoch: int
    ops: tuple[TreeOp, ...]


class TreeRoot(NamedTuple):
    """Where a directory source lives: the sender's boot id and the (dev, ino) of the
    source root, then of each directory above it up to /. A receiver on the same host
    (same boot id) refuses a DEST inside the source, or a source inside DEST."""

    boot_id: bytes
    ids: tuple[tuple[int, int], ...]


class Manifest(NamedTuple):
    """The digest of the tree's shape and metadata at the pause (common.manifest)."""

    entries: int
    digest: bytes


class EpochAck(NamedTuple):
    """recv has applied every page of `epoch`: what it had read from its channel
    sockets and written to DEST by then, and how long its last flush of DEST took.
    send measures delivered bandwidth from these, not from its own socket buffers."""

    epoch: int
    wire_bytes: int
    written_bytes: int
    flush_us: int


Message = Union[
    Packet, Hello, Welcome, Config, Layout, Accept, EpochStart, EpochEnd, Sync, Digest,
    Complete, Abort, Heartbeat, AuthChallenge, AuthResponse, AuthOk, ResumeHashes, Metadata,
    Tree, TreeRoot, Manifest, EpochAck,
]


# Messages are NamedTuples, not frozen dataclasses: defining 20 dataclasses cost
# ~11 ms of every start (each one exec()s its methods). Equality stays typed, as a
# dataclass's is: a Sync is never equal to an EpochEnd with the same fields.
def _typed_eq(a: tuple[object, ...], b: object) -> bool:
    return type(a) is type(b) and isinstance(b, tuple) and a[:] == b[:]


def _typed_ne(a: tuple[object, ...], b: object) -> bool:
    return not _typed_eq(a, b)


def _typed_equality(*classes: Any) -> None:
    for cls in classes:
        cls.__eq__ = _typed_eq
        cls.__ne__ = _typed_ne
        cls.__hash__ = tuple.__hash__


_typed_equality(
    Header,
    Packet,
    Hello,
    Welcome,
    Config,
    BlockInfo,
    Layout,
    EpochStart,
    Counts,
    EpochEnd,
    Sync,
    Digest,
    Complete,
    Abort,
    Heartbeat,
    AuthChallenge,
    AuthResponse,
    AuthOk,
    Accept,
    Metadata,
    ResumeHashes,
    Tree,
    TreeRoot,
    Manifest,
    EpochAck,
)
