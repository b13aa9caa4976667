"""recv's listening socket: accept connections and greet each in its own thread.

A peer that connects and then says nothing (a half-open socket, a slow
scanner) must delay no one else, so each handshake runs in a thread and wakes
the accepting loop through a pipe when it is done.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from multiprocessing.connection import wait

from multifd_cli import wire as P
from multifd_cli.errors import MultifdError, Timeout
from multifd_cli.net import handshake
from multifd_cli.net.auth import Security
from multifd_cli.net.connection import MainConnection
from multifd_cli.net.transport import Uri, listen, tune

log = logging.getLogger("multifd")


class Listener:
    """The listening socket from listen() to close(), and the greeted peers."""

    def __init__(self, uri: Uri, security: Security, timeout: float) -> None:
        self.uri = uri
        self.security = security
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.real_uri: Uri | None = None
        #: Main-connection messages read while waiting for channels or hashing.
        self.early: list[P.Message] = []
        self._greeted: list[tuple[socket.socket, P.Hello, P.Conversation]] = []  # from handshake threads
        self._wake_r, self._wake_w = os.pipe()

    def open(self) -> Uri:
        """Listen; return the address actually bound (port 0 becomes a port)."""
        self.sock, self.real_uri = listen(self.uri)
        return self.real_uri

    def accept(
        self, deadline: float, watch: MainConnection | None = None
    ) -> tuple[socket.socket, P.Hello, P.Conversation]:
        """Accept the next connection that says HELLO; drop anything else.

        While channels connect, the main connection is watched too, so an ABORT
        from the source ends the wait at once.
        """
        assert self.sock is not None
        while True:
            if self._greeted:
                return self._greeted.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                what = "the channels did not connect" if watch else "no session started"
                raise Timeout(f"{what} within {self.timeout:g} s (--timeout)")
            ready = wait([self.sock, self._wake_r, *([watch.sock] if watch else [])], left)
            if watch is not None and watch.sock in ready:
                self.early.extend(watch.read_available())
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self.sock in ready:
                conn, peer = self.sock.accept()
                hs_deadline = min(deadline, time.monotonic() + min(10.0, self.timeout))
                threading.Thread(
                    target=self._greet, args=(conn, peer, hs_deadline), daemon=True
                ).start()

    def _greet(self, conn: socket.socket, peer: object, deadline: float) -> None:
        """A handshake thread: HELLO (and TLS, and the key proof) or drop."""
        try:
            tune(conn)
            result = handshake.server(conn, deadline, self.security)
        except MultifdError as e:
            log.warning("dropped a connection from %s: %s", peer or "a local peer", e)
            conn.close()
        except OSError as e:
            log.warning("dropped a connection from %s: %s", peer or "a local peer", e)
            conn.close()
        else:
            self._greeted.append(result)
        finally:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening; a unix socket's path goes with it. Safe to repeat."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.scheme == "unix":
                try:
                    os.unlink(self.uri.path)
                except OSError:
                    pass

    def release(self) -> None:
        """Close the socket and the wake pipe, at the end of the session."""
        self.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
