"""The control socket: query and steer a running `multifd send`, like QMP's
query-migrate, migrate_cancel and migrate-set-parameters.

One JSON object per line each way, one request per connection:

    {"cmd": "status"}                                  -> {"ok": true, ...counters}
    {"cmd": "cancel"}                                  -> {"ok": true}
    {"cmd": "set", "param": "max-bandwidth", "value": "50M"} -> {"ok": true}

Errors come back as {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import Any, Callable

from multifd_cli.errors import ConnectionFailed, MultifdError, UsageError
from multifd_cli.net.transport import remove_stale_unix_socket

log = logging.getLogger("multifd")
MAX_REQUEST = 64 << 10


def control_path(text: str) -> str:
    """Accept `unix:PATH` or a bare PATH."""
    path = text[5:] if text.startswith("unix:") else text
    if not path or "\0" in path:
        raise UsageError(f"bad control socket {text!r}: expected unix:PATH")
    return path


class ControlServer:
    """Listens on a unix socket; `serve_ready()` answers whoever connected."""

    def __init__(self, path: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self.handler = handler
        remove_stale_unix_socket(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)  # steering a migration is the owner's business
            self.sock.listen(8)
        except OSError as e:
            self.sock.close()
            # Python's own OSErrors ("AF_UNIX path too long") have no strerror
            raise ConnectionFailed(
                f"cannot listen on control socket {path}: {e.strerror or e}"
            ) from None
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_ready(self) -> None:
        """Answer every pending connection; a bad client never hurts the migration."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                try:
                    conn.settimeout(1.0)
                    data = b""
                    while b"\n" not in data and len(data) < MAX_REQUEST:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    request = json.loads(data.decode() or "{}")
                    if not isinstance(request, dict):
                        raise ValueError("expected a JSON object")
                    reply = self.handler(request)
                except MultifdError as e:
                    # the handler's refusal (a UsageError) or any of its failures:
                    # the client hears why, the migration goes on
                    reply = {"ok": False, "error": e.message}
                except (ValueError, ArithmeticError) as e:
                    # bad JSON or undecodable bytes, or a value the handler could not
                    # take (e.g. an OverflowError): refused, never fatal
                    reply = {"ok": False, "error": f"bad request: {e}"}
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Client side, for `multifd status|cancel|set`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise ConnectionFailed(
            f"cannot reach a running send at {path}: {e.strerror or e}"
        ) from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise ConnectionFailed(f"no answer from {path}") from None
    if not isinstance(reply, dict):
        raise ConnectionFailed(f"no answer from {path}")
    return reply
