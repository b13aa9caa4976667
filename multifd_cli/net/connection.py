"""The main connection: control messages in both directions, each checked
against the state table as it is sent or received, with heartbeats and a
silence limit."""

from __future__ import annotations

import socket
import time
from multiprocessing.connection import wait

from multifd_cli import wire as P
from multifd_cli.errors import ConnectionFailed, PeerAborted, Timeout
from multifd_cli.net.transport import send_all


class MainConnection:
    def __init__(self, sock: socket.socket, conv: P.Conversation, timeout: float) -> None:
        """`conv` comes from the handshake, which already moved it up to WELCOME."""
        self.sock = sock
        self.timeout = timeout
        self.end = P.Endpoint(conv)
        self.last_rx = time.monotonic()
        self.last_tx = time.monotonic()
        self.closed = False
        self._pending: list[P.Message] = []
        sock.settimeout(timeout)

    @property
    def conv(self) -> P.Conversation:
        return self.end.conv

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *msgs: P.Message) -> None:
        """Check each message against the table, then send them all in one write."""
        send_all(self.sock, [self.end.send(*msgs)])
        self.last_tx = time.monotonic()

    def heartbeat_if_idle(self, interval: float) -> None:
        if time.monotonic() - self.last_tx >= interval:
            self.send(P.Heartbeat())

    def check_silence(self) -> None:
        if time.monotonic() - self.last_rx > self.timeout:
            raise Timeout(f"peer silent for more than {self.timeout:g} s (--timeout)")

    def read_available(self) -> list[P.Message]:
        """Read what the socket has now; return the messages that completed.

        HEARTBEATs are consumed here; an ABORT raises PeerAborted.
        """
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise Timeout(f"peer silent for more than {self.timeout:g} s (--timeout)") from None
        except OSError as e:
            raise ConnectionFailed(f"main connection lost: {e.strerror or e}") from None
        if not data:
            self.closed = True
            raise ConnectionFailed("main connection closed by peer")
        self.last_rx = time.monotonic()
        out: list[P.Message] = []
        for msg in self.end.receive_data(data):
            if isinstance(msg, P.Abort):
                raise PeerAborted(msg.message, msg.exit_code)
            if not isinstance(msg, P.Heartbeat):
                out.append(msg)
        return out

    def receive(self, deadline: float) -> P.Message:
        """Block until one message arrives (handshake and completion)."""
        while True:
            msg = self._pop()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout("timed out waiting for the peer")
            if wait([self.sock], left):
                self._pending.extend(self.read_available())

    def _pop(self) -> P.Message | None:
        return self._pending.pop(0) if self._pending else None

    def drain(self) -> list[P.Message]:
        """Messages read ahead by receive() and not yet handed out."""
        out, self._pending = self._pending, []
        return out

    def raise_pending_abort(self, grace: float) -> None:
        """After a channel lost its connection: if the peer said why on the main
        connection, raise that (PeerAborted) instead of a bare connection error."""
        deadline = time.monotonic() + grace
        try:
            while not self.closed:
                left = deadline - time.monotonic()
                if left <= 0 or not wait([self.sock], left):
                    return
                self._pending.extend(self.read_available())
        except (ConnectionFailed, Timeout):
            return

    def abort(self, exit_code: int, message: str) -> None:
        """Best effort: tell the peer why we stop. Never raises."""
        if self.closed:
            return
        data = self.end.send(P.Abort(exit_code, message))  # legal in every state
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
