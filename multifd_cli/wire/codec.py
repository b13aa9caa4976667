"""The multifd wire format, sans-IO.

Every constant and layout of docs/protocol.md is defined here, once. Encoding is
plain functions that return bytes; decoding is `Decoder`, fed bytes with
`feed()`, or the two pure steps `parse_header()` and `parse_packet_body()` that
the channel's hot path calls on buffers it filled itself. Nothing here touches
a socket, a process or a file, so every byte can be tested and fuzzed.

Fuzz invariant: any input, whole or split at any points, yields messages or a
ProtocolError; nothing else escapes.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from functools import reduce
from operator import or_
from typing import Any, Iterable, NamedTuple, Sequence, Union

from multifd_cli.errors import ProtocolError, expect

Buffer = Union[bytes, bytearray, memoryview]

# --- constants (docs/protocol.md, "Constants") -------------------------------
MAGIC = 0x4D464431  # b"MFD1" read as a big-endian u32; on the wire it is little-endian
VERSION = 1
ROLE_MAIN = 0xFFFF

MAX_CHANNELS = 64
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
MAX_PACKET_SIZE = 64 << 20
MAX_PAGES_PER_PACKET = MAX_PACKET_SIZE // MIN_PAGE_SIZE
MAX_CONTROL_PAYLOAD = 16 << 20
MAX_BLOCKS = 4096
MAX_NAME_LEN = 4096


def page_size_ok(ps: int) -> bool:
    """The one page-size rule (CONFIG, --page-size, image headers): a power of two in range."""
    return MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE and not ps & (ps - 1)
MAX_BLOCK_SIZE = 1 << 50
MAX_ABORT_MESSAGE = 4096
DIGEST_LEN = 16
UUID_LEN = 16
NONCE_LEN = 32
MAC_LEN = 32
FEATURE_PSK = 0x01  # HELLO features: the sender will prove it knows the pre-shared key
ACCEPT_RESUME = 0x01  # ACCEPT flags: DEST holds an old copy; RESUME_HASHES follow
MAX_RESUME_HASHES = 65536  # page hashes in one RESUME_HASHES message
COMPRESSION_AUTO = 127  # CONFIG: each packet's header names its own codec (--compress auto)
KIND_PAGES = 0  # a block copied page by page, pass after pass (a file or device)
KIND_BLOB = 1  # a blob sent whole after the pause (device state); packet-size "pages"
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

_NATIVE_LE = sys.byteorder == "little"


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


Message = Union[
    Packet, Hello, Welcome, Config, Layout, Accept, EpochStart, EpochEnd, Sync, Digest,
    Complete, Abort, Heartbeat, AuthChallenge, AuthResponse, AuthOk, ResumeHashes, Metadata,
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
)


# --- encoding ------------------------------------------------------------------
def encode_header(h: Header) -> bytes:
    """Pack a header and append the CRC32 of its first 36 bytes."""
    raw = HEADER.pack(
        MAGIC, h.type, h.flags, h.compression, 0, h.block, 0, h.epoch, h.packet_num,
        h.normal, h.zero, h.payload_len, 0,
    )
    crc = zlib.crc32(raw[:HEADER_CRC_SPAN])
    return raw[:HEADER_CRC_SPAN] + struct.pack("<I", crc)


def _u64_array(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def encode_packet(
    *,
    epoch: int,
    packet_num: int,
    block: int,
    normal_offsets: Sequence[int],
    zero_offsets: Sequence[int],
    hashes: Sequence[int],
    payload: Buffer | Sequence[Buffer],
    compression: int = 0,
    raw: bool = False,
) -> list[Buffer]:
    """Return the packet as a buffer list for sendmsg(); the payload is not copied.

    `payload` is one buffer, or a list of buffers that together form it (pages
    gathered from several places are sent without joining them first).
    """
    if len(hashes) != len(normal_offsets):
        raise ValueError("one hash per normal page")
    parts: list[Buffer] = (
        [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    )
    h = Header(
        MsgType.PACKET, FLAG_RAW if raw else 0, compression, block, epoch, packet_num,
        len(normal_offsets), len(zero_offsets), sum(len(b) for b in parts),
    )
    return [
        encode_header(h),
        _u64_array(list(normal_offsets) + list(zero_offsets)),
        _u64_array(hashes),
        *parts,
    ]


def _control(t: MsgType, payload: bytes = b"", *, epoch: int = 0) -> bytes:
    return encode_header(Header(t, epoch=epoch, payload_len=len(payload))) + payload


def encode_sync(epoch: int, packet_num: int, counts: Counts) -> bytes:
    """The SYNC packet that closes a channel's epoch (a PACKET with FLAG_SYNC)."""
    payload = SYNC_COUNTS.pack(counts.packets, counts.normal, counts.zero)
    h = Header(MsgType.PACKET, FLAG_SYNC, 0, 0, epoch, packet_num, 0, 0, len(payload))
    return encode_header(h) + payload


def encode_hello(role: int, session: bytes, features: int = 0, version: int = VERSION) -> bytes:
    return _control(MsgType.HELLO, HELLO.pack(version, role, session, features))


def encode_welcome(session: bytes, version: int = VERSION) -> bytes:
    return _control(MsgType.WELCOME, WELCOME.pack(version, session))


def encode_config(c: Config) -> bytes:
    return _control(
        MsgType.CONFIG,
        CONFIG.pack(c.channels, c.compression, c.level, c.page_size, c.packet_size, c.features),
    )


def encode_layout(layout: Layout) -> bytes:
    parts = [LAYOUT_COUNT.pack(len(layout.blocks))]
    for b in layout.blocks:
        name = b.name.encode("utf-8")
        parts.append(LAYOUT_BLOCK.pack(b.size, b.allocated, b.kind, len(name)))
        parts.append(name)
    return _control(MsgType.LAYOUT, b"".join(parts))


def encode_accept(flags: int = 0) -> bytes:
    return _control(MsgType.ACCEPT, ACCEPT.pack(flags))


def encode_metadata(m: Metadata) -> bytes:
    parts = [METADATA.pack(m.block, m.mode, m.uid, m.gid, m.mtime_ns, len(m.xattrs))]
    for name, value in m.xattrs:
        parts.append(XATTR.pack(len(name), len(value)) + name + value)
    return _control(MsgType.METADATA, b"".join(parts))


def encode_resume_hashes(block: int, first: int, hashes: Sequence[int]) -> bytes:
    return _control(
        MsgType.RESUME_HASHES, RESUME_HASHES.pack(block, first, len(hashes)) + _u64_array(hashes)
    )


def encode_epoch_start(epoch: int, sizes: Sequence[int]) -> bytes:
    payload = EPOCH_START.pack(epoch, len(sizes)) + b"".join(BLOCK_SIZE.pack(s) for s in sizes)
    return _control(MsgType.EPOCH_START, payload, epoch=epoch)


def encode_epoch_end(epoch: int, counts: Counts) -> bytes:
    payload = EPOCH_END.pack(epoch, counts.packets, counts.normal, counts.zero)
    return _control(MsgType.EPOCH_END, payload, epoch=epoch)


def encode_heartbeat() -> bytes:
    return _control(MsgType.HEARTBEAT)


def encode_digest(epoch: int, digest: bytes) -> bytes:
    return _control(MsgType.DIGEST, DIGEST.pack(epoch, digest), epoch=epoch)


def encode_complete(digest: bytes, written: int) -> bytes:
    return _control(MsgType.COMPLETE, COMPLETE.pack(digest, written))


def encode_auth_challenge(nonce: bytes) -> bytes:
    return _control(MsgType.AUTH_CHALLENGE, AUTH_CHALLENGE.pack(nonce))


def encode_auth_response(nonce: bytes, mac: bytes) -> bytes:
    return _control(MsgType.AUTH_RESPONSE, AUTH_RESPONSE.pack(nonce, mac))


def encode_auth_ok(mac: bytes) -> bytes:
    return _control(MsgType.AUTH_OK, AUTH_OK.pack(mac))


def encode_abort(exit_code: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:MAX_ABORT_MESSAGE]
    return _control(MsgType.ABORT, ABORT.pack(exit_code & 0xFF) + text)


# --- decoding --------------------------------------------------------------------
@dataclass
class Limits:
    """Caps the receiver applies before it allocates anything for a message."""

    max_pages: int = MAX_PAGES_PER_PACKET
    max_payload: int = MAX_PACKET_SIZE
    max_control: int = MAX_CONTROL_PAYLOAD


def parse_header(buf: Buffer, limits: Limits | None = None) -> Header:
    """Validate and unpack one 40-byte header; raise ProtocolError on any fault."""
    limits = limits or Limits()
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"header length: got {len(buf)}, expected {HEADER_SIZE}")
    (magic, mtype, flags, comp, _r1, block, _r2, epoch, pnum, normal, zero, plen, crc) = (
        HEADER.unpack(buf)
    )
    if magic != MAGIC:
        raise ProtocolError(f"magic: got {magic:#010x}, expected {MAGIC:#010x}")
    actual = zlib.crc32(bytes(buf[:HEADER_CRC_SPAN]))
    if crc != actual:
        raise ProtocolError(f"header CRC: got {crc:#010x}, expected {actual:#010x}")
    try:
        t = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"message type: got {mtype}, expected 1..{len(MsgType)}") from None
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"flags: got {flags:#04x}, expected a subset of {KNOWN_FLAGS:#04x}")
    if t == MsgType.PACKET:
        if normal + zero > limits.max_pages:
            raise ProtocolError(
                f"pages in packet: got {normal + zero}, expected at most {limits.max_pages}"
            )
        if plen > limits.max_payload:
            raise ProtocolError(
                f"payload length: got {plen}, expected at most {limits.max_payload}"
            )
        if flags & FLAG_SYNC:
            expect("SYNC packet pages", normal + zero, 0)
            expect("SYNC packet payload length", plen, SYNC_COUNTS.size)
    else:
        if flags:
            raise ProtocolError(f"flags on {t.name}: got {flags:#04x}, expected 0")
        expect(f"pages in {t.name}", normal + zero, 0)
        if plen > limits.max_control:
            raise ProtocolError(
                f"{t.name} payload length: got {plen}, expected at most {limits.max_control}"
            )
    return Header(t, flags, comp, block, epoch, pnum, normal, zero, plen)


def _u64_view(buf: memoryview) -> Sequence[int]:
    if _NATIVE_LE:
        return buf.cast("Q")
    return struct.unpack(f"<{len(buf) // 8}Q", buf)


def parse_packet_body(h: Header, body: Buffer) -> Packet | Sync:
    """Split a PACKET body into offsets, hashes and payload (views, no copies)."""
    mv = memoryview(body)
    expect("packet body length", len(mv), h.body_len)
    if h.is_sync:
        packets, normal, zero = SYNC_COUNTS.unpack(mv)
        return Sync(h.epoch, Counts(packets, normal, zero))
    n_off = 8 * (h.normal + h.zero)
    offsets = _u64_view(mv[:n_off])
    hashes = _u64_view(mv[n_off : n_off + 8 * h.normal])
    payload = mv[n_off + 8 * h.normal :]
    return Packet(h, offsets[: h.normal], offsets[h.normal :], hashes, payload)


def _check_session(session: bytes) -> None:
    expect("session UUID length", len(session), UUID_LEN)


def parse_control(h: Header, payload: Buffer) -> Message:
    """Decode the payload of every message type except PACKET."""
    p = bytes(payload)
    expect(f"{h.type.name} payload length", len(p), h.payload_len)
    t = h.type
    try:
        if t == MsgType.HELLO:
            expect("HELLO length", len(p), HELLO.size)
            version, role, session, features = HELLO.unpack(p)
            return Hello(version, role, session, features)
        if t == MsgType.WELCOME:
            expect("WELCOME length", len(p), WELCOME.size)
            version, session = WELCOME.unpack(p)
            return Welcome(version, session)
        if t == MsgType.CONFIG:
            expect("CONFIG length", len(p), CONFIG.size)
            return Config(*CONFIG.unpack(p))
        if t == MsgType.LAYOUT:
            return _parse_layout(p)
        if t == MsgType.ACCEPT:
            expect("ACCEPT length", len(p), ACCEPT.size)
            (flags,) = ACCEPT.unpack(p)
            if flags & ~ACCEPT_RESUME:
                raise ProtocolError(f"ACCEPT flags: got {flags:#x}, expected a subset of {ACCEPT_RESUME:#x}")
            return Accept(flags)
        if t == MsgType.METADATA:
            return _parse_metadata(p)
        if t == MsgType.RESUME_HASHES:
            block, first, n = RESUME_HASHES.unpack_from(p)
            if n > MAX_RESUME_HASHES:
                raise ProtocolError(f"RESUME_HASHES count: got {n}, expected at most {MAX_RESUME_HASHES}")
            expect("RESUME_HASHES length", len(p), RESUME_HASHES.size + 8 * n)
            hashes = struct.unpack_from(f"<{n}Q", p, RESUME_HASHES.size)
            return ResumeHashes(block, first, tuple(hashes))
        if t == MsgType.EPOCH_START:
            epoch, n = EPOCH_START.unpack_from(p)
            if n > MAX_BLOCKS:
                raise ProtocolError(f"block count: got {n}, expected at most {MAX_BLOCKS}")
            expect("EPOCH_START length", len(p), EPOCH_START.size + 8 * n)
            sizes = struct.unpack_from(f"<{n}Q", p, EPOCH_START.size)
            for s in sizes:
                if s > MAX_BLOCK_SIZE:
                    raise ProtocolError(f"block size: got {s}, expected at most {MAX_BLOCK_SIZE}")
            expect("EPOCH_START epoch", epoch, h.epoch)
            return EpochStart(epoch, tuple(sizes))
        if t == MsgType.EPOCH_END:
            expect("EPOCH_END length", len(p), EPOCH_END.size)
            epoch, packets, normal, zero = EPOCH_END.unpack(p)
            expect("EPOCH_END epoch", epoch, h.epoch)
            return EpochEnd(epoch, Counts(packets, normal, zero))
        if t == MsgType.HEARTBEAT:
            expect("HEARTBEAT length", len(p), 0)
            return Heartbeat()
        if t == MsgType.DIGEST:
            expect("DIGEST length", len(p), DIGEST.size)
            epoch, digest = DIGEST.unpack(p)
            expect("DIGEST epoch", epoch, h.epoch)
            return Digest(epoch, digest)
        if t == MsgType.COMPLETE:
            expect("COMPLETE length", len(p), COMPLETE.size)
            digest, written = COMPLETE.unpack(p)
            return Complete(digest, written)
        if t == MsgType.ABORT:
            if not ABORT.size <= len(p) <= ABORT.size + MAX_ABORT_MESSAGE:
                raise ProtocolError(f"ABORT length: got {len(p)}, expected 1..{1 + MAX_ABORT_MESSAGE}")
            (code,) = ABORT.unpack_from(p)
            return Abort(code, p[ABORT.size :].decode("utf-8", "replace"))
        if t == MsgType.AUTH_CHALLENGE:
            expect("AUTH_CHALLENGE length", len(p), AUTH_CHALLENGE.size)
            return AuthChallenge(*AUTH_CHALLENGE.unpack(p))
        if t == MsgType.AUTH_RESPONSE:
            expect("AUTH_RESPONSE length", len(p), AUTH_RESPONSE.size)
            return AuthResponse(*AUTH_RESPONSE.unpack(p))
        if t == MsgType.AUTH_OK:
            expect("AUTH_OK length", len(p), AUTH_OK.size)
            return AuthOk(*AUTH_OK.unpack(p))
    except struct.error as e:
        raise ProtocolError(f"{t.name} payload: {e}") from None
    raise ProtocolError(f"message type {t.name} has no control payload")


def _parse_layout(p: bytes) -> Layout:
    (n,) = LAYOUT_COUNT.unpack_from(p)
    if not 1 <= n <= MAX_BLOCKS:
        raise ProtocolError(f"block count: got {n}, expected 1..{MAX_BLOCKS}")
    pos = LAYOUT_COUNT.size
    blocks = []
    for _ in range(n):
        size, allocated, kind, name_len = LAYOUT_BLOCK.unpack_from(p, pos)
        pos += LAYOUT_BLOCK.size
        if size > MAX_BLOCK_SIZE:
            raise ProtocolError(f"block size: got {size}, expected at most {MAX_BLOCK_SIZE}")
        if kind not in (KIND_PAGES, KIND_BLOB):
            raise ProtocolError(f"block kind: got {kind}, expected {KIND_PAGES} or {KIND_BLOB}")
        if name_len > MAX_NAME_LEN or pos + name_len > len(p):
            raise ProtocolError(
                f"block name length: got {name_len}, "
                f"expected at most {min(MAX_NAME_LEN, len(p) - pos)}"
            )
        try:
            name = p[pos : pos + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("block name: got bytes that are not UTF-8, expected UTF-8") from None
        pos += name_len
        check_block_name(name)
        blocks.append(BlockInfo(name, size, allocated, kind))
    expect("LAYOUT length", len(p), pos)
    check_block_names([b.name for b in blocks])
    return Layout(tuple(blocks))


def check_block_names(names: Sequence[str]) -> None:
    """Names must be unique, and none may be a directory of another."""
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ProtocolError(f"block name {dup!r}: got it twice, expected unique names")
    taken = set(names)
    for n in names:
        parts = n.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in taken:
                raise ProtocolError(
                    f"block name {n!r}: got it under {parent!r}, which is a block, "
                    "expected names that are not each other's directories"
                )


def _parse_metadata(p: bytes) -> Metadata:
    block, mode, uid, gid, mtime_ns, n = METADATA.unpack_from(p)
    if n > MAX_XATTRS:
        raise ProtocolError(f"xattr count: got {n}, expected at most {MAX_XATTRS}")
    pos = METADATA.size
    xattrs = []
    for _ in range(n):
        name_len, value_len = XATTR.unpack_from(p, pos)
        pos += XATTR.size
        if name_len > 255 or value_len > MAX_XATTR_VALUE or pos + name_len + value_len > len(p):
            raise ProtocolError(
                f"xattr lengths: got {name_len} and {value_len}, expected at most 255 and "
                f"{MAX_XATTR_VALUE} within the payload"
            )
        xattrs.append((p[pos : pos + name_len], p[pos + name_len : pos + name_len + value_len]))
        pos += name_len + value_len
    expect("METADATA length", len(p), pos)
    return Metadata(block, mode, uid, gid, mtime_ns, tuple(xattrs))


def check_block_name(name: str) -> None:
    """A block name is a relative path that can never leave DEST."""
    if not name or "\0" in name:
        raise ProtocolError(f"block name {name!r}: got an empty name or a NUL, expected a relative path")
    if name.startswith("/"):
        raise ProtocolError(f"block name {name!r}: got an absolute path, expected a relative one")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ProtocolError(
            f"block name {name!r}: got an empty, '.' or '..' component, expected plain names"
        )


class Decoder:
    """Incremental decoder: `feed()` bytes, then call `next_message()` until None.

    The main connection and the tests use this. The channel hot path calls
    `parse_header()` and `parse_packet_body()` directly on buffers it filled with
    recv_into, which is the same code without the intermediate copy.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._buf = bytearray()
        self._header: Header | None = None

    def feed(self, data: Buffer) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> Message | None:
        """Return the next whole message, or None when more bytes are needed."""
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            # a copy: a view would pin the bytearray while a raised error holds its traceback
            self._header = parse_header(self._buf[:HEADER_SIZE], self.limits)
            del self._buf[:HEADER_SIZE]
        h = self._header
        if len(self._buf) < h.body_len:
            return None
        body = bytes(self._buf[: h.body_len])
        del self._buf[: h.body_len]
        self._header = None
        if h.type == MsgType.PACKET:
            return parse_packet_body(h, body)
        return parse_control(h, body)

    def messages(self) -> Iterable[Message]:
        while (m := self.next_message()) is not None:
            yield m


# --- conversation state -------------------------------------------------------------
class State(IntEnum):
    AWAIT_HELLO = 1
    AWAIT_CONFIG = 2
    AWAIT_LAYOUT = 3
    AWAIT_EPOCH = 4  # between epochs (or before the first)
    IN_EPOCH = 5
    COMPLETING = 6
    AWAIT_WELCOME = 7
    AWAIT_ACCEPT = 8
    RUNNING = 9
    DONE = 10
    ABORTED = 11
    SYNCED = 12  # a destination channel held at the barrier


# Every legal move, keyed by (conversation, state, event). An event is a message
# type name, "SYNC" for a PACKET with FLAG_SYNC, or "RELEASE" for the local
# barrier release. HEARTBEAT and ABORT are legal in every live state (below).
TRANSITIONS: dict[tuple[str, State, str], State] = {
    # what recv's main connection accepts from send
    ("recv-main", State.AWAIT_HELLO, "HELLO"): State.AWAIT_CONFIG,
    ("recv-main", State.AWAIT_CONFIG, "CONFIG"): State.AWAIT_LAYOUT,
    ("recv-main", State.AWAIT_LAYOUT, "LAYOUT"): State.AWAIT_EPOCH,
    ("recv-main", State.AWAIT_EPOCH, "EPOCH_START"): State.IN_EPOCH,
    ("recv-main", State.IN_EPOCH, "EPOCH_END"): State.AWAIT_EPOCH,
    ("recv-main", State.AWAIT_EPOCH, "METADATA"): State.AWAIT_EPOCH,
    ("recv-main", State.AWAIT_EPOCH, "DIGEST"): State.COMPLETING,
    # what a recv channel accepts from its send channel
    ("recv-channel", State.AWAIT_HELLO, "HELLO"): State.SYNCED,
    ("recv-channel", State.SYNCED, "RELEASE"): State.IN_EPOCH,
    ("recv-channel", State.IN_EPOCH, "PACKET"): State.IN_EPOCH,
    ("recv-channel", State.IN_EPOCH, "SYNC"): State.SYNCED,
    # what send's main connection accepts from recv
    ("send-main", State.AWAIT_WELCOME, "WELCOME"): State.AWAIT_ACCEPT,
    ("send-main", State.AWAIT_ACCEPT, "ACCEPT"): State.RUNNING,
    ("send-main", State.RUNNING, "RESUME_HASHES"): State.RUNNING,
    ("send-main", State.RUNNING, "COMPLETE"): State.DONE,
    # what a send channel accepts from recv
    ("send-channel", State.AWAIT_WELCOME, "WELCOME"): State.RUNNING,
}
ALWAYS = ("HEARTBEAT", "ABORT")
START = {
    "recv-main": State.AWAIT_HELLO,
    "recv-channel": State.AWAIT_HELLO,
    "send-main": State.AWAIT_WELCOME,
    "send-channel": State.AWAIT_WELCOME,
}


_EVENT_NAMES: dict[type, str] = {
    Hello: "HELLO", Welcome: "WELCOME", Config: "CONFIG", Layout: "LAYOUT", Accept: "ACCEPT",
    EpochStart: "EPOCH_START", EpochEnd: "EPOCH_END", Packet: "PACKET", Sync: "SYNC",
    Heartbeat: "HEARTBEAT", Digest: "DIGEST", Complete: "COMPLETE", Abort: "ABORT",
    AuthChallenge: "AUTH_CHALLENGE", AuthResponse: "AUTH_RESPONSE", AuthOk: "AUTH_OK",
    ResumeHashes: "RESUME_HASHES", Metadata: "METADATA",
}


def event_name(msg: Message) -> str:
    """The TRANSITIONS event for a decoded message."""
    return _EVENT_NAMES[type(msg)]


@dataclass
class Conversation:
    """Tracks one connection through TRANSITIONS and rejects any other move."""

    kind: str
    state: State = field(init=False)

    def __post_init__(self) -> None:
        self.state = START[self.kind]

    def advance(self, event: str) -> State:
        if event == "ABORT":
            self.state = State.ABORTED
            return self.state
        if event == "HEARTBEAT" and self.state not in (State.DONE, State.ABORTED):
            return self.state
        nxt = TRANSITIONS.get((self.kind, self.state, event))
        if nxt is None:
            legal = sorted(e for (k, s, e) in TRANSITIONS if k == self.kind and s == self.state)
            raise ProtocolError(
                f"{self.kind} in state {self.state.name}: got {event}, "
                f"expected one of {', '.join(legal + list(ALWAYS)) or 'nothing'}"
            )
        self.state = nxt
        return nxt


# --- packet semantics ------------------------------------------------------------------
def page_length(offset: int, size: int, page_size: int) -> int:
    """Bytes of the page at `offset` in a block of `size` (the tail page is short)."""
    return min(page_size, size - offset)


def check_packet(p: Packet, sizes: Sequence[int], page_size: int, max_pages: int) -> int:
    """Check a data packet against the epoch's layout; return its raw payload size."""
    h = p.header
    if h.block >= len(sizes):
        raise ProtocolError(f"block id: got {h.block}, expected < {len(sizes)}")
    if h.normal + h.zero > max_pages:
        raise ProtocolError(f"pages in packet: got {h.normal + h.zero}, expected at most {max_pages}")
    size = sizes[h.block]
    normal = list(p.normal_offsets)
    zero = list(p.zero_offsets)
    # Whole-list checks in C; the slow loop runs only to name the culprit.
    # A power-of-two page size (every page block) checks alignment by OR-ing all
    # offsets together in C; a blob's chunk size may be any multiple of a page.
    mask = page_size - 1 if not page_size & (page_size - 1) else 0
    for kind, offs in (("page offset", normal), ("zero page offset", zero)):
        if not offs:
            continue
        misaligned = reduce(or_, offs) & mask if mask else any(o % page_size for o in offs)
        if misaligned or max(offs) >= size:
            bad = next(o for o in offs if o % page_size or o >= size)
            raise ProtocolError(
                f"{kind}: got {bad}, expected a multiple of {page_size} below {size}"
            )
    raw = len(normal) * page_size
    tail = size % page_size
    if tail and normal:
        raw -= (page_size - tail) * normal.count(size - tail)
    if h.compression == 0 or h.flags & FLAG_RAW:
        expect("uncompressed payload length", h.payload_len, raw)
    elif h.payload_len > raw:
        raise ProtocolError(f"compressed payload: got {h.payload_len} bytes for {raw} raw bytes")
    return raw


def check_config(c: Config, *, max_channels: int = MAX_CHANNELS) -> None:
    """Reject a CONFIG outside what this implementation accepts."""
    if not 1 <= c.channels <= max_channels:
        raise ProtocolError(f"channels: got {c.channels}, expected 1..{max_channels}")
    ps = c.page_size
    if not page_size_ok(ps):
        raise ProtocolError(
            f"page size: got {ps}, expected a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}"
        )
    if c.packet_size % ps or not ps <= c.packet_size <= MAX_PACKET_SIZE:
        raise ProtocolError(
            f"packet size: got {c.packet_size}, expected a multiple of {ps} up to {MAX_PACKET_SIZE}"
        )
