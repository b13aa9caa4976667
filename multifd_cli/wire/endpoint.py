"""One end of a control connection, sans-IO: the codec and the state table together.

`Endpoint` turns the messages an end says into bytes and the bytes it hears
into messages, and moves its Conversation with each. It owns no socket:
`net.connection.MainConnection` puts its bytes on one, and the tests wire two
Endpoints to each other in memory to play whole conversations.
"""

from __future__ import annotations

from multifd_cli.wire.codec import Decoder, Limits, encode
from multifd_cli.wire.messages import Abort, Buffer, Message
from multifd_cli.wire.states import Conversation


class Endpoint:
    """What one end has said and heard, checked both ways against TRANSITIONS."""

    def __init__(self, conv: Conversation, limits: Limits | None = None) -> None:
        self.conv = conv
        self.decoder = Decoder(limits)

    def send(self, *msgs: Message, packet_num: int = 0) -> bytes:
        """The bytes of `msgs`, once the table allowed each (InternalError if not)."""
        for msg in msgs:
            self.conv.send(msg)
        return b"".join(encode(m, packet_num=packet_num) for m in msgs)

    def receive_data(self, data: Buffer) -> list[Message]:
        """The messages `data` completed, each allowed by the table (ProtocolError
        if not). Nothing after an ABORT is read: the peer has stopped."""
        self.decoder.feed(data)
        out: list[Message] = []
        while (msg := self.decoder.next_message()) is not None:
            self.conv.receive(msg)
            out.append(msg)
            if isinstance(msg, Abort):
                break
        return out

    @property
    def buffered(self) -> int:
        """Bytes heard but not yet a whole message."""
        return self.decoder.buffered
