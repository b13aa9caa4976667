"""Property tests of the codec's invariant: any bytes, whole or split anywhere,
yield messages or a ProtocolError and nothing else escapes. The same holds for
Conversation fed any sequence of events.

Kept small (a couple of seconds per test) because CI runs it every time;
tests/fuzz/fuzz_decoder.py is the long-running version.
"""

from __future__ import annotations

import typing
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd_cli import wire as P
from multifd_cli.errors import InternalError, ProtocolError

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN = {p.stem: p.read_bytes() for p in sorted(GOLDEN_DIR.glob("*.bin"))}
STREAM = b"".join(GOLDEN.values())
MESSAGE_TYPES = tuple(typing.get_args(P.Message))  # every decodable message, kept in sync
# Small caps so that mutated length fields are rejected or completed quickly
# instead of waiting for megabytes that never come.
LIMITS = P.Limits(max_pages=64, max_payload=4096, max_control=4096)

SETTINGS = settings(
    max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def run(data: bytes, cuts: list[int], limits: P.Limits | None = None) -> list[object]:
    """Feed `data` split at `cuts`; return the messages, stopping at a ProtocolError.

    Anything other than a message, None or ProtocolError fails the test.
    """
    d = P.Decoder(limits)
    out: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for lo, hi in zip(bounds, bounds[1:]):
        d.feed(data[lo:hi])
        try:
            for msg in d.messages():
                assert isinstance(msg, MESSAGE_TYPES), msg
                P.event_name(msg)
                out.append(msg)
        except ProtocolError as e:
            assert str(e)
            d.feed(b"x")  # the decoder stays usable as an object after an error
            return out
    assert d.buffered <= len(data)
    return out


def check_packets(msgs: list[object]) -> None:
    """check_packet on whatever packets came out: ProtocolError or a size only."""
    for m in msgs:
        if isinstance(m, P.Packet):
            for sizes in ([], [0], [1300, 4096], [1 << 40]):
                try:
                    assert P.check_packet(m, sizes, 512, 64) >= 0
                except ProtocolError:
                    pass


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        i = pos % (len(b) + 1)
        if kind == 0 and b:  # flip one bit
            b[i % len(b)] ^= 1 << (val % 8)
        elif kind == 1 and b:  # overwrite a byte
            b[i % len(b)] = val
        elif kind == 2:  # insert a byte
            b[i:i] = bytes([val])
        elif kind == 3 and b:  # delete a byte
            del b[i % len(b)]
        elif kind == 4:  # truncate
            del b[i:]
        elif kind == 5:  # duplicate a slice
            b[i:i] = b[i : i + 1 + val % 48]
    return bytes(b)


ops = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1, max_size=6,
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=8)
golden_names = st.sampled_from(sorted(GOLDEN))


@SETTINGS
@given(data=st.binary(max_size=512), cuts=cuts)
def test_random_bytes(data, cuts):
    run(data, cuts)
    run(data, cuts, LIMITS)


@SETTINGS
@given(body=st.binary(max_size=256), mtype=st.integers(0, 255), flags=st.integers(0, 255),
       normal=st.integers(0, 40), zero=st.integers(0, 40), cuts=cuts)
def test_random_bodies_behind_valid_headers(body, mtype, flags, normal, zero, cuts):
    """Random bytes after a header with a good CRC reach the body parsers."""
    plen = max(0, len(body) - 16 * normal - 8 * zero) if mtype == P.MsgType.PACKET else len(body)
    if mtype != P.MsgType.PACKET:
        normal = zero = 0
    raw = P.HEADER.pack(P.MAGIC, mtype, flags, 0, 0, 0, 0, 0, 0, normal, zero, plen, 0)
    header = raw[:36] + zlib.crc32(raw[:36]).to_bytes(4, "little")
    msgs = run(header + body, cuts)
    check_packets(msgs)


@SETTINGS
@given(name=golden_names, ops=ops, cuts=cuts)
def test_mutated_golden_vectors(name, ops, cuts):
    data = mutate(GOLDEN[name], ops)
    check_packets(run(data, cuts))
    run(data, cuts, LIMITS)


@SETTINGS
@given(ops=ops, cuts=cuts)
def test_mutated_stream(ops, cuts):
    run(mutate(STREAM, ops), cuts, LIMITS)


@SETTINGS
@given(name=golden_names, cuts=cuts, prefix=st.binary(max_size=8))
def test_golden_split_anywhere_decodes_identically(name, cuts, prefix):
    data = GOLDEN[name]
    whole = run(data, [])
    assert len(whole) == 1
    split = run(data, cuts)
    assert [P.event_name(m) for m in split] == [P.event_name(m) for m in whole]
    if not isinstance(whole[0], P.Packet):
        assert split == whole
    # garbage in front: an error or nothing (never a crash); golden bytes never start with it
    run(prefix + data, cuts)


EVENTS = sorted({e for (_, _, _, e) in P.TRANSITIONS} | {"BOGUS", "", "sync"})
MOVES = st.tuples(st.sampled_from([P.SEND, P.RECV]), st.sampled_from(EVENTS))


@SETTINGS
@given(kind=st.sampled_from(sorted(P.START)), moves=st.lists(MOVES, max_size=40))
def test_conversation_random_events(kind, moves):
    """Any sequence of moves, either way: each is the table's, or refused with the
    error of its direction and no change of state."""
    c = P.Conversation(kind)
    for direction, ev in moves:
        before = c.state
        try:
            after = c.send(ev) if direction == P.SEND else c.receive(ev)
        except ProtocolError as e:
            assert direction == P.RECV
            assert f"in state {before.name}: got {ev}," in str(e)
            assert c.state == before
            continue
        except InternalError as e:
            assert direction == P.SEND
            assert f"in state {before.name}: about to send {ev}," in str(e)
            assert c.state == before
            continue
        assert after == c.state == P.TRANSITIONS[(kind, before, direction, ev)]
        if ev == "ABORT":
            assert after == P.State.ABORTED
        elif ev == "HEARTBEAT":
            assert after == before
