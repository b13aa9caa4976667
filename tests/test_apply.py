"""The destination channel's apply step on its own: packets in, file and tables out.

A real file and real shared tables, no network: each packet is encoded and
parsed as it would be on the wire, then applied. This pins what the receiver
does with pages that are not one consecutive run (a packet with gaps, pages
out of order, the file's short last page), and that it still refuses a page
sent twice in one epoch or a page whose hash does not match.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from multifd_cli import wire as P
from multifd_cli.common.tables import page_hash
from multifd_cli.config import TestHooks as Hooks
from multifd_cli.errors import ProtocolError, VerifyError
from multifd_cli.recv.channel import ChannelReceiver, RecvChannelArgs
from multifd_cli.recv.sink import DestTables

PS = 4096
SIZE = 40 * PS + 1234  # a short last page at offset 40 * PS


class Dest:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, SIZE)
        self.tables = DestTables.create("apply-test", SIZE, PS)
        cfg = P.Config(channels=1, compression=0, level=0, page_size=PS, packet_size=64 * PS)
        self.a, self.b = socket.socketpair()
        args = RecvChannelArgs(config=cfg, fds=(self.fd,), tables=(self.tables,), timeout=5.0,
                               hooks=Hooks(), page_sizes=(PS,))
        self.rx = ChannelReceiver(0, self.a, args)
        self.rx.begin_epoch(1, (SIZE,))
        self.num = 0

    def apply(self, offsets: Sequence[int], data: bytes, hashes: Sequence[int] | None = None,
              zeros: Sequence[int] = ()) -> None:
        pages = [data[o : min(o + PS, SIZE)] for o in offsets]
        bufs = P.encode_packet(
            epoch=1, packet_num=self.num, block=0, normal_offsets=offsets, zero_offsets=zeros,
            hashes=hashes if hashes is not None else [page_hash(p) for p in pages],
            payload=pages,
        )
        self.num += 1
        wire = b"".join(bytes(b) for b in bufs)
        h = P.parse_header(wire[: P.HEADER_SIZE])
        msg = P.parse_packet_body(h, wire[P.HEADER_SIZE :])
        assert isinstance(msg, P.Packet)
        self.rx.apply(msg)

    def close(self) -> None:
        os.close(self.fd)
        self.tables.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[Dest]:
    d = Dest(tmp_path / "dest")
    yield d
    d.close()


def source() -> bytes:
    return random.Random(7).randbytes(SIZE)


def test_pages_with_gaps_and_out_of_order_land_where_they_belong(dest: Dest) -> None:
    data = source()
    # Runs of several lengths, a gap, the short last page in the middle of the
    # packet, and runs given in descending order.
    first = [o * PS for o in (0, 1, 2, 5, 6, 40, 9, 3, 4, 30, 31, 32)]
    rest = [o * PS for o in range(41) if o * PS not in first]
    dest.apply(first, data)
    dest.apply(rest[::-1], data)
    assert os.pread(dest.fd, SIZE + 1, 0) == data
    got = dest.tables.page_hash.view[:41].tolist()
    assert got == [page_hash(data[o : o + PS]) for o in range(0, SIZE, PS)]
    assert set(dest.tables.stamp.view[:41].tolist()) == {1}


@pytest.mark.parametrize("offsets", [[0, 1, 7, 1], [3, 4, 5, 4], [40, 0, 40]])
def test_a_page_twice_in_one_epoch_is_refused(dest: Dest, offsets: list[int]) -> None:
    with pytest.raises(ProtocolError, match="arrived twice in epoch 1"):
        dest.apply([o * PS for o in offsets], source())


@pytest.mark.parametrize("bad", [0, 2, 5])
def test_a_wrong_hash_names_the_page(dest: Dest, bad: int) -> None:
    data = source()
    offsets = [o * PS for o in (0, 1, 8, 9, 10, 40)]
    hashes = [page_hash(data[o : o + PS]) for o in offsets]
    hashes[bad] ^= 1
    with pytest.raises(VerifyError, match=rf"^channel 0: page at offset {offsets[bad]} of block 0: "):
        dest.apply(offsets, data, hashes)
    # Nothing at or after the bad page's run was written.
    run_start = {0: 0, 2: 2, 5: 5}[bad]
    for o in offsets[run_start:]:
        assert os.pread(dest.fd, PS, o) == bytes(min(PS, SIZE - o))


def test_a_short_page_anywhere_but_the_end_is_refused(dest: Dest) -> None:
    data = source()
    # 40 * PS is the short last page; a packet claiming a full page there has
    # a payload one page-remainder too long.
    pages = [data[0:PS], data[40 * PS : 40 * PS + PS]]
    bufs = P.encode_packet(epoch=1, packet_num=0, block=0, normal_offsets=[40 * PS, 0],
                           zero_offsets=[], hashes=[0, 0], payload=pages + [bytes(PS - 1234)])
    wire = b"".join(bytes(b) for b in bufs)
    h = P.parse_header(wire[: P.HEADER_SIZE])
    msg = P.parse_packet_body(h, wire[P.HEADER_SIZE :])
    assert isinstance(msg, P.Packet)
    with pytest.raises(ProtocolError, match=re.escape("uncompressed payload length")):
        dest.rx.apply(msg)
