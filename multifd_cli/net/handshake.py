"""The start of every connection: TLS (optional), HELLO, the key proof
(optional), WELCOME. Both sides' halves live here so they cannot drift apart.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from multifd_cli import wire as P
from multifd_cli.errors import (
    AuthError,
    ConnectionFailed,
    PeerAborted,
    ProtocolError,
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


def _read(sock: socket.socket, deadline: float) -> P.Message:
    header = P.parse_header(recv_exact_deadline(sock, P.HEADER_SIZE, deadline))
    if header.type == P.MsgType.PACKET:
        raise ProtocolError("handshake: got PACKET, expected a control message")
    msg = P.parse_control(header, recv_exact_deadline(sock, header.body_len, deadline))
    if isinstance(msg, P.Abort):
        raise PeerAborted(msg.message, msg.exit_code)
    return msg


def client(
    sock: socket.socket, role: int, session: bytes, timeout: float, sec: Security
) -> socket.socket:
    """send's side: returns the socket to use (TLS-wrapped when configured)."""
    deadline = time.monotonic() + timeout
    if sec.tls is not None:
        sock = _tls_wrap(sock, sec.tls, deadline, server=False, hostname=sec.tls_hostname)
    features = P.FEATURE_PSK if sec.psk else 0
    try:
        send_all(sock, [P.encode_hello(role, session, features)])
        msg = _read(sock, deadline)
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
        send_all(sock, [P.encode_auth_response(mine, mac)])
        ok = _read(sock, deadline)
        if not isinstance(ok, P.AuthOk):
            raise ProtocolError(f"handshake: got {P.event_name(ok)}, expected AUTH_OK")
        if not auth.check(auth.server_mac(sec.psk, session, role, msg.nonce, mine), ok.mac):
            raise AuthError("the destination does not know the pre-shared key")
        msg = _read(sock, deadline)
    elif sec.psk is not None:
        _refuse(sock, "the destination did not ask for the pre-shared key (no --psk-file there?)")
    if not isinstance(msg, P.Welcome):
        raise ProtocolError(f"handshake: got {P.event_name(msg)}, expected WELCOME")
    expect("protocol version", msg.version, P.VERSION)
    expect("session UUID", msg.session.hex(), session.hex())
    return sock


def server(sock: socket.socket, deadline: float, sec: Security) -> tuple[socket.socket, P.Hello]:
    """recv's side, up to but not including WELCOME (the caller checks the role)."""
    if sec.tls is not None:
        sock = _tls_wrap(sock, sec.tls, deadline, server=True, hostname=None)
    msg = _read(sock, deadline)
    if not isinstance(msg, P.Hello):
        raise ProtocolError(f"first message: got {P.event_name(msg)}, expected HELLO")
    expect("protocol version", msg.version, P.VERSION)
    if sec.psk is not None:
        if not msg.features & P.FEATURE_PSK:
            _refuse(sock, "authentication required: the source has no --psk-file")
        challenge = auth.nonce()
        send_all(sock, [P.encode_auth_challenge(challenge)])
        reply = _read(sock, deadline)
        if not isinstance(reply, P.AuthResponse):
            raise ProtocolError(f"handshake: got {P.event_name(reply)}, expected AUTH_RESPONSE")
        want = auth.client_mac(sec.psk, msg.session, msg.role, challenge, reply.nonce)
        if not auth.check(want, reply.mac):
            _refuse(sock, "wrong pre-shared key")
        mac = auth.server_mac(sec.psk, msg.session, msg.role, challenge, reply.nonce)
        send_all(sock, [P.encode_auth_ok(mac)])
    return sock, msg


def _refuse(sock: socket.socket, why: str) -> None:
    try:
        sock.sendall(P.encode_abort(AuthError.exit_code, why))
    except OSError:
        pass
    raise AuthError(why)
