"""The one table of legal orders, for every connection and both directions.

Every message an end sends and every message it receives moves its
`Conversation` through `TRANSITIONS`: the handshake and the key proof, setup,
the epochs and completion on the main connection, and the packets of each
channel. A peer's message out of order is a ProtocolError; one of our own is an
InternalError, because it is our bug and is best caught where it is made (the
rule of h11's `_state.py`). docs/protocol.md lists the same table, and
tests/test_protocol_doc.py holds the two to each other.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Union

from multifd_cli.errors import InternalError, ProtocolError
from multifd_cli.wire.messages import (
    FLAG_SYNC,
    Abort,
    Accept,
    AuthChallenge,
    AuthOk,
    AuthResponse,
    Complete,
    Config,
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


class State(IntEnum):
    """Where a connection is; both ends of the main connection pass the same states."""

    AWAIT_HELLO = 1  # nothing said yet
    AWAIT_WELCOME = 2  # HELLO said: recv answers with AUTH_CHALLENGE or WELCOME
    AWAIT_AUTH_RESPONSE = 3
    AWAIT_AUTH_OK = 4
    AUTHENTICATED = 5  # both ends proved the key: WELCOME comes next
    AWAIT_CONFIG = 6
    AWAIT_LAYOUT = 7
    AWAIT_ACCEPT = 8
    AWAIT_EPOCH = 9  # between epochs (or before the first)
    IN_EPOCH = 10
    SYNCED = 11  # a channel between its SYNC and its next epoch (recv: held at the barrier)
    COMPLETING = 12
    DONE = 13
    ABORTED = 14


SEND = "send"
RECV = "recv"
_S = State

# Every legal move but HEARTBEAT and ABORT, keyed by (role, state, direction,
# event). The direction is the tracking end's own: "send" for what it says,
# "recv" for what it hears. An event is a message type name, "SYNC" for a
# PACKET with FLAG_SYNC, or "RELEASE", which a recv channel hears from its own
# main process (the barrier) rather than from the socket.
ORDER: dict[tuple[str, State, str, str], State] = {
    # send's main connection
    ("send-main", _S.AWAIT_HELLO, SEND, "HELLO"): _S.AWAIT_WELCOME,
    ("send-main", _S.AWAIT_WELCOME, RECV, "AUTH_CHALLENGE"): _S.AWAIT_AUTH_RESPONSE,
    ("send-main", _S.AWAIT_AUTH_RESPONSE, SEND, "AUTH_RESPONSE"): _S.AWAIT_AUTH_OK,
    ("send-main", _S.AWAIT_AUTH_OK, RECV, "AUTH_OK"): _S.AUTHENTICATED,
    ("send-main", _S.AWAIT_WELCOME, RECV, "WELCOME"): _S.AWAIT_CONFIG,
    ("send-main", _S.AUTHENTICATED, RECV, "WELCOME"): _S.AWAIT_CONFIG,
    ("send-main", _S.AWAIT_CONFIG, SEND, "CONFIG"): _S.AWAIT_LAYOUT,
    ("send-main", _S.AWAIT_LAYOUT, SEND, "LAYOUT"): _S.AWAIT_ACCEPT,
    ("send-main", _S.AWAIT_ACCEPT, SEND, "TREE_ROOT"): _S.AWAIT_ACCEPT,
    ("send-main", _S.AWAIT_ACCEPT, RECV, "ACCEPT"): _S.AWAIT_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, RECV, "RESUME_HASHES"): _S.AWAIT_EPOCH,
    ("send-main", _S.IN_EPOCH, RECV, "RESUME_HASHES"): _S.IN_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, SEND, "EPOCH_START"): _S.IN_EPOCH,
    ("send-main", _S.IN_EPOCH, SEND, "EPOCH_END"): _S.AWAIT_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, SEND, "METADATA"): _S.AWAIT_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, SEND, "TREE"): _S.AWAIT_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, SEND, "MANIFEST"): _S.AWAIT_EPOCH,
    ("send-main", _S.AWAIT_EPOCH, RECV, "EPOCH_ACK"): _S.AWAIT_EPOCH,
    ("send-main", _S.IN_EPOCH, RECV, "EPOCH_ACK"): _S.IN_EPOCH,
    ("send-main", _S.COMPLETING, RECV, "EPOCH_ACK"): _S.COMPLETING,
    ("send-main", _S.AWAIT_EPOCH, SEND, "DIGEST"): _S.COMPLETING,
    ("send-main", _S.COMPLETING, RECV, "COMPLETE"): _S.DONE,
    # recv's main connection: the same moves, seen from the other end
    ("recv-main", _S.AWAIT_HELLO, RECV, "HELLO"): _S.AWAIT_WELCOME,
    ("recv-main", _S.AWAIT_WELCOME, SEND, "AUTH_CHALLENGE"): _S.AWAIT_AUTH_RESPONSE,
    ("recv-main", _S.AWAIT_AUTH_RESPONSE, RECV, "AUTH_RESPONSE"): _S.AWAIT_AUTH_OK,
    ("recv-main", _S.AWAIT_AUTH_OK, SEND, "AUTH_OK"): _S.AUTHENTICATED,
    ("recv-main", _S.AWAIT_WELCOME, SEND, "WELCOME"): _S.AWAIT_CONFIG,
    ("recv-main", _S.AUTHENTICATED, SEND, "WELCOME"): _S.AWAIT_CONFIG,
    ("recv-main", _S.AWAIT_CONFIG, RECV, "CONFIG"): _S.AWAIT_LAYOUT,
    ("recv-main", _S.AWAIT_LAYOUT, RECV, "LAYOUT"): _S.AWAIT_ACCEPT,
    ("recv-main", _S.AWAIT_ACCEPT, RECV, "TREE_ROOT"): _S.AWAIT_ACCEPT,
    ("recv-main", _S.AWAIT_ACCEPT, SEND, "ACCEPT"): _S.AWAIT_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, SEND, "RESUME_HASHES"): _S.AWAIT_EPOCH,
    ("recv-main", _S.IN_EPOCH, SEND, "RESUME_HASHES"): _S.IN_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, RECV, "EPOCH_START"): _S.IN_EPOCH,
    ("recv-main", _S.IN_EPOCH, RECV, "EPOCH_END"): _S.AWAIT_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, RECV, "METADATA"): _S.AWAIT_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, RECV, "TREE"): _S.AWAIT_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, RECV, "MANIFEST"): _S.AWAIT_EPOCH,
    ("recv-main", _S.AWAIT_EPOCH, SEND, "EPOCH_ACK"): _S.AWAIT_EPOCH,
    ("recv-main", _S.IN_EPOCH, SEND, "EPOCH_ACK"): _S.IN_EPOCH,
    ("recv-main", _S.COMPLETING, SEND, "EPOCH_ACK"): _S.COMPLETING,
    ("recv-main", _S.AWAIT_EPOCH, RECV, "DIGEST"): _S.COMPLETING,
    ("recv-main", _S.COMPLETING, SEND, "COMPLETE"): _S.DONE,
    # a send channel: it never waits for the barrier, so SYNC leads straight on
    ("send-channel", _S.AWAIT_HELLO, SEND, "HELLO"): _S.AWAIT_WELCOME,
    ("send-channel", _S.AWAIT_WELCOME, RECV, "AUTH_CHALLENGE"): _S.AWAIT_AUTH_RESPONSE,
    ("send-channel", _S.AWAIT_AUTH_RESPONSE, SEND, "AUTH_RESPONSE"): _S.AWAIT_AUTH_OK,
    ("send-channel", _S.AWAIT_AUTH_OK, RECV, "AUTH_OK"): _S.AUTHENTICATED,
    ("send-channel", _S.AWAIT_WELCOME, RECV, "WELCOME"): _S.SYNCED,
    ("send-channel", _S.AUTHENTICATED, RECV, "WELCOME"): _S.SYNCED,
    ("send-channel", _S.SYNCED, SEND, "PACKET"): _S.IN_EPOCH,
    ("send-channel", _S.IN_EPOCH, SEND, "PACKET"): _S.IN_EPOCH,
    ("send-channel", _S.SYNCED, SEND, "SYNC"): _S.SYNCED,  # no work this epoch
    ("send-channel", _S.IN_EPOCH, SEND, "SYNC"): _S.SYNCED,
    # a recv channel: held at the barrier after each SYNC until main releases it
    ("recv-channel", _S.AWAIT_HELLO, RECV, "HELLO"): _S.AWAIT_WELCOME,
    ("recv-channel", _S.AWAIT_WELCOME, SEND, "AUTH_CHALLENGE"): _S.AWAIT_AUTH_RESPONSE,
    ("recv-channel", _S.AWAIT_AUTH_RESPONSE, RECV, "AUTH_RESPONSE"): _S.AWAIT_AUTH_OK,
    ("recv-channel", _S.AWAIT_AUTH_OK, SEND, "AUTH_OK"): _S.AUTHENTICATED,
    ("recv-channel", _S.AWAIT_WELCOME, SEND, "WELCOME"): _S.SYNCED,
    ("recv-channel", _S.AUTHENTICATED, SEND, "WELCOME"): _S.SYNCED,
    ("recv-channel", _S.SYNCED, RECV, "RELEASE"): _S.IN_EPOCH,
    ("recv-channel", _S.IN_EPOCH, RECV, "PACKET"): _S.IN_EPOCH,
    ("recv-channel", _S.IN_EPOCH, RECV, "SYNC"): _S.SYNCED,
}

START = {
    "send-main": State.AWAIT_HELLO,
    "recv-main": State.AWAIT_HELLO,
    "send-channel": State.AWAIT_HELLO,
    "recv-channel": State.AWAIT_HELLO,
}
ALWAYS = ("HEARTBEAT", "ABORT")
# HEARTBEAT keeps a quiet connection alive once it is set up; during the
# handshake each side waits for one exact answer, and after DONE or ABORTED
# nothing more is said.
HEARTBEAT_STATES = frozenset({
    State.AWAIT_CONFIG, State.AWAIT_LAYOUT, State.AWAIT_ACCEPT, State.AWAIT_EPOCH,
    State.IN_EPOCH, State.SYNCED, State.COMPLETING,
})


def _with_always(order: dict[tuple[str, State, str, str], State]) -> dict[
    tuple[str, State, str, str], State
]:
    """ORDER plus HEARTBEAT (no move) and ABORT (to ABORTED), both directions."""
    table = dict(order)
    for role in START:
        states = {State.ABORTED, START[role]}
        states |= {s for (r, s, _, _), n in order.items() if r == role}
        states |= {n for (r, _, _, _), n in order.items() if r == role}
        for state in states:
            for direction in (SEND, RECV):
                if state in HEARTBEAT_STATES:
                    table[(role, state, direction, "HEARTBEAT")] = state
                table[(role, state, direction, "ABORT")] = State.ABORTED
    return table


#: The table every Conversation looks up: ORDER plus the always-legal events.
TRANSITIONS = _with_always(ORDER)

# Where a connection stands when the process that did the handshake hands it on.
_AFTER_WELCOME = {
    role: TRANSITIONS[(role, State.AWAIT_WELCOME, d, "WELCOME")]
    for role in START
    for d in (SEND, RECV)
    if (role, State.AWAIT_WELCOME, d, "WELCOME") in TRANSITIONS
}

_EVENT_NAMES: dict[type, str] = {
    Hello: "HELLO", Welcome: "WELCOME", Config: "CONFIG", Layout: "LAYOUT", Accept: "ACCEPT",
    EpochStart: "EPOCH_START", EpochEnd: "EPOCH_END", Packet: "PACKET", Sync: "SYNC",
    Heartbeat: "HEARTBEAT", Digest: "DIGEST", Complete: "COMPLETE", Abort: "ABORT",
    AuthChallenge: "AUTH_CHALLENGE", AuthResponse: "AUTH_RESPONSE", AuthOk: "AUTH_OK",
    ResumeHashes: "RESUME_HASHES", Metadata: "METADATA", Tree: "TREE", TreeRoot: "TREE_ROOT",
    Manifest: "MANIFEST", EpochAck: "EPOCH_ACK",
}
_TYPE_NAMES = {t: t.name for t in MsgType}  # Enum.name is a slow property on the packet path

Event = Union[Message, Header, str]


def event_name(msg: Event) -> str:
    """The table's event for a message, a bare header (the channel's hot path) or a name."""
    if type(msg) is str:
        return msg
    if type(msg) is Header:
        if msg.flags & FLAG_SYNC and msg.type == MsgType.PACKET:
            return "SYNC"
        return _TYPE_NAMES[msg.type]
    return _EVENT_NAMES[type(msg)]


class Conversation:
    """One end of one connection, moved through TRANSITIONS by every message
    it sends and receives; any other move is refused."""

    __slots__ = ("kind", "state")

    def __init__(self, kind: str, state: State | None = None) -> None:
        if kind not in START:
            raise InternalError(f"conversation kind: got {kind!r}, expected one of {', '.join(START)}")
        self.kind = kind
        self.state = START[kind] if state is None else state

    @classmethod
    def handed_over(cls, kind: str) -> Conversation:
        """The connection as another process takes it on, just after WELCOME."""
        return cls(kind, _AFTER_WELCOME[kind])

    def send(self, msg: Event) -> State:
        """Check a message we are about to send; a refusal is our own bug."""
        event = event_name(msg)
        nxt = TRANSITIONS.get((self.kind, self.state, SEND, event))
        if nxt is None:
            raise InternalError(
                f"{self.kind} in state {self.state.name}: about to send {event}, "
                f"expected to send one of {self._legal(SEND)}"
            )
        self.state = nxt
        return nxt

    def receive(self, msg: Event) -> State:
        """Check a message the peer sent (or a RELEASE from our own main)."""
        event = event_name(msg)
        nxt = TRANSITIONS.get((self.kind, self.state, RECV, event))
        if nxt is None:
            raise ProtocolError(
                f"{self.kind} in state {self.state.name}: got {event}, "
                f"expected one of {self._legal(RECV)}"
            )
        self.state = nxt
        return nxt

    def legal(self, direction: str) -> list[str]:
        """The events allowed now in `direction`: the table's first, then the always-legal."""
        found = {e for (k, s, d, e) in TRANSITIONS if k == self.kind and s == self.state and d == direction}
        return sorted(found - set(ALWAYS)) + [e for e in ALWAYS if e in found]

    def _legal(self, direction: str) -> str:
        return ", ".join(self.legal(direction)) or "nothing"

    def __repr__(self) -> str:
        return f"Conversation({self.kind!r}, {self.state.name})"
