"""The receive side of one channel: unframe, check, decompress, verify, write.

The channel owns its socket and pwrites the destination itself. It holds at
every SYNC until main releases it into the next epoch (the messages are in
recv/messages.py: Release in, Synced and Progress out; HashRange and Hashed
for --resume).

Holding at SYNC is the epoch barrier: no channel applies pass k+1 before every
channel has applied all of pass k, so an older copy of a page that travelled on
a slower channel can never land after a newer one. Main decides when to
release (recv/barrier.py); the channel only waits for it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Sequence

from multifd_cli import wire as P
from multifd_cli.common.fsutil import punch_hole, start_writeback
from multifd_cli.common.tables import page_hash, zero_bytes, zero_hash
from multifd_cli.compression import Compressor, by_wire_id
from multifd_cli.config import TestHooks
from multifd_cli.errors import (
    InternalError,
    IOFailure,
    PeerAborted,
    ProtocolError,
    VerifyError,
    expect,
)
from multifd_cli.net.transport import recv_exact
from multifd_cli.proc.messages import Quit
from multifd_cli.proc.workers import next_order
from multifd_cli.recv import messages as M
from multifd_cli.recv.blockfiles import HEADER_GUARD
from multifd_cli.recv.sink import HOLE_BIT, DestTables
from multifd_cli.recv.treepages import TreePages

log = logging.getLogger("multifd")
WRITEBACK_BYTES = 32 << 20  # each channel starts writeback after this much


@dataclass(frozen=True)
class RecvChannelArgs:
    config: P.Config
    fds: tuple[int, ...]
    tables: tuple[DestTables, ...]
    timeout: float
    hooks: TestHooks
    new_file: bool = True  # False when resuming: a page never written may hold old data
    page_sizes: tuple[int, ...] = ()  # per block; a blob's "pages" are packet-size chunks
    shadow_fd: int = -1  # a device DEST: writes below HEADER_GUARD go here until the end
    tree_ids_fd: int = -1  # a tree session: the id directory its files are written through


class ChannelReceiver:
    """Applies the packets of one channel to the destination files."""

    def __init__(self, index: int, sock: socket.socket, args: RecvChannelArgs) -> None:
        cfg = args.config
        self.index = index
        self.sock = sock
        self.args = args
        self.ps = cfg.page_size  # page size of the block being applied
        self.limits = P.Limits(
            max_pages=cfg.pages_per_packet,
            max_payload=cfg.packet_size,
            max_control=P.ABORT.size + P.MAX_ABORT_MESSAGE,
        )
        self._hdr = bytearray(P.HEADER_SIZE)
        self._body = bytearray(16 * cfg.pages_per_packet + cfg.packet_size)
        self._decompressors: dict[int, Compressor] = {}
        self.conv = P.Conversation.handed_over("recv-channel")
        self.packet_num = 0
        self.epoch = 0
        self.sizes: Sequence[int] = ()
        self.counts = P.Counts()
        self.wire_bytes = 0
        self.written_bytes = 0
        self._unflushed = 0
        self.report: Callable[[], None] = lambda: None
        self._next_report = 0.0
        hooks = args.hooks
        self.delay = hooks.delay_seconds if hooks.delay_channel == index else 0.0
        self.delay_epoch = hooks.delay_epoch

    def decompressor(self, wire_id: int) -> Compressor:
        d = self._decompressors.get(wire_id)
        if d is None:
            d = self._decompressors[wire_id] = by_wire_id(wire_id)
        return d

    def begin_epoch(self, epoch: int, sizes: Sequence[int]) -> None:
        """Start applying `epoch`, whose blocks have these sizes."""
        self.epoch = epoch
        self.sizes = sizes
        self.counts = P.Counts()

    def run_epoch(
        self, epoch: int, sizes: Sequence[int], apply: Callable[[P.Packet], None] | None = None
    ) -> P.Counts:
        """Apply packets until this channel's SYNC for `epoch`; return its counts.

        `apply` replaces apply() for a tree session's packets (recv/treepages.py)."""
        apply = apply or self.apply
        self.begin_epoch(epoch, sizes)
        self.conv.receive("RELEASE")
        hv = memoryview(self._hdr)
        bv = memoryview(self._body)
        while True:
            recv_exact(self.sock, hv)
            h = P.parse_header(hv, self.limits)
            body = bv[: h.body_len]
            if h.body_len:
                recv_exact(self.sock, body)
            self.wire_bytes += P.HEADER_SIZE + h.body_len
            self.conv.receive(h)
            if h.type == P.MsgType.HEARTBEAT:
                continue
            if h.type == P.MsgType.ABORT:
                msg = P.parse_control(h, body)
                assert isinstance(msg, P.Abort)
                raise PeerAborted(msg.message, msg.exit_code)
            expect("packet number", h.packet_num, self.packet_num)
            self.packet_num += 1
            expect("packet epoch", h.epoch, epoch)
            msg = P.parse_packet_body(h, body)
            if isinstance(msg, P.Sync):
                expect(f"epoch {epoch} counts in SYNC", msg.counts, self.counts)
                return self.counts
            if self.delay and self.delay_epoch in (0, epoch):
                time.sleep(self.delay)  # test-only: a slow channel
            apply(msg)
            self.counts += P.Counts(1, h.normal, h.zero)
            now = time.monotonic()
            if now >= self._next_report:
                self._next_report = now + 0.25
                self.report()

    def apply(self, p: P.Packet) -> None:
        """Check, decompress, verify and write one packet of the current epoch.

        The network loop calls it for every PACKET; tests call it directly."""
        h = p.header
        if h.block < len(self.args.page_sizes):
            self.ps = self.args.page_sizes[h.block]
        ps = self.ps
        raw = P.check_packet(p, self.sizes, ps, self.limits.max_pages)
        size = self.sizes[h.block]
        fd = self.args.fds[h.block]
        tables = self.args.tables[h.block]
        data: bytes | memoryview = p.payload
        if h.compression and not h.flags & P.FLAG_RAW and raw:
            data = self.decompressor(h.compression).decompress(p.payload, raw)
        mv = memoryview(data)
        offsets = list(p.normal_offsets)
        want = list(p.hashes)
        n = len(offsets)
        if n and offsets == list(range(offsets[0], offsets[0] + n * ps, ps)):
            self._apply_run(h.block, fd, tables, offsets[0], mv, want)
        elif n:
            # Pages in stretches of consecutive offsets, each applied as one run:
            # a packet with gaps (zero pages, or segments sent raw in a packet of
            # their own) costs a few runs, not a Python loop over its pages.
            cuts = [i for i in range(1, n) if offsets[i] - offsets[i - 1] != ps]
            tail = size % ps
            pos = 0
            for a, b in zip([0, *cuts], [*cuts, n]):
                length = (b - a) * ps
                if tail and offsets[b - 1] == size - tail:
                    length -= ps - tail  # the file's short last page ends its run
                self._apply_run(h.block, fd, tables, offsets[a], mv[pos : pos + length], want[a:b])
                pos += length
        if p.zero_offsets:
            self._zero(fd, tables, p.zero_offsets, size)

    def _mismatch(self, block: int, offset: int, got: int, want: int) -> VerifyError:
        return VerifyError(
            f"page at offset {offset} of block {block}: hash {got:#018x}, expected {want:#018x}",
            channel=self.index,
        )

    def _apply_run(
        self, block: int, fd: int, tables: DestTables, start: int, mv: memoryview, want: list[int]
    ) -> None:
        """Consecutive pages (the common case): verify in one sweep, one pwrite."""
        ps = self.ps
        got = [page_hash(mv[x : x + ps]) for x in range(0, len(mv), ps)]
        if got != want:
            i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
            raise self._mismatch(block, start + i * ps, got[i], want[i])
        p0 = start // ps
        n = len(want)
        stamps = tables.stamp.view
        epoch = self.epoch
        seen = stamps[p0 : p0 + n].tolist()
        if epoch in seen or (epoch | HOLE_BIT) in seen:
            raise ProtocolError(f"a page at offset {start}.. arrived twice in epoch {epoch}")
        stamps[p0 : p0 + n] = array("I", [epoch]) * n
        tables.page_hash.view[p0 : p0 + n] = array("Q", got)
        self._write(fd, mv, 0, len(mv), start)

    def _write(self, fd: int, mv: memoryview, pos: int, length: int, offset: int) -> None:
        if length <= 0:
            return
        shadow = self.args.shadow_fd
        if shadow >= 0 and offset < HEADER_GUARD:
            # A device's first MiB is held back and written last, at completion.
            head = min(length, HEADER_GUARD - offset)
            self._pwrite_all(shadow, mv[pos : pos + head], offset)
            pos, length, offset = pos + head, length - head, offset + head
            self.written_bytes += head
            if not length:
                return
        self._pwrite_all(fd, mv[pos : pos + length], offset)
        self.written_bytes += length
        self._unflushed += length
        if self._unflushed >= WRITEBACK_BYTES:
            # Overlap the disk's work with the transfer instead of leaving it all
            # to the final fsync, which falls inside the downtime.
            self._unflushed = 0
            start_writeback(fd, 0, 0)

    def _pwrite_all(self, fd: int, chunk: memoryview, offset: int) -> None:
        while len(chunk):
            try:
                n = os.pwrite(fd, chunk, offset)
            except OSError as e:
                raise IOFailure(f"writing the destination at offset {offset}: {e.strerror}") from None
            chunk = chunk[n:]
            offset += n

    def _zero(self, fd: int, tables: DestTables, offsets: Sequence[int], size: int) -> None:
        """Make pages zero. Skip only pages known to be holes in this new file."""
        ps = self.ps
        stamps = tables.stamp.view
        hashes = tables.page_hash.view
        epoch = self.epoch
        run_off = -1
        run_len = 0
        for off in offsets:
            pi = off // ps
            n = ps if off + ps <= size else size - off
            st = stamps[pi]
            if st & ~HOLE_BIT == epoch and st:
                raise ProtocolError(f"page at offset {off} arrived twice in epoch {epoch}")
            hashes[pi] = zero_hash(n)
            if st & HOLE_BIT or (st == 0 and self.args.new_file):
                stamps[pi] = epoch | HOLE_BIT
                continue
            stamps[pi] = epoch | HOLE_BIT
            if off == run_off + run_len:
                run_len += n
            else:
                self._clear(fd, run_off, run_len)
                run_off, run_len = off, n
        self._clear(fd, run_off, run_len)

    def _clear(self, fd: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        # A device may not read back zeros after a discard: write them there.
        if self.args.shadow_fd < 0 and punch_hole(fd, offset, length):
            return
        ps = self.ps
        for o in range(offset, offset + length, ps):
            n = min(ps, offset + length - o)
            self._write(fd, memoryview(zero_bytes(n)), 0, n, o)


def hash_pages(fd: int, tables: DestTables, start: int, end: int, size: int, ps: int) -> None:
    """Hash what DEST holds now, for --resume: it seeds both the source's
    comparison and our own completion table, so stale hashes never stand in."""
    tables.refresh()
    view = tables.page_hash.view
    buf = bytearray(min(1 << 20, max(ps, (end - start) * ps)))
    mv = memoryview(buf)
    pos, stop = start * ps, min(end * ps, size)
    while pos < stop:
        want = min(len(buf), stop - pos)
        try:
            n = os.preadv(fd, [mv[:want]], pos)
        except OSError as e:
            raise IOFailure(f"reading the destination at offset {pos}: {e.strerror}") from None
        if n < want:
            mv[n:want] = bytes(want - n)  # past the old end the file was just extended: zeros
        hs = [page_hash(mv[x : min(x + ps, want)]) for x in range(0, want, ps)]
        first = pos // ps
        view[first : first + len(hs)] = array("Q", hs)
        pos += want


def channel_main(index: int, pipe: Connection, sock: socket.socket, args: RecvChannelArgs) -> None:
    """Process entry point of a receive channel."""
    sock.settimeout(args.timeout)
    rx = ChannelReceiver(index, sock, args)
    tree = None
    if args.tree_ids_fd >= 0:
        tree = TreePages(index, args.config, args.tree_ids_fd, rx.decompressor)

    def written() -> int:
        return rx.written_bytes + (tree.written if tree is not None else 0)

    rx.report = lambda: pipe.send(M.Progress(rx.wire_bytes, written()))
    log.debug("receiving on %s", sock.getsockname() or "a unix socket")
    try:
        while True:
            cmd = next_order(pipe)
            if isinstance(cmd, Quit):
                return
            if isinstance(cmd, M.HashRange):
                hash_pages(args.fds[cmd.block], args.tables[cmd.block], cmd.start, cmd.end,
                           cmd.size, args.config.page_size)
                pipe.send(M.Hashed(cmd.block, cmd.start, cmd.end))
                continue
            if isinstance(cmd, M.TreeDigest) and tree is not None:
                pipe.send(M.TreeDigested(tree.digest()))
                continue
            if not isinstance(cmd, M.Release):
                raise InternalError(f"from main: got {type(cmd).__name__}, expected Release")
            for t in args.tables:
                t.refresh()
            if tree is not None:
                tree.begin_epoch()
            counts = rx.run_epoch(cmd.epoch, cmd.sizes, tree.apply if tree is not None else None)
            pipe.send(M.Synced(cmd.epoch, counts, rx.wire_bytes, written()))
    finally:
        if tree is not None:
            tree.close()
        sock.close()
