"""Whole conversations, played in memory between two sans-IO ends.

Each `Pair` wires a send Endpoint to a recv Endpoint (the same objects
MainConnection puts on a socket): what one end says is encoded, checked against
its own side of the state table, decoded by the other end and checked against
the other side. No socket, no process. The main connection plays the handshake
(with and without the key proof), setup (with and without resume hashes),
epochs, metadata and completion, and an ABORT from every live state; a channel
plays HELLO/WELCOME, the barrier's RELEASE, PACKETs, SYNC and the next epoch.
Out-of-order moves are refused on both sides: InternalError for one we would
send, ProtocolError for one we hear.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd_cli import wire as P
from multifd_cli.errors import InternalError, ProtocolError
from multifd_cli.net import auth

SESSION = bytes(range(16))
KEY = b"k" * 32
PS = 4096
CONFIG = P.Config(2, 0, 0, PS, 64 * PS)
LAYOUT = P.Layout((P.BlockInfo("disk.img", 3 * PS, 3 * PS),))
S, R = "send", "recv"
OTHER = {S: R, R: S}


def wire_bytes(msgs: list[P.Message], packet_num: int = 0) -> bytes:
    """Compare messages by their bytes: a decoded PACKET holds views, not lists."""
    return b"".join(P.encode(m, packet_num=packet_num) for m in msgs)


class Pair:
    """The two ends of one connection, in memory, with the bytes in flight per direction."""

    def __init__(self, connection: str = "main", chunk: int = 0) -> None:
        self.connection = connection
        self.ends = {
            S: P.Endpoint(P.Conversation(f"send-{connection}")),
            R: P.Endpoint(P.Conversation(f"recv-{connection}")),
        }
        self.in_flight = {S: b"", R: b""}  # what each side said and the other has not read
        self.chunk = chunk  # deliver in pieces of this many bytes (0: whole)

    def state(self, side: str) -> P.State:
        return self.ends[side].conv.state

    def put(self, side: str, *msgs: P.Message, packet_num: int = 0) -> None:
        """`side` says `msgs`; they travel but are not read yet."""
        self.in_flight[side] += self.ends[side].send(*msgs, packet_num=packet_num)

    def deliver(self, side: str) -> list[P.Message]:
        """The other end reads everything `side` said so far."""
        data, self.in_flight[side] = self.in_flight[side], b""
        step = self.chunk or max(1, len(data))
        heard: list[P.Message] = []
        for i in range(0, len(data), step):
            heard += self.ends[OTHER[side]].receive_data(data[i : i + step])
        assert self.ends[OTHER[side]].buffered == 0
        return heard

    def say(self, side: str, *msgs: P.Message, packet_num: int = 0) -> list[P.Message]:
        self.put(side, *msgs, packet_num=packet_num)
        heard = self.deliver(side)
        assert wire_bytes(heard, packet_num) == wire_bytes(list(msgs), packet_num)
        if self.connection == "main":
            # Nothing in flight: both ends of the main connection agree on where they are.
            assert self.state(S) == self.state(R)
        return heard


# --- the main connection --------------------------------------------------------------
def handshake(pair: Pair, psk: bool) -> None:
    role = P.ROLE_MAIN if pair.connection == "main" else 0
    pair.say(S, P.Hello(P.VERSION, role, SESSION, P.FEATURE_PSK if psk else 0))
    if psk:
        server_nonce, client_nonce = auth.nonce(), auth.nonce()
        pair.say(R, P.AuthChallenge(server_nonce))
        mac = auth.client_mac(KEY, SESSION, role, server_nonce, client_nonce)
        pair.say(S, P.AuthResponse(client_nonce, mac))
        assert pair.state(S) == P.State.AWAIT_AUTH_OK
        pair.say(R, P.AuthOk(auth.server_mac(KEY, SESSION, role, server_nonce, client_nonce)))
        assert pair.state(S) == P.State.AUTHENTICATED
    pair.say(R, P.Welcome(P.VERSION, SESSION))


def setup(pair: Pair, resume: bool = False) -> None:
    pair.say(S, CONFIG, LAYOUT)  # one write, as the orchestrator sends them
    assert pair.state(R) == P.State.AWAIT_ACCEPT
    pair.say(R, P.Accept(P.ACCEPT_RESUME if resume else 0))
    assert pair.state(S) == P.State.AWAIT_EPOCH


def epoch(pair: Pair, k: int, sizes: tuple[int, ...] = (3 * PS,)) -> None:
    pair.say(S, P.EpochStart(k, sizes))
    assert pair.state(R) == P.State.IN_EPOCH
    pair.say(S, P.Heartbeat())
    pair.say(R, P.Heartbeat())
    pair.say(S, P.EpochEnd(k, P.Counts(1, 3, 0)))


def complete(pair: Pair, last: int, metadata: bool = False) -> None:
    if metadata:
        pair.say(S, P.Metadata(0, 0o100644, 1000, 1000, 123, ((b"user.x", b"1"),)))
    pair.say(S, P.Digest(last, bytes(16)))
    assert pair.state(R) == P.State.COMPLETING
    pair.say(R, P.Complete(bytes(16), 3 * PS))
    assert pair.state(S) == pair.state(R) == P.State.DONE


@pytest.mark.parametrize("psk", [False, True], ids=["plain", "psk"])
@pytest.mark.parametrize("chunk", [0, 1, 7], ids=["whole", "bytewise", "split7"])
def test_whole_session(psk: bool, chunk: int) -> None:
    pair = Pair(chunk=chunk)
    handshake(pair, psk)
    assert pair.state(S) == P.State.AWAIT_CONFIG
    setup(pair)
    for k in (1, 2, 3):
        epoch(pair, k)
    complete(pair, 3, metadata=True)


def test_handshake_hands_over_where_the_table_says() -> None:
    for psk in (False, True):
        pair = Pair()
        handshake(pair, psk)
        assert pair.state(S) == P.Conversation.handed_over("send-main").state
        assert pair.state(R) == P.Conversation.handed_over("recv-main").state


def test_resume_hashes_cross_the_first_epochs() -> None:
    """recv streams RESUME_HASHES while send already runs epochs: the messages
    cross on the wire, and each end accepts the other's in the state it is in."""
    pair = Pair()
    handshake(pair, psk=False)
    setup(pair, resume=True)
    pair.say(R, P.ResumeHashes(0, 0, (1,)))
    pair.put(S, P.EpochStart(1, (3 * PS,)))  # in flight ...
    pair.put(R, P.ResumeHashes(0, 1, (2, 3)))  # ... while this one comes the other way
    assert pair.state(S) == P.State.IN_EPOCH and pair.state(R) == P.State.AWAIT_EPOCH
    (hashes,) = pair.deliver(R)
    assert hashes == P.ResumeHashes(0, 1, (2, 3))
    (start,) = pair.deliver(S)
    assert isinstance(start, P.EpochStart)
    assert pair.state(S) == pair.state(R) == P.State.IN_EPOCH
    pair.say(S, P.EpochEnd(1, P.Counts()))
    epoch(pair, 2)
    complete(pair, 2)


def test_resume_hashes_are_refused_after_digest() -> None:
    pair = Pair()
    handshake(pair, psk=False)
    setup(pair, resume=True)
    epoch(pair, 1)
    pair.say(S, P.Digest(1, bytes(16)))
    with pytest.raises(InternalError, match="about to send RESUME_HASHES"):
        pair.put(R, P.ResumeHashes(0, 0, (1,)))


# Every state the main connection lives through, and how to get there.
def _to_await_welcome(p: Pair) -> None:
    p.say(S, P.Hello(P.VERSION, P.ROLE_MAIN, SESSION, P.FEATURE_PSK))


def _to_await_auth_response(p: Pair) -> None:
    _to_await_welcome(p)
    p.say(R, P.AuthChallenge(bytes(32)))


def _to_await_auth_ok(p: Pair) -> None:
    _to_await_auth_response(p)
    p.say(S, P.AuthResponse(bytes(32), bytes(32)))


def _to_authenticated(p: Pair) -> None:
    _to_await_auth_ok(p)
    p.say(R, P.AuthOk(bytes(32)))


def _to_await_config(p: Pair) -> None:
    handshake(p, psk=False)


def _to_await_layout(p: Pair) -> None:
    _to_await_config(p)
    p.say(S, CONFIG)


def _to_await_accept(p: Pair) -> None:
    _to_await_layout(p)
    p.say(S, LAYOUT)


def _to_await_epoch(p: Pair) -> None:
    _to_await_accept(p)
    p.say(R, P.Accept())


def _to_in_epoch(p: Pair) -> None:
    _to_await_epoch(p)
    p.say(S, P.EpochStart(1, (PS,)))


def _to_completing(p: Pair) -> None:
    _to_await_epoch(p)
    epoch(p, 1)
    p.say(S, P.Digest(1, bytes(16)))


def _to_done(p: Pair) -> None:
    _to_completing(p)
    p.say(R, P.Complete(bytes(16), 0))


REACH = {
    P.State.AWAIT_HELLO: lambda p: None,
    P.State.AWAIT_WELCOME: _to_await_welcome,
    P.State.AWAIT_AUTH_RESPONSE: _to_await_auth_response,
    P.State.AWAIT_AUTH_OK: _to_await_auth_ok,
    P.State.AUTHENTICATED: _to_authenticated,
    P.State.AWAIT_CONFIG: _to_await_config,
    P.State.AWAIT_LAYOUT: _to_await_layout,
    P.State.AWAIT_ACCEPT: _to_await_accept,
    P.State.AWAIT_EPOCH: _to_await_epoch,
    P.State.IN_EPOCH: _to_in_epoch,
    P.State.COMPLETING: _to_completing,
    P.State.DONE: _to_done,
}


def at(state: P.State) -> Pair:
    pair = Pair()
    REACH[state](pair)
    assert pair.state(S) == pair.state(R) == state
    return pair


def test_reach_covers_every_main_state() -> None:
    main_states = {s for (k, s, _, _) in P.ORDER if k.endswith("main")}
    main_states |= {n for (k, _, _, _), n in P.ORDER.items() if k.endswith("main")}
    assert main_states == set(REACH)


@pytest.mark.parametrize("who", [S, R])
@pytest.mark.parametrize("state", list(REACH), ids=lambda s: s.name)
def test_abort_from_every_state_ends_both(state: P.State, who: str) -> None:
    pair = at(state)
    (heard,) = pair.say(who, P.Abort(4, f"{who} gives up in {state.name}"))
    assert heard == P.Abort(4, f"{who} gives up in {state.name}")
    assert pair.state(S) == pair.state(R) == P.State.ABORTED
    # After ABORT nothing but another ABORT: refused on the way out and on the way in.
    with pytest.raises(InternalError, match="in state ABORTED: about to send HEARTBEAT"):
        pair.put(who, P.Heartbeat())
    with pytest.raises(ProtocolError, match="in state ABORTED: got HEARTBEAT"):
        pair.ends[OTHER[who]].receive_data(P.encode(P.Heartbeat()))
    pair.say(OTHER[who], P.Abort(4, "me too"))


def test_nothing_is_read_after_an_abort() -> None:
    pair = at(P.State.AWAIT_EPOCH)
    data = P.encode(P.Abort(6, "stop")) + P.encode(P.EpochStart(1, (PS,)))
    heard = pair.ends[R].receive_data(data)
    assert heard == [P.Abort(6, "stop")]
    assert pair.ends[R].buffered == len(P.encode(P.EpochStart(1, (PS,))))


# What each end might try at the wrong time: (state, side, message, what the peer
# expects to hear in that state).
ILLEGAL = [
    (P.State.AWAIT_HELLO, R, P.Welcome(P.VERSION, SESSION), "ABORT"),
    (P.State.AWAIT_HELLO, S, P.Config(*CONFIG), "HELLO, ABORT"),
    (P.State.AWAIT_WELCOME, S, P.Hello(P.VERSION, 0, SESSION), "ABORT"),
    (P.State.AWAIT_WELCOME, R, P.Heartbeat(), "AUTH_CHALLENGE, WELCOME, ABORT"),
    (P.State.AWAIT_AUTH_RESPONSE, R, P.Welcome(P.VERSION, SESSION), "ABORT"),
    (P.State.AWAIT_AUTH_RESPONSE, S, P.Config(*CONFIG), "AUTH_RESPONSE, ABORT"),
    (P.State.AWAIT_AUTH_OK, S, P.Config(*CONFIG), "ABORT"),
    (P.State.AUTHENTICATED, R, P.AuthOk(bytes(32)), "WELCOME, ABORT"),
    (P.State.AWAIT_CONFIG, S, P.Layout(LAYOUT.blocks), "CONFIG, HEARTBEAT, ABORT"),
    (P.State.AWAIT_CONFIG, S, P.EpochStart(1, (PS,)), "CONFIG, HEARTBEAT, ABORT"),
    (P.State.AWAIT_LAYOUT, R, P.Accept(), "HEARTBEAT, ABORT"),
    (P.State.AWAIT_ACCEPT, S, P.EpochStart(1, (PS,)), "TREE_ROOT, HEARTBEAT, ABORT"),
    (P.State.AWAIT_EPOCH, S, P.EpochEnd(1, P.Counts()),
     "DIGEST, EPOCH_START, MANIFEST, METADATA, TREE, HEARTBEAT, ABORT"),
    (P.State.AWAIT_EPOCH, R, P.Complete(bytes(16), 0),
     "EPOCH_ACK, RESUME_HASHES, HEARTBEAT, ABORT"),
    (P.State.IN_EPOCH, S, P.Digest(1, bytes(16)), "EPOCH_END, HEARTBEAT, ABORT"),
    (P.State.IN_EPOCH, S, P.Metadata(0, 0, 0, 0, 0), "EPOCH_END, HEARTBEAT, ABORT"),
    (P.State.IN_EPOCH, S, P.EpochStart(2, (PS,)), "EPOCH_END, HEARTBEAT, ABORT"),
    (P.State.COMPLETING, S, P.EpochStart(2, (PS,)), "HEARTBEAT, ABORT"),
    (P.State.COMPLETING, R, P.ResumeHashes(0, 0, (1,)), "COMPLETE, EPOCH_ACK, HEARTBEAT, ABORT"),
    (P.State.DONE, R, P.Complete(bytes(16), 0), "ABORT"),
    (P.State.DONE, S, P.Heartbeat(), "ABORT"),
]


def _legal_to_send(state: P.State, side: str) -> str:
    return ", ".join(P.Conversation(f"{side}-main", state).legal(P.SEND))


@pytest.mark.parametrize(("state", "side", "msg", "expected"), ILLEGAL,
                         ids=[f"{s.name}-{d}-{P.event_name(m)}" for s, d, m, _ in ILLEGAL])
def test_illegal_order_is_refused_both_ways(
    state: P.State, side: str, msg: P.Message, expected: str
) -> None:
    pair = at(state)
    # Our own end: refused before a byte is written, as our bug, state unchanged.
    with pytest.raises(InternalError) as sent:
        pair.put(side, msg)
    role = f"{side}-main"
    assert str(sent.value) == (
        f"{role} in state {state.name}: about to send {P.event_name(msg)}, "
        f"expected to send one of {_legal_to_send(state, side)}"
    )
    assert pair.in_flight[side] == b"" and pair.state(side) == state
    # A peer that sends it anyway (bytes made without the table): a protocol error.
    peer = OTHER[side]
    with pytest.raises(ProtocolError) as heard:
        pair.ends[peer].receive_data(P.encode(msg))
    assert str(heard.value) == (
        f"{peer}-main in state {state.name}: got {P.event_name(msg)}, expected one of {expected}"
    )
    assert pair.state(peer) == state


def test_an_end_cannot_say_what_only_the_other_side_says() -> None:
    pair = at(P.State.AWAIT_EPOCH)
    with pytest.raises(InternalError, match="about to send RESUME_HASHES"):
        pair.put(S, P.ResumeHashes(0, 0, ()))
    with pytest.raises(InternalError, match="about to send EPOCH_START"):
        pair.put(R, P.EpochStart(1, (PS,)))


# --- random walks: what one end may say, the other end accepts -------------------------------
SAMPLES: dict[str, P.Message] = {
    "HELLO": P.Hello(P.VERSION, P.ROLE_MAIN, SESSION, P.FEATURE_PSK),
    "WELCOME": P.Welcome(P.VERSION, SESSION),
    "AUTH_CHALLENGE": P.AuthChallenge(bytes(32)),
    "AUTH_RESPONSE": P.AuthResponse(bytes(32), bytes(32)),
    "AUTH_OK": P.AuthOk(bytes(32)),
    "CONFIG": CONFIG,
    "LAYOUT": LAYOUT,
    "ACCEPT": P.Accept(P.ACCEPT_RESUME),
    "RESUME_HASHES": P.ResumeHashes(0, 0, (7,)),
    "EPOCH_START": P.EpochStart(1, (PS,)),
    "EPOCH_END": P.EpochEnd(1, P.Counts()),
    "METADATA": P.Metadata(0, 0o644, 0, 0, 0),
    "DIGEST": P.Digest(1, bytes(16)),
    "COMPLETE": P.Complete(bytes(16), 0),
    "HEARTBEAT": P.Heartbeat(),
    "ABORT": P.Abort(1, "x"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moves=st.lists(st.tuples(st.sampled_from([S, R]), st.sampled_from(sorted(SAMPLES))),
                      max_size=60),
       chunk=st.integers(0, 50))
def test_random_walk_both_ends_agree(moves: list[tuple[str, str]], chunk: int) -> None:
    """Try any message from either end: the table lets it out only if it is legal
    for that end, and then the other end always takes it and lands in the same state."""
    pair = Pair(chunk=chunk)
    for side, event in moves:
        before = pair.state(side)
        legal = (f"{side}-main", before, P.SEND, event) in P.TRANSITIONS
        if not legal:
            with pytest.raises(InternalError):
                pair.put(side, SAMPLES[event])
            assert pair.state(side) == before
            continue
        pair.say(side, SAMPLES[event])  # asserts the peer heard it and agrees on the state


# --- a channel -------------------------------------------------------------------------
def packet(epoch: int, num: int, offset: int = 0) -> P.Packet:
    data = b"".join(bytes(b) for b in P.encode_packet(
        epoch=epoch, packet_num=num, block=0, normal_offsets=[offset], zero_offsets=[],
        hashes=[offset + 1], payload=os.urandom(PS),
    ))
    d = P.Decoder()
    d.feed(data)
    (msg,) = d.messages()
    assert isinstance(msg, P.Packet)
    return msg


@pytest.mark.parametrize("psk", [False, True], ids=["plain", "psk"])
@pytest.mark.parametrize("chunk", [0, 1, 13], ids=["whole", "bytewise", "split13"])
def test_channel_epochs(psk: bool, chunk: int) -> None:
    pair = Pair("channel", chunk=chunk)
    handshake(pair, psk)
    assert pair.state(S) == pair.state(R) == P.State.SYNCED  # recv: held at the barrier
    num = 0
    for k, pages in ((1, 3), (2, 0), (3, 1)):  # epoch 2: this channel got no work
        pair.ends[R].conv.receive("RELEASE")  # recv's main opens epoch k for it
        assert pair.state(R) == P.State.IN_EPOCH
        for i in range(pages):
            pair.say(S, packet(k, num, i * PS))
            num += 1
            pair.say(S, P.Heartbeat())
        assert pair.state(S) == (P.State.IN_EPOCH if pages else P.State.SYNCED)
        (sync,) = pair.say(S, P.Sync(k, P.Counts(pages, pages, 0)), packet_num=num)
        num += 1
        assert sync == P.Sync(k, P.Counts(pages, pages, 0))
        assert pair.state(S) == pair.state(R) == P.State.SYNCED


def test_channel_send_side_never_waits_for_the_barrier() -> None:
    """send's channel goes on with epoch k+1 at once; recv reads those packets
    only once released, so they wait in flight meanwhile."""
    pair = Pair("channel")
    handshake(pair, psk=False)
    pair.ends[R].conv.receive("RELEASE")
    pair.say(S, packet(1, 0))
    pair.put(S, P.Sync(1, P.Counts(1, 1, 0)), packet_num=1)
    pair.put(S, packet(2, 2))
    with pytest.raises(ProtocolError, match="in state SYNCED: got PACKET, expected one of RELEASE"):
        pair.deliver(S)  # recv reads past its SYNC without a RELEASE: refused


def test_channel_illegal_orders() -> None:
    pair = Pair("channel")
    with pytest.raises(InternalError, match="send-channel in state AWAIT_HELLO: about to send PACKET"):
        pair.put(S, packet(1, 0))
    handshake(pair, psk=False)
    with pytest.raises(InternalError, match="send-channel in state SYNCED: about to send WELCOME"):
        pair.put(S, P.Welcome(P.VERSION, SESSION))
    with pytest.raises(InternalError, match="recv-channel in state SYNCED: about to send HELLO"):
        pair.put(R, P.Hello(P.VERSION, 0, SESSION))
    # PACKET or SYNC before RELEASE, and a second RELEASE, are protocol errors on recv.
    for msg in (packet(1, 0), P.Sync(1, P.Counts())):
        with pytest.raises(ProtocolError, match=r"^recv-channel in state SYNCED: got (PACKET|SYNC), "
                           r"expected one of RELEASE, HEARTBEAT, ABORT$"):
            pair.ends[R].receive_data(P.encode(msg))
    pair.ends[R].conv.receive("RELEASE")
    with pytest.raises(ProtocolError, match="in state IN_EPOCH: got RELEASE"):
        pair.ends[R].conv.receive("RELEASE")
    # control messages of the main connection never belong on a channel
    with pytest.raises(ProtocolError, match="in state IN_EPOCH: got EPOCH_START"):
        pair.ends[R].receive_data(P.encode(P.EpochStart(1, (PS,))))


def test_channel_abort_either_way() -> None:
    for who in (S, R):
        pair = Pair("channel")
        handshake(pair, psk=True)
        pair.ends[R].conv.receive("RELEASE")
        pair.say(S, packet(1, 0))
        pair.say(who, P.Abort(3, "gone"))
        assert pair.state(S) == pair.state(R) == P.State.ABORTED


def test_the_hot_path_header_check_matches_the_message_check() -> None:
    """The recv channel checks bare headers (no body parsed yet): same verdicts."""
    for msg, num in ((packet(1, 0), 0), (P.Sync(1, P.Counts()), 1), (P.Heartbeat(), 0)):
        data = P.encode(msg, packet_num=num)
        h = P.parse_header(data[: P.HEADER_SIZE])
        a = P.Conversation.handed_over("recv-channel")
        b = P.Conversation.handed_over("recv-channel")
        a.receive("RELEASE")
        b.receive("RELEASE")
        assert a.receive(h) == b.receive(msg)
