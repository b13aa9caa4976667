"""URIs, listening and connecting, and the two socket loops the channels need.

Only this module and the channel processes touch sockets; the codec stays pure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from multifd_cli.errors import ConnectionFailed, Timeout, UsageError

Buffer = Union[bytes, bytearray, memoryview]

# Loopback and LAN links want deep buffers to keep several packets in flight.
SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class Uri:
    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def family(self) -> int:
        if self.scheme == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def address(self) -> str | tuple[str, int]:
        return self.path if self.scheme == "unix" else (self.host, self.port)


SSH_SCHEME = "ssh:"


def is_ssh_target(text: str) -> bool:
    """True for a --to that names an ssh target rather than a tcp:/unix: URI.

    Here, not in ssh.py, so that telling the two apart does not import the launcher.
    """
    return text.startswith(SSH_SCHEME)


def parse_uri(text: str) -> Uri:
    """Parse ``tcp:HOST:PORT``, ``tcp:[IPv6]:PORT`` or ``unix:PATH``."""
    scheme, sep, rest = text.partition(":")
    if not sep or not rest:
        raise UsageError(f"bad URI {text!r}: expected tcp:HOST:PORT or unix:PATH")
    if scheme == "unix":
        if "\0" in rest:
            raise UsageError(f"bad URI {text!r}: the path contains a NUL byte")
        return Uri("unix", path=rest)
    if scheme != "tcp":
        raise UsageError(f"bad URI {text!r}: unknown scheme {scheme!r}, expected tcp or unix")
    if rest.startswith("["):
        host, close, port_text = rest[1:].partition("]")
        if not close or not port_text.startswith(":"):
            raise UsageError(f"bad URI {text!r}: expected tcp:[IPv6]:PORT")
        port_text = port_text[1:]
    else:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise UsageError(f"bad URI {text!r}: put an IPv6 address in brackets, tcp:[::1]:PORT")
    if not host:
        raise UsageError(f"bad URI {text!r}: the host is missing")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad URI {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"bad URI {text!r}: port {port} is outside 0..65535")
    return Uri("tcp", host=host, port=port)


def tune(sock: socket.socket) -> None:
    """Deep buffers, and no Nagle delay on the small control messages."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen(uri: Uri, backlog: int = 128) -> tuple[socket.socket, Uri]:
    """Bind and listen; return the socket and the real address (port 0 resolved)."""
    sock = socket.socket(uri.family, socket.SOCK_STREAM)
    try:
        if uri.scheme == "tcp":
            # recv serves one session; the next recv must be able to bind at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            remove_stale_unix_socket(uri.path)
        sock.bind(uri.address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ConnectionFailed(f"cannot listen on {uri}: {e.strerror or e}") from None
    if uri.scheme == "tcp":
        host, port = sock.getsockname()[:2]
        return sock, Uri("tcp", host=host, port=port)
    return sock, uri


def remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file nobody listens on any more; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConnectionFailed(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConnectionFailed(f"cannot listen on unix:{path}: another process is listening")
    finally:
        probe.close()


def connect(uri: Uri, timeout: float, *, wait_for: float | None = None,
            on_refused: Callable[[], None] | None = None) -> socket.socket:
    """Connect within `timeout` seconds.

    A refused connection (nobody listening yet, or no unix socket file) is retried
    for `wait_for` seconds; `None` retries for the whole `timeout`, for channels,
    whose listener is known to be up. `on_refused` runs once, at the first refusal,
    so a caller that waits can say what for.
    """
    now = time.monotonic()
    deadline = now + timeout
    give_up = deadline if wait_for is None else now + wait_for
    last: OSError | None = None
    while True:
        sock = socket.socket(uri.family, socket.SOCK_STREAM)
        tune(sock)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.connect(uri.address)
            sock.settimeout(None)
            return sock
        except OSError as e:
            sock.close()
            refused = e.errno in (errno.ECONNREFUSED, errno.ENOENT)
            if refused and last is None and on_refused is not None:
                on_refused()
            last = e
            if not refused or time.monotonic() >= give_up:
                break
            time.sleep(0.05)
    reason = last.strerror if last is not None and last.strerror else str(last)
    if last is not None and last.errno in (errno.ECONNREFUSED, errno.ENOENT) and wait_for is not None:
        if wait_for > 0:
            reason += f": nobody listened within {wait_for:g} s (--wait-for-recv)"
        else:
            reason += "; is multifd recv listening there? (--wait-for-recv SECONDS waits for it)"
    raise ConnectionFailed(f"cannot connect to {uri}: {reason}")


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; EOF before it is full is a connection failure."""
    got = 0
    n = len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except socket.timeout:
            raise Timeout("peer silent for longer than --timeout") from None
        except OSError as e:
            raise ConnectionFailed(f"connection lost: {e.strerror or e}") from None
        if k == 0:
            raise ConnectionFailed("connection closed by peer")
        got += k


def send_all(sock: socket.socket, buffers: Sequence[Buffer]) -> int:
    """sendmsg() the buffers, resuming after partial sends; return bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    # ssl is imported only when TLS is in use (~10 ms of start-up otherwise).
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        # TLS has no scatter-gather send; each buffer is encrypted on its own.
        try:
            for v in views:
                sock.sendall(v)
        except socket.timeout:
            raise Timeout("peer stopped reading for longer than --timeout") from None
        except OSError as e:
            raise ConnectionFailed(f"connection lost: {e.strerror or e}") from None
        return total
    sent_total = 0
    while views:
        try:
            sent = sock.sendmsg(views[:1024])
        except socket.timeout:
            raise Timeout("peer stopped reading for longer than --timeout") from None
        except OSError as e:
            raise ConnectionFailed(f"connection lost: {e.strerror or e}") from None
        sent_total += sent
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
    return total


def recv_exact_deadline(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Read n bytes before the deadline (handshakes, before a session exists)."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("handshake timed out")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise Timeout("handshake timed out") from None
        except OSError as e:
            raise ConnectionFailed(f"connection lost during handshake: {e.strerror or e}") from None
        if not chunk:
            raise ConnectionFailed("connection closed during handshake")
        buf += chunk
    sock.settimeout(None)
    return bytes(buf)
