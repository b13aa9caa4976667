"""The start of every connection: TLS (optional), HELLO, the key proof
(optional), WELCOME. Both sides' halves live here so they cannot drift apart,
and every message of both goes through the connection's Conversation, whose
table decides what may come next.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, NoReturn, TypeVar

from multifd_cli import wire as P
from multifd_cli.errors import (
    AuthError,
    ConnectionFailed,
    InternalError,
    PeerAborted,
    UsageError,
    expect,
)
from multifd_cli.net import auth
from multifd_cli.net.auth import Security
from multifd_cli.net.transport import recv_exact_deadline, send_all

if TYPE_CHECKING:
    import ssl


def tls_client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verify the destination against --tls-ca (or the system store); offer a client cert."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS files: {e}") from None
    return ctx


def tls_server_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    """Serve --tls-cert; with --tls-ca, also require a client certificate signed by it."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS files: {e}") from None
    return ctx


def _tls_wrap(
    sock: socket.socket, ctx: ssl.SSLContext, deadline: float, *, server: bool, hostname: str | None
) -> ssl.SSLSocket:
    import ssl

    sock.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        tls = ctx.wrap_socket(sock, server_side=server, server_hostname=None if server else hostname)
    except ssl.SSLCertVerificationError as e:
        raise AuthError(f"TLS: {e.verify_message or e.reason}") from None
    except ssl.SSLError as e:
        raise AuthError(f"TLS handshake failed: {e.reason or e}") from None
    except socket.timeout:
        raise ConnectionFailed("TLS handshake timed out") from None
    except OSError as e:
        raise ConnectionFailed(f"TLS handshake failed: {e.strerror or e}") from None
    tls.settimeout(None)
    return tls


def _send(sock: socket.socket, conv: P.Conversation, msg: P.Message) -> None:
    conv.send(msg)
    send_all(sock, [P.encode(msg)])


def _read(sock: socket.socket, deadline: float, conv: P.Conversation) -> P.Message:
    header = P.parse_header(recv_exact_deadline(sock, P.HEADER_SIZE, deadline))
    # Checked on the header, so the body of a message out of order (a PACKET's
    # page data, say) is never read.
    conv.receive(header)
    msg = P.parse_control(header, recv_exact_deadline(sock, header.body_len, deadline))
    if isinstance(msg, P.Abort):
        raise PeerAborted(msg.message, msg.exit_code)
    return msg


_M = TypeVar("_M")


def _narrow(msg: P.Message, cls: type[_M]) -> _M:
    """The table already allowed only `cls` here; this tells the type checker."""
    if not isinstance(msg, cls):
        raise InternalError(f"handshake: the state table let {P.event_name(msg)} through")
    return msg


def client(
    sock: socket.socket, role: int, session: bytes, timeout: float, sec: Security
) -> tuple[socket.socket, P.Conversation]:
    """send's side: returns the socket to use (TLS-wrapped when configured) and
    its conversation, just past WELCOME."""
    deadline = time.monotonic() + timeout
    conv = P.Conversation("send-main" if role == P.ROLE_MAIN else "send-channel")
    if sec.tls is not None:
        sock = _tls_wrap(sock, sec.tls, deadline, server=False, hostname=sec.tls_hostname)
    features = P.FEATURE_PSK if sec.psk else 0
    try:
        _send(sock, conv, P.Hello(P.VERSION, role, session, features))
        msg = _read(sock, deadline, conv)
    except ConnectionFailed as e:
        if sec.tls is None:
            raise
        # TLS 1.3 reports a refused client certificate only at the first read.
        raise AuthError(
            f"TLS: the destination closed the connection ({e.message}); it may require "
            "a client certificate (--tls-cert, --tls-key)"
        ) from None
    if isinstance(msg, P.AuthChallenge):
        if sec.psk is None:
            raise AuthError("the destination requires a pre-shared key: give --psk-file")
        mine = auth.nonce()
        mac = auth.client_mac(sec.psk, session, role, msg.nonce, mine)
        _send(sock, conv, P.AuthResponse(mine, mac))
        ok = _narrow(_read(sock, deadline, conv), P.AuthOk)
        if not auth.check(auth.server_mac(sec.psk, session, role, msg.nonce, mine), ok.mac):
            raise AuthError("the destination does not know the pre-shared key")
        msg = _read(sock, deadline, conv)
    elif sec.psk is not None:
        _refuse(sock, conv, "the destination did not ask for the pre-shared key (no --psk-file there?)")
    welcome = _narrow(msg, P.Welcome)
    expect("protocol version", welcome.version, P.VERSION)
    expect("session UUID", welcome.session.hex(), session.hex())
    return sock, conv


def server(
    sock: socket.socket, deadline: float, sec: Security
) -> tuple[socket.socket, P.Hello, P.Conversation]:
    """recv's side, up to but not including WELCOME: the caller checks the role
    first, then says WELCOME through the conversation (see `welcome()`)."""
    if sec.tls is not None:
        sock = _tls_wrap(sock, sec.tls, deadline, server=True, hostname=None)
    # Until HELLO names the role, every connection may be the main one; the two
    # recv conversations agree up to WELCOME.
    conv = P.Conversation("recv-main")
    msg = _narrow(_read(sock, deadline, conv), P.Hello)
    if msg.role != P.ROLE_MAIN:
        conv = P.Conversation("recv-channel", conv.state)
    expect("protocol version", msg.version, P.VERSION)
    if sec.psk is not None:
        if not msg.features & P.FEATURE_PSK:
            _refuse(sock, conv, "authentication required: the source has no --psk-file")
        challenge = auth.nonce()
        _send(sock, conv, P.AuthChallenge(challenge))
        reply = _narrow(_read(sock, deadline, conv), P.AuthResponse)
        want = auth.client_mac(sec.psk, msg.session, msg.role, challenge, reply.nonce)
        if not auth.check(want, reply.mac):
            _refuse(sock, conv, "wrong pre-shared key")
        mac = auth.server_mac(sec.psk, msg.session, msg.role, challenge, reply.nonce)
        _send(sock, conv, P.AuthOk(mac))
    return sock, msg, conv


def welcome(sock: socket.socket, conv: P.Conversation, session: bytes) -> None:
    """recv's last handshake step, once the caller accepted the HELLO's role."""
    _send(sock, conv, P.Welcome(P.VERSION, session))


def _refuse(sock: socket.socket, conv: P.Conversation, why: str) -> NoReturn:
    msg = P.Abort(AuthError.exit_code, why)
    conv.send(msg)
    try:
        sock.sendall(P.encode(msg))
    except OSError:
        pass
    raise AuthError(why)
