"""The sans-IO wire format: golden vectors, decoder behaviour, checks, states.

Golden vectors live in tests/golden/*.bin and are written by
tests/golden/make_golden.py --write (only on a deliberate format change).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import struct
import subprocess
import sys
import zlib
from collections import deque
from pathlib import Path

import pytest
import xxhash

from multifd_cli import wire as P
from multifd_cli.errors import InternalError, ProtocolError

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def _load_golden():
    spec = importlib.util.spec_from_file_location("multifd_golden", GOLDEN_DIR / "make_golden.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = _load_golden()
NAMES = list(G.VECTORS)
GOT_EXPECTED = re.compile(r"got .+, expected .+")


def golden(name: str) -> bytes:
    return (GOLDEN_DIR / f"{name}.bin").read_bytes()


def norm(msg: object) -> object:
    """A comparable form of a decoded message (a Packet holds memoryviews)."""
    if isinstance(msg, P.Packet):
        return (
            "PACKET", msg.header, list(msg.normal_offsets), list(msg.zero_offsets),
            list(msg.hashes), bytes(msg.payload),
        )
    return msg


def expected(name: str) -> object:
    msg, _ = G.VECTORS[name]
    if name == "packet":
        f = G.PACKET_FIELDS
        header = P.Header(
            P.MsgType.PACKET, 0, 0, f["block"], f["epoch"], f["packet_num"],
            len(f["normal_offsets"]), len(f["zero_offsets"]), len(f["payload"]),
        )
        return (
            "PACKET", header, f["normal_offsets"], f["zero_offsets"], f["hashes"],
            f["payload"],
        )
    return msg


def decode_all(data: bytes, limits: P.Limits | None = None) -> list[object]:
    d = P.Decoder(limits)
    d.feed(data)
    out = [norm(m) for m in d.messages()]
    assert d.buffered == 0
    return out


def hdr(
    mtype: int, *, flags: int = 0, comp: int = 0, block: int = 0, epoch: int = 0,
    pnum: int = 0, normal: int = 0, zero: int = 0, plen: int = 0, magic: int = P.MAGIC,
) -> bytes:
    """A header with a correct CRC built straight from the layout, not by encode_header."""
    raw = struct.pack(
        "<IBBBBHHIQIII", magic, mtype, flags, comp, 0, block, 0, epoch, pnum, normal, zero, plen
    )
    return raw + struct.pack("<I", zlib.crc32(raw))


def control(mtype: P.MsgType, payload: bytes, *, epoch: int = 0) -> bytes:
    return hdr(mtype, epoch=epoch, plen=len(payload)) + payload


def raises(data: bytes, pattern: str, limits: P.Limits | None = None) -> str:
    d = P.Decoder(limits)
    d.feed(data)
    with pytest.raises(ProtocolError) as ei:
        list(d.messages())
    text = str(ei.value)
    assert re.search(pattern, text), text
    return text


# --- (a) encoding equals the committed bytes -----------------------------------------
def test_one_vector_per_message_type_plus_sync():
    assert {p.stem for p in GOLDEN_DIR.glob("*.bin")} == set(NAMES)
    variants = {"accept_resume"}  # a second vector of a type, with a flag set
    assert {n.upper() for n in NAMES if n not in variants} == {t.name for t in P.MsgType} | {"SYNC"}


@pytest.mark.parametrize("name", NAMES)
def test_encoding_matches_golden_bytes(name):
    _, encoded = G.VECTORS[name]
    assert encoded == golden(name)


@pytest.mark.parametrize("name", NAMES)
def test_generic_encode_inverts_the_decoder(name):
    """encode(message) gives back the golden bytes the message was decoded from."""
    data = golden(name)
    (msg,) = _fed(data).messages()
    packet_num = P.parse_header(data[: P.HEADER_SIZE]).packet_num
    assert P.encode(msg, packet_num=packet_num) == data


def test_golden_bytes_spot_checks():
    # Pinned by hand, independent of the generator and the encoder.
    hb = golden("heartbeat")
    assert hb[:4] == b"1DFM"  # MAGIC 0x4D464431, little-endian
    assert hb[4] == P.MsgType.HEARTBEAT and hb[5:36] == bytes(31)
    assert hb[36:] == struct.pack("<I", zlib.crc32(hb[:36]))
    hello = golden("hello")
    assert hello[40:] == bytes.fromhex("0200ffff") + bytes(range(16)) + bytes(4)
    layout = golden("layout")
    assert "données-ñ-日本".encode() in layout
    packet = golden("packet")
    assert len(packet) == 40 + 8 * 3 + 8 * 2 + 512 + 276


# --- (b) decoding gives the expected message ----------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_decoding_golden_bytes(name):
    assert decode_all(golden(name)) == [expected(name)]


def test_hot_path_matches_decoder():
    data = golden("packet")
    h = P.parse_header(data[: P.HEADER_SIZE])
    assert h.body_len == len(data) - P.HEADER_SIZE
    pkt = P.parse_packet_body(h, data[P.HEADER_SIZE :])
    assert norm(pkt) == expected("packet")
    sync = golden("sync")
    sh = P.parse_header(sync[: P.HEADER_SIZE])
    assert sh.is_sync and not h.is_sync
    assert P.parse_packet_body(sh, sync[P.HEADER_SIZE :]) == expected("sync")


def test_golden_packet_passes_check_packet():
    d = P.Decoder()
    d.feed(golden("packet"))
    msg = d.next_message()
    assert isinstance(msg, P.Packet)
    assert P.check_packet(msg, [G.BLOCK0_SIZE, G.BLOCK1_SIZE], G.PAGE_SIZE, 16) == 512 + 276


def test_golden_digest_is_the_page_hash_table_digest() -> None:
    """The golden DIGEST is what the real table code computes for that layout."""
    from multifd_cli.common.tables import SharedTable, table_digest

    zero = xxhash.xxh3_64_intdigest(bytes(G.PAGE_SIZE))
    hashes0 = [xxhash.xxh3_64_intdigest(G.PAGE0), zero, xxhash.xxh3_64_intdigest(G.TAIL)]
    hashes1 = [zero] * (G.BLOCK1_SIZE // G.PAGE_SIZE)
    tables = []
    for size, hashes in ((G.BLOCK0_SIZE, hashes0), (G.BLOCK1_SIZE, hashes1)):
        t = SharedTable("golden", "Q", len(hashes))
        for i, h in enumerate(hashes):
            t.view[i] = h
        tables.append((size, t))
    try:
        want = table_digest((size, t, G.PAGE_SIZE) for size, t in tables)
    finally:
        for _, t in tables:
            t.close()
    assert decode_all(golden("digest")) == [P.Digest(3, want)]


# --- (c) whole, byte by byte, with trailing bytes -------------------------------------
TRAILERS = [b"\x00", b"1DFM", bytes(P.HEADER_SIZE - 1)]


def tr(data: bytes, want: list[object]) -> None:
    """h11-style: the same bytes fed whole, byte by byte and with trailing bytes."""
    d = P.Decoder()
    d.feed(data)
    assert [norm(m) for m in d.messages()] == want
    assert d.buffered == 0
    assert d.next_message() is None

    d = P.Decoder()
    got = []
    for i in range(len(data)):
        d.feed(data[i : i + 1])
        got.extend(norm(m) for m in d.messages())
    assert got == want
    assert d.buffered == 0

    for trailer in TRAILERS + [golden("heartbeat")[:-1]]:
        d = P.Decoder()
        d.feed(data + trailer)
        assert [norm(m) for m in d.messages()] == want
        assert d.buffered == len(trailer)
        assert d.next_message() is None
        assert d.buffered == len(trailer)


@pytest.mark.parametrize("name", NAMES)
def test_tr_golden(name):
    tr(golden(name), [expected(name)])


def test_trailing_bytes_complete_into_the_next_message():
    hb = golden("heartbeat")
    d = P.Decoder()
    d.feed(golden("accept") + hb[:10])
    assert list(d.messages()) == [P.Accept()]
    assert d.buffered == 10
    d.feed(hb[10:])
    assert list(d.messages()) == [P.Heartbeat()]
    assert d.buffered == 0


def test_decoder_accepts_bytearray_and_memoryview():
    data = golden("layout")
    for buf in (bytearray(data), memoryview(data)):
        d = P.Decoder()
        d.feed(buf)
        assert list(d.messages()) == [expected("layout")]


# --- (d) a stream of every message, in order ---------------------------------------
def test_stream_of_all_messages():
    data = b"".join(golden(n) for n in G.STREAM_ORDER)
    want = [expected(n) for n in G.STREAM_ORDER]
    tr(data, want)


def test_stream_in_uneven_chunks():
    data = b"".join(golden(n) for n in G.STREAM_ORDER) * 2
    want = [expected(n) for n in G.STREAM_ORDER] * 2
    for step in (3, 7, 39, 40, 41, 100, 1000):
        d = P.Decoder()
        got = []
        for i in range(0, len(data), step):
            d.feed(data[i : i + step])
            got.extend(norm(m) for m in d.messages())
        assert got == want, step


# --- (e) corruptions ---------------------------------------------------------------
def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def test_wrong_magic():
    raises(flip(golden("heartbeat"), 0), r"^magic: got 0x4d464430, expected 0x4d464431$")
    raises(hdr(P.MsgType.HEARTBEAT, magic=0x4D464432), r"^magic: got 0x4d464432, expected")


@pytest.mark.parametrize("index", [4, 5, 8, 12, 16, 24, 28, 32, 36, 39])
def test_bad_crc(index):
    raises(flip(golden("heartbeat"), index), r"^header CRC: got 0x[0-9a-f]{8}, expected 0x")


@pytest.mark.parametrize("mtype", [0, len(P.MsgType) + 1, 200, 255])
def test_unknown_type(mtype):
    raises(hdr(mtype), rf"^message type: got {mtype}, expected 1\.\.{len(P.MsgType)}$")


@pytest.mark.parametrize("flags", [0x04, 0x80, 0xFF])
def test_unknown_flags(flags):
    raises(
        hdr(P.MsgType.PACKET, flags=flags),
        r"^flags: got 0x[0-9a-f]{2}, expected a subset of 0x03$",
    )


def test_too_many_pages():
    raises(
        hdr(P.MsgType.PACKET, normal=P.MAX_PAGES_PER_PACKET, zero=1),
        rf"^pages in packet: got {P.MAX_PAGES_PER_PACKET + 1}, expected at most",
    )
    raises(
        hdr(P.MsgType.PACKET, zero=9), r"pages in packet: got 9, expected at most 8",
        P.Limits(max_pages=8),
    )


def test_packet_at_the_page_limit_is_buffered_not_rejected():
    d = P.Decoder()
    d.feed(hdr(P.MsgType.PACKET, zero=P.MAX_PAGES_PER_PACKET, plen=0))
    assert d.next_message() is None  # waits for 8 * MAX_PAGES_PER_PACKET bytes of offsets


def test_payload_over_the_limit():
    raises(
        hdr(P.MsgType.PACKET, plen=P.MAX_PACKET_SIZE + 1),
        rf"^payload length: got {P.MAX_PACKET_SIZE + 1}, expected at most {P.MAX_PACKET_SIZE}$",
    )
    raises(
        hdr(P.MsgType.LAYOUT, plen=P.MAX_CONTROL_PAYLOAD + 1),
        r"^LAYOUT payload length: got \d+, expected at most",
    )
    raises(
        hdr(P.MsgType.PACKET, plen=1025), r"got 1025, expected at most 1024",
        P.Limits(max_payload=1024),
    )
    raises(
        hdr(P.MsgType.ABORT, plen=65), r"ABORT payload length: got 65, expected at most 64",
        P.Limits(max_control=64),
    )


@pytest.mark.parametrize("mtype", [t for t in P.MsgType if t != P.MsgType.PACKET])
@pytest.mark.parametrize("flags", [P.FLAG_SYNC, P.FLAG_RAW])
def test_flags_on_a_control_message(mtype, flags):
    raises(hdr(mtype, flags=flags), rf"^flags on {mtype.name}: got 0x0{flags}, expected 0$")


@pytest.mark.parametrize("mtype", [t for t in P.MsgType if t != P.MsgType.PACKET])
def test_pages_on_a_control_message(mtype):
    raises(hdr(mtype, normal=1), rf"^pages in {mtype.name}: got 1, expected 0$")
    raises(hdr(mtype, zero=2), rf"^pages in {mtype.name}: got 2, expected 0$")


@pytest.mark.parametrize("plen", [0, 16, 23, 25, 32])
def test_bad_sync_length(plen):
    raises(
        hdr(P.MsgType.PACKET, flags=P.FLAG_SYNC, plen=plen),
        rf"^SYNC packet payload length: got {plen}, expected 24$",
    )


def test_sync_with_pages():
    raises(
        hdr(P.MsgType.PACKET, flags=P.FLAG_SYNC, normal=1, plen=24),
        r"^SYNC packet pages: got 1, expected 0$",
    )


def layout_payload(*blocks: tuple[int, int, bytes], count: int | None = None) -> bytes:
    out = P.LAYOUT_COUNT.pack(len(blocks) if count is None else count)
    for size, allocated, name in blocks:
        out += P.LAYOUT_BLOCK.pack(size, allocated, P.KIND_PAGES, len(name)) + name
    return out


def test_layout_name_running_past_the_end():
    payload = layout_payload((4096, 0, b"disk.img"))[:-3]
    raises(control(P.MsgType.LAYOUT, payload), r"^block name length: got 8, expected at most 5$")
    # the second block's name runs past the end
    payload = layout_payload((4096, 0, b"a"), (4096, 0, b"bcdef"))[:-1]
    raises(control(P.MsgType.LAYOUT, payload), r"^block name length: got 5, expected at most 4$")


def test_layout_name_too_long():
    payload = layout_payload((4096, 0, b"n" * (P.MAX_NAME_LEN + 1)))
    raises(
        control(P.MsgType.LAYOUT, payload),
        rf"^block name length: got {P.MAX_NAME_LEN + 1}, expected at most {P.MAX_NAME_LEN}$",
    )


def test_layout_non_utf8_name():
    payload = layout_payload((4096, 0, b"bad\xff\xfename"))
    raises(control(P.MsgType.LAYOUT, payload), r"^block name: got .+, expected UTF-8")


def test_layout_block_counts():
    raises(control(P.MsgType.LAYOUT, layout_payload()), r"^block count: got 0, expected 1\.\.4096$")
    raises(
        control(P.MsgType.LAYOUT, layout_payload(count=P.MAX_BLOCKS + 1)),
        r"^block count: got 4097, expected 1\.\.4096$",
    )


def test_layout_block_size_over_the_limit():
    payload = layout_payload((P.MAX_BLOCK_SIZE + 1, 0, b"x"))
    raises(control(P.MsgType.LAYOUT, payload), r"^block size: got \d+, expected at most \d+$")
    ok = layout_payload((P.MAX_BLOCK_SIZE, 0, b"x"))
    assert decode_all(control(P.MsgType.LAYOUT, ok)) == [
        P.Layout((P.BlockInfo("x", P.MAX_BLOCK_SIZE, 0),))
    ]


def test_layout_trailing_bytes_and_truncation():
    payload = layout_payload((4096, 0, b"x")) + b"\x00"
    raises(control(P.MsgType.LAYOUT, payload), r"^LAYOUT length: got 23, expected 22$")
    # two blocks announced, one present: the codec reports a short payload
    raises(control(P.MsgType.LAYOUT, layout_payload((4096, 0, b"x"), count=2)), r"LAYOUT")
    raises(control(P.MsgType.LAYOUT, b"\x01"), r"LAYOUT")


def epoch_start_payload(epoch: int, sizes: list[int], count: int | None = None) -> bytes:
    n = len(sizes) if count is None else count
    return P.EPOCH_START.pack(epoch, n) + b"".join(P.BLOCK_SIZE.pack(s) for s in sizes)


def test_epoch_start_epoch_mismatch():
    data = control(P.MsgType.EPOCH_START, epoch_start_payload(4, [4096]), epoch=3)
    raises(data, r"^EPOCH_START epoch: got 4, expected 3$")


def test_epoch_start_length_and_limits():
    raises(
        control(P.MsgType.EPOCH_START, epoch_start_payload(1, [4096], count=2), epoch=1),
        r"^EPOCH_START length: got 14, expected 22$",
    )
    raises(
        control(P.MsgType.EPOCH_START, epoch_start_payload(1, [], count=P.MAX_BLOCKS + 1), epoch=1),
        r"^block count: got 4097, expected at most 4096$",
    )
    raises(
        control(P.MsgType.EPOCH_START, epoch_start_payload(1, [P.MAX_BLOCK_SIZE + 1]), epoch=1),
        r"^block size: got \d+, expected at most \d+$",
    )
    raises(control(P.MsgType.EPOCH_START, b"\x01\x00"), r"EPOCH_START")


def test_epoch_end_epoch_mismatch_and_length():
    raises(
        control(P.MsgType.EPOCH_END, P.EPOCH_END.pack(2, 1, 1, 1), epoch=3),
        r"^EPOCH_END epoch: got 2, expected 3$",
    )
    raises(
        control(P.MsgType.EPOCH_END, P.EPOCH_END.pack(3, 1, 1, 1)[:-1], epoch=3),
        r"^EPOCH_END length: got 27, expected 28$",
    )


@pytest.mark.parametrize(
    ("mtype", "size"),
    [
        (P.MsgType.HELLO, P.HELLO.size),
        (P.MsgType.WELCOME, P.WELCOME.size),
        (P.MsgType.CONFIG, P.CONFIG.size),
        (P.MsgType.ACCEPT, P.ACCEPT.size),
        (P.MsgType.HEARTBEAT, 0),
        (P.MsgType.DIGEST, P.DIGEST.size),
        (P.MsgType.COMPLETE, P.COMPLETE.size),
    ],
)
def test_fixed_size_control_lengths(mtype, size):
    for wrong in {size + 1, max(size - 1, 0) if size else 3}:
        pattern = rf"^{mtype.name} length: got {wrong}, expected {size}$"
        raises(control(mtype, bytes(wrong)), pattern)


def test_abort_lengths():
    raises(control(P.MsgType.ABORT, b""), r"^ABORT length: got 0, expected 1\.\.4097$")
    too_long = b"\x04" + b"m" * (P.MAX_ABORT_MESSAGE + 1)
    raises(control(P.MsgType.ABORT, too_long), r"^ABORT length: got 4098, expected 1\.\.4097$")
    longest = b"\x04" + b"m" * P.MAX_ABORT_MESSAGE
    assert decode_all(control(P.MsgType.ABORT, longest)) == [P.Abort(4, "m" * P.MAX_ABORT_MESSAGE)]


def test_abort_message_is_decoded_leniently_and_truncated_on_encode():
    assert decode_all(control(P.MsgType.ABORT, b"\x04bad\xff")) == [P.Abort(4, "bad\ufffd")]
    data = P.encode_abort(0x104, "x" * (P.MAX_ABORT_MESSAGE + 50))
    assert decode_all(data) == [P.Abort(4, "x" * P.MAX_ABORT_MESSAGE)]


def test_packet_body_length_mismatch():
    h = P.parse_header(golden("packet")[: P.HEADER_SIZE])
    with pytest.raises(ProtocolError, match=r"^packet body length: got \d+, expected \d+$"):
        P.parse_packet_body(h, golden("packet")[P.HEADER_SIZE : -1])


def test_header_length():
    with pytest.raises(ProtocolError, match=r"^header length: got 39, expected 40$"):
        P.parse_header(golden("heartbeat")[:-1])


def test_every_codec_error_names_got_and_expected():
    for data in [
        flip(golden("hello"), 0), flip(golden("hello"), 20), hdr(99), hdr(8, flags=8),
        control(P.MsgType.HELLO, b"x"), control(P.MsgType.CONFIG, bytes(3)),
    ]:
        assert GOT_EXPECTED.search(raises(data, "."))


def test_decoder_survives_a_held_error():
    """Holding a ProtocolError (and its traceback) must not pin the decoder's buffer."""
    d = P.Decoder()
    d.feed(flip(golden("heartbeat"), 0))
    with pytest.raises(ProtocolError) as ei:
        d.next_message()
    assert ei.value is not None
    d.feed(b"more")  # raised BufferError while the traceback held a view of the buffer
    assert d.buffered == P.HEADER_SIZE + 4


def test_decoder_resumes_after_a_bad_body():
    d = P.Decoder()
    d.feed(control(P.MsgType.HELLO, b"x") + golden("heartbeat"))
    with pytest.raises(ProtocolError):
        d.next_message()
    assert list(d.messages()) == [P.Heartbeat()]


# --- encoding helpers ------------------------------------------------------------------
def test_encode_packet_wants_one_hash_per_normal_page():
    with pytest.raises(ValueError):
        P.encode_packet(
            epoch=0, packet_num=0, block=0, normal_offsets=[0], zero_offsets=[], hashes=[],
            payload=b"",
        )


def test_encode_packet_does_not_copy_the_payload():
    payload = bytearray(512)
    parts = P.encode_packet(
        epoch=0, packet_num=0, block=0, normal_offsets=[0], zero_offsets=[], hashes=[1],
        payload=payload,
    )
    assert parts[-1] is payload


def test_raw_flag_round_trip():
    parts = P.encode_packet(
        epoch=1, packet_num=2, block=1, normal_offsets=[0], zero_offsets=[], hashes=[5],
        payload=b"p" * 512, compression=2, raw=True,
    )
    (pkt,) = P.Decoder.messages(_fed(b"".join(bytes(p) for p in parts)))
    assert pkt.header.flags == P.FLAG_RAW and pkt.header.compression == 2
    assert P.check_packet(pkt, [0, 4096], 512, 8) == 512


def _fed(data: bytes) -> P.Decoder:
    d = P.Decoder()
    d.feed(data)
    return d


# --- (f) check_packet ---------------------------------------------------------------------
SIZES = [1300, 4096]


def packet(
    normal: list[int], zero: tuple[int, ...] = (), payload: bytes | None = None, *, block: int = 0,
    compression: int = 0, raw: bool = False,
) -> P.Packet:
    if payload is None:
        payload = b"".join(
            bytes(P.page_length(o, SIZES[min(block, 1)], 512)) for o in normal
        )
    parts = P.encode_packet(
        epoch=1, packet_num=0, block=block, normal_offsets=normal, zero_offsets=list(zero),
        hashes=[0] * len(normal), payload=payload, compression=compression, raw=raw,
    )
    msg = _fed(b"".join(bytes(p) for p in parts)).next_message()
    assert isinstance(msg, P.Packet)
    return msg


def check(p: P.Packet, max_pages: int = 16) -> int:
    return P.check_packet(p, SIZES, 512, max_pages)


def test_check_packet_accepts_a_good_packet():
    assert check(packet([0, 512], [1024])) == 1024
    assert check(packet([0, 1024, 3584], [512], block=1)) == 1536


def test_check_packet_short_tail_page():
    assert P.page_length(1024, 1300, 512) == 276
    assert check(packet([1024])) == 276
    assert check(packet([], [1024])) == 0
    with pytest.raises(ProtocolError, match=r"^uncompressed payload length: got 512, expected 276"):
        check(packet([1024], payload=bytes(512)))


@pytest.mark.parametrize("off", [1, 100, 511, 513, 1000])
def test_check_packet_misaligned(off):
    with pytest.raises(ProtocolError, match=rf"^page offset: got {off}, expected a multiple of"):
        check(packet([off], payload=b""))
    with pytest.raises(ProtocolError, match=rf"^zero page offset: got {off}, expected a multiple"):
        check(packet([], [off]))


@pytest.mark.parametrize("off", [1536, 4096, 1 << 40])
def test_check_packet_offset_past_the_block(off):
    with pytest.raises(ProtocolError, match=rf"^page offset: got {off}, expected .* below 1300$"):
        check(packet([off], payload=b""))
    with pytest.raises(ProtocolError, match=rf"^zero page offset: got {off}, expected .* 1300$"):
        check(packet([], [off]))


def test_check_packet_block_out_of_range():
    with pytest.raises(ProtocolError, match=r"^block id: got 2, expected < 2$"):
        check(packet([], [0], block=2))
    with pytest.raises(ProtocolError, match=r"^block id: got 0, expected < 0$"):
        P.check_packet(packet([], [0]), [], 512, 16)


def test_check_packet_too_many_pages():
    with pytest.raises(ProtocolError, match=r"^pages in packet: got 3, expected at most 2$"):
        check(packet([0], [512, 1024]), max_pages=2)


def test_check_packet_raw_payload_length_mismatch():
    with pytest.raises(ProtocolError, match=r"^uncompressed payload length: got 511, expected 512"):
        check(packet([0], payload=bytes(511)))
    with pytest.raises(ProtocolError, match=r"^uncompressed payload length: got 513, expected 512"):
        check(packet([0], payload=bytes(513)))
    with pytest.raises(ProtocolError, match=r"^uncompressed payload length: got 10, expected 512$"):
        check(packet([0], payload=bytes(10), compression=1, raw=True))


def test_check_packet_compressed_payload():
    assert check(packet([0, 512], payload=bytes(10), compression=1)) == 1024
    assert check(packet([0, 512], payload=bytes(1024), compression=1)) == 1024
    with pytest.raises(ProtocolError, match=r"compressed payload"):
        check(packet([0, 512], payload=bytes(1025), compression=1))


# --- (g) check_config ------------------------------------------------------------------------
def cfg(**kw: int) -> P.Config:
    base = {
        "channels": 4, "compression": 0, "level": 0, "page_size": 4096, "packet_size": 512 << 10,
    }
    base.update(kw)
    return P.Config(**base)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"channels": 1},
        {"channels": P.MAX_CHANNELS},
        {"page_size": P.MIN_PAGE_SIZE, "packet_size": P.MIN_PAGE_SIZE},
        {"page_size": P.MAX_PAGE_SIZE, "packet_size": P.MAX_PACKET_SIZE},
    ],
)
def test_check_config_accepts(kw):
    P.check_config(cfg(**kw))


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"channels": 0}, r"^channels: got 0, expected 1\.\.64$"),
        ({"channels": P.MAX_CHANNELS + 1}, r"^channels: got 65, expected 1\.\.64$"),
        ({"page_size": 0}, r"^page size: got 0, expected a power of two in 512\.\.1048576$"),
        ({"page_size": 256}, r"^page size: got 256, expected"),
        ({"page_size": 4097}, r"^page size: got 4097, expected"),
        ({"page_size": 3 << 10}, r"^page size: got 3072, expected"),
        ({"page_size": 2 << 20, "packet_size": 4 << 20}, r"^page size: got 2097152, expected"),
        ({"packet_size": 4096 + 512}, r"^packet size: got 4608, expected a multiple of 4096 up to"),
        ({"packet_size": 0}, r"^packet size: got 0, expected"),
        ({"packet_size": P.MAX_PACKET_SIZE + 4096}, r"^packet size: got \d+, expected"),
    ],
)
def test_check_config_caps(kw, pattern):
    with pytest.raises(ProtocolError, match=pattern):
        P.check_config(cfg(**kw))


def test_check_config_max_channels_argument():
    P.check_config(cfg(channels=2), max_channels=2)
    with pytest.raises(ProtocolError, match=r"^channels: got 3, expected 1\.\.2$"):
        P.check_config(cfg(channels=3), max_channels=2)


def test_config_pages_per_packet():
    assert cfg().pages_per_packet == 128


# --- (h) Conversation ------------------------------------------------------------------------
KINDS = sorted(P.START)
EVENTS = sorted({e for (_, _, _, e) in P.TRANSITIONS})
DIRECTIONS = (P.SEND, P.RECV)
LIVE_END = {P.State.DONE, P.State.ABORTED}
S, R = P.SEND, P.RECV

# (direction, event) sequences that walk each role through every row of ORDER
LEGAL = {
    "recv-main": [
        [(R, "HELLO"), (S, "AUTH_CHALLENGE"), (R, "AUTH_RESPONSE"), (S, "AUTH_OK"),
         (S, "WELCOME"), (R, "CONFIG"), (S, "HEARTBEAT"), (R, "LAYOUT"), (S, "ACCEPT"),
         (S, "RESUME_HASHES"), (R, "EPOCH_START"), (S, "RESUME_HASHES"), (R, "HEARTBEAT"),
         (R, "EPOCH_END"), (S, "EPOCH_ACK"), (R, "EPOCH_START"), (S, "EPOCH_ACK"),
         (R, "EPOCH_END"), (R, "METADATA"), (R, "DIGEST"), (S, "EPOCH_ACK"), (S, "COMPLETE")],
        [(R, "HELLO"), (S, "WELCOME"), (R, "CONFIG"), (R, "LAYOUT"), (R, "TREE_ROOT"),
         (S, "ACCEPT"), (R, "TREE"), (R, "EPOCH_START"), (R, "EPOCH_END"), (R, "TREE"),
         (R, "MANIFEST"), (R, "DIGEST"), (S, "COMPLETE")],
        [(R, "HELLO"), (S, "WELCOME")],
    ],
    "send-main": [
        [(S, "HELLO"), (R, "AUTH_CHALLENGE"), (S, "AUTH_RESPONSE"), (R, "AUTH_OK"),
         (R, "WELCOME"), (S, "CONFIG"), (S, "LAYOUT"), (R, "ACCEPT"), (R, "RESUME_HASHES"),
         (S, "EPOCH_START"), (R, "RESUME_HASHES"), (R, "EPOCH_ACK"), (S, "EPOCH_END"),
         (R, "EPOCH_ACK"), (S, "METADATA"), (S, "HEARTBEAT"), (S, "DIGEST"), (R, "EPOCH_ACK"),
         (R, "COMPLETE")],
        [(S, "HELLO"), (R, "WELCOME"), (S, "CONFIG"), (S, "LAYOUT"), (S, "TREE_ROOT"),
         (R, "ACCEPT"), (S, "TREE"), (S, "EPOCH_START"), (S, "EPOCH_END"), (S, "TREE"),
         (S, "MANIFEST"), (S, "DIGEST"), (R, "COMPLETE")],
        [(S, "HELLO"), (R, "WELCOME")],
    ],
    "recv-channel": [
        [(R, "HELLO"), (S, "AUTH_CHALLENGE"), (R, "AUTH_RESPONSE"), (S, "AUTH_OK"),
         (S, "WELCOME"), (R, "RELEASE"), (R, "PACKET"), (R, "HEARTBEAT"), (R, "PACKET"),
         (R, "SYNC"), (R, "RELEASE"), (R, "SYNC")],
        [(R, "HELLO"), (S, "WELCOME")],
    ],
    "send-channel": [
        [(S, "HELLO"), (R, "AUTH_CHALLENGE"), (S, "AUTH_RESPONSE"), (R, "AUTH_OK"),
         (R, "WELCOME"), (S, "PACKET"), (S, "PACKET"), (S, "SYNC"), (S, "HEARTBEAT"),
         (S, "SYNC"), (S, "PACKET"), (S, "SYNC")],
        [(S, "HELLO"), (R, "WELCOME")],
    ],
}
FINAL = {
    "recv-main": P.State.DONE,
    "recv-channel": P.State.SYNCED,
    "send-main": P.State.DONE,
    "send-channel": P.State.SYNCED,
}


def move(c: P.Conversation, direction: str, ev: str) -> P.State:
    return c.send(ev) if direction == P.SEND else c.receive(ev)


def reachable(kind: str) -> dict[P.State, list[tuple[str, str]]]:
    """Every state of `kind` reachable through TRANSITIONS, with a shortest path to it."""
    paths: dict[P.State, list[tuple[str, str]]] = {P.START[kind]: []}
    todo = deque([P.START[kind]])
    while todo:
        s = todo.popleft()
        for (k, st, d, ev), nxt in P.TRANSITIONS.items():
            if k == kind and st == s and nxt not in paths:
                paths[nxt] = paths[s] + [(d, ev)]
                todo.append(nxt)
    return paths


def at(kind: str, path: list[tuple[str, str]]) -> P.Conversation:
    c = P.Conversation(kind)
    for d, ev in path:
        move(c, d, ev)
    return c


@pytest.mark.parametrize("kind", KINDS)
def test_legal_sequence(kind):
    for seq in LEGAL[kind]:
        c = P.Conversation(kind)
        assert c.state == P.START[kind]
        for d, ev in seq:
            assert move(c, d, ev) == c.state
    assert c.state == P.Conversation.handed_over(kind).state
    c = at(kind, LEGAL[kind][0])
    assert c.state == FINAL[kind]


def test_legal_sequences_cover_every_row():
    used = set()
    for kind, seqs in LEGAL.items():
        for seq in seqs:
            c = P.Conversation(kind)
            for d, ev in seq:
                before = c.state
                move(c, d, ev)
                used.add((kind, before, d, ev))
    assert used >= set(P.ORDER)


def test_main_roles_mirror_each_other():
    """Both ends of the main connection pass the same states, directions swapped."""
    flip = {P.SEND: P.RECV, P.RECV: P.SEND}
    send = {(s, d, e): n for (k, s, d, e), n in P.ORDER.items() if k == "send-main"}
    recv = {(s, flip[d], e): n for (k, s, d, e), n in P.ORDER.items() if k == "recv-main"}
    assert send == recv


def test_every_message_type_is_spoken_by_one_side_only():
    """Apart from HEARTBEAT and ABORT, each event has one direction per role."""
    for kind in KINDS:
        seen: dict[str, set[str]] = {}
        for (k, _, d, e) in P.ORDER:
            if k == kind:
                seen.setdefault(e, set()).add(d)
        assert all(len(ds) == 1 for ds in seen.values()), (kind, seen)


def test_recv_main_driven_by_decoded_golden_messages():
    c = P.Conversation("recv-main")
    d = P.Decoder()
    d.feed(golden("hello"))
    for msg in d.messages():
        c.receive(msg)
    c.send(P.Welcome(P.VERSION, bytes(16)))
    d.feed(b"".join(golden(n) for n in ["config", "layout"]))
    for msg in d.messages():
        c.receive(msg)
    c.send(P.Accept())
    d.feed(b"".join(golden(n) for n in ["epoch_start", "epoch_end", "heartbeat", "digest"]))
    for msg in d.messages():
        c.receive(msg)
    assert c.state == P.State.COMPLETING


@pytest.mark.parametrize("name", NAMES)
def test_event_name(name):
    (msg,) = _fed(golden(name)).messages()
    assert P.event_name(msg) == name.upper().removesuffix("_RESUME")


@pytest.mark.parametrize("name", ["packet", "sync", "heartbeat", "config"])
def test_event_name_of_a_bare_header(name):
    h = P.parse_header(golden(name)[: P.HEADER_SIZE])
    assert P.event_name(h) == name.upper()


@pytest.mark.parametrize("kind", KINDS)
def test_every_illegal_move_names_the_state(kind):
    for state, path in reachable(kind).items():
        for d in DIRECTIONS:
            for ev in EVENTS:
                c = at(kind, path)
                key = (kind, state, d, ev)
                if key in P.TRANSITIONS:
                    assert move(c, d, ev) == P.TRANSITIONS[key]
                    continue
                error = InternalError if d == P.SEND else ProtocolError
                with pytest.raises(error) as ei:
                    move(c, d, ev)
                text = str(ei.value)
                if d == P.RECV:
                    assert f"{kind} in state {state.name}: got {ev}, expected one of" in text
                else:
                    assert f"{kind} in state {state.name}: about to send {ev}, expected" in text
                assert c.state == state  # a refused move changes nothing


def test_illegal_move_message():
    c = P.Conversation("recv-main")
    with pytest.raises(ProtocolError) as ei:
        c.receive("CONFIG")
    assert str(ei.value) == "recv-main in state AWAIT_HELLO: got CONFIG, expected one of HELLO, ABORT"
    c = at("recv-channel", [(R, "HELLO"), (S, "WELCOME")])
    with pytest.raises(ProtocolError) as ei:
        c.receive("PACKET")
    assert str(ei.value) == (
        "recv-channel in state SYNCED: got PACKET, expected one of RELEASE, HEARTBEAT, ABORT"
    )
    c = at("send-main", [(S, "HELLO"), (R, "WELCOME")])
    with pytest.raises(InternalError) as ei2:
        c.send(P.EpochStart(1, (4096,)))
    assert str(ei2.value) == (
        "send-main in state AWAIT_CONFIG: about to send EPOCH_START, "
        "expected to send one of CONFIG, HEARTBEAT, ABORT"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeat_is_legal_exactly_in_the_live_states(kind):
    for state, path in reachable(kind).items():
        for d in DIRECTIONS:
            c = at(kind, path)
            if state in P.HEARTBEAT_STATES:
                assert move(c, d, "HEARTBEAT") == state
                assert move(c, d, "HEARTBEAT") == state
            else:
                with pytest.raises(InternalError if d == P.SEND else ProtocolError):
                    move(c, d, "HEARTBEAT")
    assert not P.HEARTBEAT_STATES & (LIVE_END | {P.State.AWAIT_HELLO, P.State.AWAIT_WELCOME})


@pytest.mark.parametrize("kind", KINDS)
def test_abort_moves_to_aborted_from_every_state(kind):
    for path in reachable(kind).values():
        for d in DIRECTIONS:
            c = at(kind, path)
            assert move(c, d, "ABORT") == P.State.ABORTED
            assert move(c, d, "ABORT") == P.State.ABORTED  # saying why twice is harmless
            with pytest.raises(ProtocolError, match="in state ABORTED"):
                c.receive("HEARTBEAT")
            with pytest.raises(InternalError, match="in state ABORTED"):
                c.send("HEARTBEAT")


def test_unknown_event_is_refused_both_ways():
    c = P.Conversation("send-channel")
    with pytest.raises(ProtocolError, match="got BOGUS"):
        c.receive("BOGUS")
    with pytest.raises(InternalError, match="about to send BOGUS"):
        c.send("BOGUS")


def test_handed_over_is_just_past_welcome():
    assert P.Conversation.handed_over("recv-channel").state == P.State.SYNCED
    assert P.Conversation.handed_over("send-channel").state == P.State.SYNCED
    assert P.Conversation.handed_over("send-main").state == P.State.AWAIT_CONFIG
    with pytest.raises(InternalError):
        P.Conversation("sideways")


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/", "./a", "a/.", "nul\0x"]
)
def test_block_names_that_could_leave_dest_are_refused(name):
    layout = P.Layout((P.BlockInfo(name, 10, 10),))
    raises(P.encode_layout(layout), r"^block name .*: got .*expected")


def test_duplicate_block_names_are_refused():
    layout = P.Layout((P.BlockInfo("a", 10, 10), P.BlockInfo("a", 20, 20)))
    raises(P.encode_layout(layout), r"^block name 'a': got it twice, expected unique names$")


@pytest.mark.parametrize("name", ["disk.img", "vm/disk.img", "a b/ü.img", "..hidden", "x.."])
def test_plain_relative_block_names_pass(name):
    P.check_block_name(name)


def test_messages_compare_by_type_and_fields_like_dataclasses() -> None:
    # Messages are NamedTuples (cheaper to define); equality must still be typed.
    c = P.Counts(1, 2, 3)
    assert P.Sync(1, c) == P.Sync(1, P.Counts(1, 2, 3))
    assert P.Sync(1, c) != P.EpochEnd(1, c)
    assert P.Sync(1, c) != (1, c)
    assert P.AuthOk(b"x" * 32) != P.AuthChallenge(b"x" * 32)
    assert c + P.Counts(1, 1, 1) == P.Counts(2, 3, 4)
    assert len({P.Digest(1, b"d"), P.Digest(1, b"d"), P.Complete(b"d", 1)}) == 2


# --- (i) sans-IO ----------------------------------------------------------------------------
FORBIDDEN = {"socket", "select", "selectors", "ssl", "multiprocessing", "threading", "subprocess"}
WIRE_DIR = Path(P.__file__).resolve().parent


@pytest.mark.parametrize("path", sorted(WIRE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_wire_imports_no_io(path):
    """wire/ names no socket, select, ssl, process or thread module, not even lazily."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("multifd_cli"):
                assert name == "multifd_cli.errors" or name.startswith("multifd_cli.wire"), (
                    f"{path.name} imports {name}: wire/ stands on errors alone"
                )


def test_importing_wire_loads_no_io_module():
    code = (
        "import sys; import multifd_cli.wire; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- directory-tree messages ---------------------------------------------------------
def _tree_bytes(op: int, plen: int, extra: bytes = b"") -> bytes:
    body = P.TREE.pack(1, 1) + P.TREE_OP.pack(op, -1, 0, -1, -1, -1, 0, 0, plen, 0) + extra
    return P.encode_header(P.Header(P.MsgType.TREE, epoch=1, payload_len=len(body))) + body


@pytest.mark.parametrize(("data", "why"), [
    (_tree_bytes(99, 1, b"a"), "TREE operation: got 99"),
    (_tree_bytes(1, 5, b"ab"), "TREE path and target lengths"),
    (_tree_bytes(1, 1, b"ab"), "TREE length"),
])
def test_malformed_tree_is_a_protocol_error(data: bytes, why: str) -> None:
    d = P.Decoder()
    d.feed(data)
    with pytest.raises(ProtocolError, match=why):
        d.next_message()


def test_tree_block_must_be_alone_and_unnamed() -> None:
    for blocks in [(P.BlockInfo("x", 1, 1, P.KIND_TREE),),
                   (P.BlockInfo("", 1, 1, P.KIND_TREE), P.BlockInfo("b", 1, 1))]:
        d = P.Decoder()
        d.feed(P.encode(P.Layout(blocks)))
        with pytest.raises(ProtocolError, match="tree block"):
            d.next_message()
