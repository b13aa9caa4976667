"""Pre-shared-key authentication: every connection proves it knows the key.

After HELLO (which carries FEATURE_PSK), the receiver sends a fresh nonce; the
sender answers with its own nonce and an HMAC-SHA256 over both nonces, the
session UUID and the connection's role; the receiver answers with its own HMAC
over the same, so each side knows the other has the key. The key never crosses
the wire, and a recorded exchange is useless for another connection.

A PSK without TLS authenticates the peers but does not hide or protect the data
in flight; add --tls-* for that.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multifd_cli.errors import UsageError
from multifd_cli.wire import NONCE_LEN

if TYPE_CHECKING:
    import ssl  # only for TLS, imported where a context is made

_LABEL = b"multifd-psk-v1 "


@dataclass(frozen=True)
class Security:
    """What authenticates and protects every connection of a session."""

    psk: bytes | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None  # the name the destination's certificate must carry
MIN_KEY_BYTES = 16


#: A key file is a few dozen bytes; anything this big is not a key file.
MAX_KEY_FILE = 64 << 10


def load_psk(path: str) -> bytes:
    """Read a key file; surrounding whitespace (a trailing newline) is not key.

    Only a regular file, and at most MAX_KEY_FILE bytes of it: a FIFO would block
    open() forever and /dev/zero would read without end. O_NONBLOCK keeps the
    open() of a FIFO from waiting for a writer; fstat then refuses it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read --psk-file {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"--psk-file {path}: not a regular file")
        os.set_blocking(fd, True)
        data = b""
        while len(data) <= MAX_KEY_FILE:
            chunk = os.read(fd, MAX_KEY_FILE + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise UsageError(f"cannot read --psk-file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"--psk-file {path}: larger than {MAX_KEY_FILE} bytes, not a key file")
    key = data.strip()
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"--psk-file {path}: the key has {len(key)} bytes, expected at least {MIN_KEY_BYTES}"
        )
    return key


def nonce() -> bytes:
    return os.urandom(NONCE_LEN)


def _mac(key: bytes, who: bytes, session: bytes, role: int, server: bytes, client: bytes) -> bytes:
    msg = _LABEL + who + session + struct.pack("<H", role) + server + client
    return hmac.new(key, msg, hashlib.sha256).digest()


def client_mac(key: bytes, session: bytes, role: int, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(key, b"client", session, role, server_nonce, client_nonce)


def server_mac(key: bytes, session: bytes, role: int, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(key, b"server", session, role, server_nonce, client_nonce)


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
