#!/usr/bin/env python3
"""A naive parallel file copy over TCP in plain Python: the floor multifd is compared with.

No dirty tracking, hashing, verification, protocol or fsync: each of N processes on
the sending side preads its share of the file and sendall()s it over its own TCP
socket; each of N processes on the receiving side recv_into()s a buffer and
pwrites it at the right offset.

    naive.py recv DEST [--channels 2]          # prints the port, exits when done
    naive.py send SRC --port PORT [--channels 2]

Each connection starts with a 16-byte header: offset and length (two u64, big-endian).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
from typing import Callable

HEADER = struct.Struct(">QQ")
BUF = 1 << 20


def _fork_all(count: int, body: Callable[[int], None]) -> int:
    """Fork `count` children running body(i); return 0 if all exited 0."""
    pids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body(i)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    rc = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        rc |= os.waitstatus_to_exitcode(status) != 0
    return rc


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


def recv(dest: str, channels: int, host: str = "127.0.0.1") -> int:
    """Listen, print the port, receive `channels` connections into DEST."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, 0))
    lsock.listen(channels)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    print(lsock.getsockname()[1], flush=True)

    def body(_i: int) -> None:
        conn, _ = lsock.accept()
        offset, length = HEADER.unpack(_recv_exact(conn, HEADER.size))
        buf = bytearray(BUF)
        view = memoryview(buf)
        end = offset + length
        while offset < end:
            n = conn.recv_into(view, min(BUF, end - offset))
            if n == 0:
                raise ConnectionError("peer closed early")
            os.pwrite(fd, view[:n], offset)
            offset += n
        conn.close()

    return _fork_all(channels, body)


def send(src: str, port: int, channels: int, host: str = "127.0.0.1") -> int:
    """Send SRC in `channels` contiguous shares, one TCP connection each."""
    fd = os.open(src, os.O_RDONLY)
    size = os.fstat(fd).st_size
    share = -(-size // channels)

    def body(i: int) -> None:
        offset = i * share
        length = max(0, min(share, size - offset))
        sock = socket.create_connection((host, port))
        sock.sendall(HEADER.pack(offset, length))
        end = offset + length
        while offset < end:
            data = os.pread(fd, min(BUF, end - offset), offset)
            if not data:
                raise OSError("source shrank")
            sock.sendall(data)
            offset += len(data)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver to close: all bytes are in
        sock.close()

    return _fork_all(channels, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("dest")
    r.add_argument("--channels", type=int, default=2)
    s = sub.add_parser("send")
    s.add_argument("src")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--channels", type=int, default=2)
    a = ap.parse_args(argv)
    if a.cmd == "recv":
        return recv(a.dest, a.channels)
    return send(a.src, a.port, a.channels)


if __name__ == "__main__":
    sys.exit(main())
