"""The multifd wire codec, sans-IO: messages to bytes and bytes to messages.

Encoding is plain functions that return bytes: `encode()` takes any control
message, and `encode_packet()` frames the hot path's page data as a buffer list
without copying it. Decoding is `Decoder`, fed bytes with `feed()`, or the two
pure steps `parse_header()` and `parse_packet_body()` that the channel's hot
path calls on buffers it filled itself. Nothing here touches a socket, a process
or a file, so every byte can be tested and fuzzed.

Fuzz invariant: any input, whole or split at any points, yields messages or a
ProtocolError; nothing else escapes.
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass
from functools import reduce
from operator import or_
from typing import Any, Callable, Iterable, Sequence

from multifd_cli.errors import ProtocolError, expect
from multifd_cli.wire.messages import (
    ABORT,
    ACCEPT,
    ACCEPT_OWNERS,
    ACCEPT_RESUME,
    AUTH_CHALLENGE,
    AUTH_OK,
    AUTH_RESPONSE,
    BLOCK_SIZE,
    COMPLETE,
    CONFIG,
    CONFIG_XATTRS,
    DIGEST,
    EPOCH_ACK,
    EPOCH_END,
    EPOCH_START,
    FLAG_RAW,
    FLAG_SYNC,
    HEADER,
    HEADER_CRC_SPAN,
    HEADER_SIZE,
    HELLO,
    KIND_BLOB,
    KIND_PAGES,
    KIND_TREE,
    KNOWN_FLAGS,
    LAYOUT_BLOCK,
    LAYOUT_COUNT,
    MAGIC,
    MANIFEST,
    MAX_ABORT_MESSAGE,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_CHANNELS,
    MAX_CONTROL_PAYLOAD,
    MAX_NAME_LEN,
    MAX_PACKET_SIZE,
    MAX_PAGE_SIZE,
    MAX_PAGES_PER_PACKET,
    MAX_RESUME_HASHES,
    MAX_XATTR_VALUE,
    MAX_XATTRS,
    METADATA,
    MIN_PAGE_SIZE,
    RESUME_HASHES,
    SYNC_COUNTS,
    VERSION,
    WELCOME,
    XATTR,
    Abort,
    Accept,
    AuthChallenge,
    AuthOk,
    AuthResponse,
    BlockInfo,
    Buffer,
    Complete,
    Config,
    Counts,
    Digest,
    EpochAck,
    EpochEnd,
    EpochStart,
    Header,
    Heartbeat,
    Hello,
    Layout,
    Manifest,
    Message,
    Metadata,
    MsgType,
    Packet,
    ResumeHashes,
    Sync,
    Tree,
    TreeRoot,
    Welcome,
)
from multifd_cli.wire.treecodec import parse_tree, parse_tree_root, tree_payload, tree_root_payload
from multifd_cli.wire.treeops import TreeOp

_NATIVE_LE = sys.byteorder == "little"


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


def encode_tree(epoch: int, ops: Sequence[TreeOp]) -> bytes:
    return _control(MsgType.TREE, tree_payload(epoch, ops), epoch=epoch)


def encode_tree_root(boot_id: bytes, ids: Sequence[tuple[int, int]]) -> bytes:
    return _control(MsgType.TREE_ROOT, tree_root_payload(boot_id, ids))


def encode_manifest(entries: int, digest: bytes) -> bytes:
    return _control(MsgType.MANIFEST, MANIFEST.pack(entries, digest))


def encode_epoch_ack(a: EpochAck) -> bytes:
    body = EPOCH_ACK.pack(a.epoch, a.wire_bytes, a.written_bytes, a.flush_us)
    return _control(MsgType.EPOCH_ACK, body, epoch=a.epoch)


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
            known = ACCEPT_RESUME | ACCEPT_OWNERS
            if flags & ~known:
                raise ProtocolError(f"ACCEPT flags: got {flags:#x}, expected a subset of {known:#x}")
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
        if t == MsgType.TREE:
            tree = parse_tree(p)
            expect("TREE epoch", tree.epoch, h.epoch)
            return tree
        if t == MsgType.TREE_ROOT:
            return parse_tree_root(p)
        if t == MsgType.MANIFEST:
            expect("MANIFEST length", len(p), MANIFEST.size)
            return Manifest(*MANIFEST.unpack(p))
        if t == MsgType.EPOCH_ACK:
            expect("EPOCH_ACK length", len(p), EPOCH_ACK.size)
            ack = EpochAck(*EPOCH_ACK.unpack(p))
            expect("EPOCH_ACK epoch", ack.epoch, h.epoch)
            return ack
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
        if kind not in (KIND_PAGES, KIND_BLOB, KIND_TREE):
            raise ProtocolError(
                f"block kind: got {kind}, expected {KIND_PAGES}, {KIND_BLOB} or {KIND_TREE}"
            )
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
        if kind == KIND_TREE:
            if n != 1 or name:
                raise ProtocolError("tree block: got it named or beside other blocks, "
                                    "expected the only block, with an empty name")
        else:
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


def page_size_ok(ps: int) -> bool:
    """The one page-size rule (CONFIG, --page-size, image headers): a power of two in range."""
    return MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE and not ps & (ps - 1)


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
    if c.features & ~CONFIG_XATTRS:
        raise ProtocolError(f"CONFIG features: got {c.features:#x}, expected a subset of {CONFIG_XATTRS:#x}")


# --- one encoder for every message ----------------------------------------------------
def _encode_packet_msg(p: Packet, packet_num: int) -> bytes:
    h = p.header
    parts = encode_packet(
        epoch=h.epoch, packet_num=h.packet_num, block=h.block,
        normal_offsets=p.normal_offsets, zero_offsets=p.zero_offsets, hashes=p.hashes,
        payload=p.payload, compression=h.compression, raw=bool(h.flags & FLAG_RAW),
    )
    return b"".join(bytes(b) for b in parts)


_ENCODERS: dict[type, Callable[[Any, int], bytes]] = {
    Hello: lambda m, _: encode_hello(m.role, m.session, m.features, m.version),
    Welcome: lambda m, _: encode_welcome(m.session, m.version),
    Config: lambda m, _: encode_config(m),
    Layout: lambda m, _: encode_layout(m),
    Accept: lambda m, _: encode_accept(m.flags),
    Metadata: lambda m, _: encode_metadata(m),
    ResumeHashes: lambda m, _: encode_resume_hashes(m.block, m.first, m.hashes),
    EpochStart: lambda m, _: encode_epoch_start(m.epoch, m.sizes),
    EpochEnd: lambda m, _: encode_epoch_end(m.epoch, m.counts),
    Heartbeat: lambda m, _: encode_heartbeat(),
    Digest: lambda m, _: encode_digest(m.epoch, m.digest),
    Complete: lambda m, _: encode_complete(m.digest, m.written),
    AuthChallenge: lambda m, _: encode_auth_challenge(m.nonce),
    AuthResponse: lambda m, _: encode_auth_response(m.nonce, m.mac),
    AuthOk: lambda m, _: encode_auth_ok(m.mac),
    Abort: lambda m, _: encode_abort(m.exit_code, m.message),
    Tree: lambda m, _: encode_tree(m.epoch, m.ops),
    TreeRoot: lambda m, _: encode_tree_root(m.boot_id, m.ids),
    Manifest: lambda m, _: encode_manifest(m.entries, m.digest),
    EpochAck: lambda m, _: encode_epoch_ack(m),
    Sync: lambda m, n: encode_sync(m.epoch, n, m.counts),
    Packet: _encode_packet_msg,
}


def encode(msg: Message, *, packet_num: int = 0) -> bytes:
    """Any message as the bytes that go on the wire; the inverse of `Decoder`.

    A SYNC's packet number is its channel's count, not part of the message, so
    it is passed in; a PACKET carries its own in its header. The hot path frames
    packets with `encode_packet()` instead, which copies no page data.
    """
    return _ENCODERS[type(msg)](msg, packet_num)
