"""The send side of one channel: read, hash, compress, frame, write.

Each channel connects its own socket, opens the sources itself and preads
them, so page bytes never cross a pipe. Main sends the work descriptions of
send/messages.py (Work, Flush, SendBlob, Sync, or Quit) and the channel answers
each with its report (Done, Flushed, BlobSent, Synced), or ChannelError.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Sequence

from multifd_cli import wire as P
from multifd_cli.common.tables import SharedTable
from multifd_cli.compression import CompressionSpec, Compressor, NoCompression, get_compressor
from multifd_cli.compression.adaptive import AdaptivePolicy, Auto, CodecOption
from multifd_cli.compression.probe import PROBE_PAGES, incompressible_segments
from multifd_cli.errors import IOFailure, ProtocolError, expect
from multifd_cli.net import handshake
from multifd_cli.net.auth import Security
from multifd_cli.net.transport import Uri, connect, send_all
from multifd_cli.proc.messages import Quit
from multifd_cli.proc.workers import next_order
from multifd_cli.send.clients import BlobClient, PagedClient
from multifd_cli.send.messages import (
    BlobSent,
    Done,
    Flush,
    Flushed,
    Forget,
    Ready,
    SendBlob,
    Sync,
    Synced,
    TreeDigest,
    TreeDigested,
    TreeWork,
    Work,
)
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.tracker import HashTracker, SourceTables
from multifd_cli.send.tree.files import TreeReader

if TYPE_CHECKING:
    from multifd_cli.image.layout import ImageLayout
    from multifd_cli.image.writer import ImageSink

log = logging.getLogger("multifd")


@dataclass(frozen=True)
class SendChannelArgs:
    uri: Uri | None
    session: bytes
    config: P.Config
    compression: CompressionSpec
    sources: tuple[str, ...]
    tables: tuple[SourceTables, ...]
    timeout: float
    heartbeat: float
    limit: SharedRateLimit
    security: Security
    direct_io: bool = False
    image: tuple[str, ImageLayout, tuple[SharedTable, ...]] | None = None  # file: transport
    identities: tuple[tuple[int, int], ...] = ()  # (st_dev, st_ino) main opened, per source
    tree_root: bytes = b""  # a directory source: its root, which TreeWork paths are under


class ChannelSender:
    """Frames packets onto this channel's socket and counts them per epoch."""

    def __init__(
        self, sock: socket.socket, compressor: Compressor | None, limit: SharedRateLimit,
        policy: AdaptivePolicy | None = None, conv: P.Conversation | None = None,
    ) -> None:
        self.sock = sock
        self.conv = conv or P.Conversation.handed_over("send-channel")
        self.limit = limit
        self.policy = policy  # --compress auto: the codec is chosen per packet
        self.comp = compressor
        self.epoch = 0
        self.packet_num = 0
        self.epoch_counts = P.Counts()
        self.wire_bytes = 0
        self.payload_bytes = 0
        self.last_send = time.monotonic()

    def send_pages(
        self,
        block: int,
        normal_offsets: list[int],
        zero_offsets: list[int],
        hashes: list[int],
        payload: list[memoryview | bytes],
    ) -> None:
        size = sum(len(p) for p in payload)
        if self.policy is not None:
            option = self.policy.choose()
            comp = option.codec
            self._emit(block, normal_offsets, zero_offsets, hashes, payload, size, comp, option)
            return
        comp = self.comp
        n = len(normal_offsets)
        if comp is None or n < 2 * PROBE_PAGES or size % n:
            # Nothing to compress, too few pages to split, or a short tail page.
            self._emit(block, normal_offsets, zero_offsets, hashes, payload, size, comp)
            return
        data = memoryview(payload[0] if len(payload) == 1 else b"".join(payload))
        seg = size // n * PROBE_PAGES
        skip = incompressible_segments(comp, data, seg)
        if not any(skip):
            self._emit(block, normal_offsets, zero_offsets, hashes, [data], size, comp)
            return
        # Pages of segments that did not shrink in the probe go raw in a packet of
        # their own, without being compressed at all; the rest are compressed.
        for raw in (False, True):
            idx = [i for k, flag in enumerate(skip) if flag == raw
                   for i in range(k * PROBE_PAGES, min(n, (k + 1) * PROBE_PAGES))]
            if not idx:
                continue
            parts: list[memoryview | bytes] = [
                data[k * seg : (k + 1) * seg] for k, flag in enumerate(skip) if flag == raw
            ]
            self._emit(
                block, [normal_offsets[i] for i in idx], zero_offsets,
                [hashes[i] for i in idx], parts, sum(len(x) for x in parts), comp, raw=raw,
            )
            zero_offsets = []  # they went with the first packet

    def _emit(
        self,
        block: int,
        normal_offsets: list[int],
        zero_offsets: list[int],
        hashes: list[int],
        payload: list[memoryview | bytes],
        size: int,
        comp: Compressor | None,
        option: CodecOption | None = None,
        raw: bool = False,
    ) -> None:
        """Compress (unless `raw`), frame and send one packet."""
        comp_id = comp.wire_id if comp is not None else 0
        data: list[memoryview | bytes] = payload
        if comp is not None and size and not raw:
            t0 = time.perf_counter()
            packed = comp.compress(payload[0] if len(payload) == 1 else b"".join(payload))
            if self.policy is not None and option is not None:
                self.policy.observe_codec(option, size, len(packed), time.perf_counter() - t0)
            if len(packed) < size:
                data = [packed]
            else:
                raw = True  # it did not shrink: send it as it is, flagged
        bufs = P.encode_packet(
            epoch=self.epoch,
            packet_num=self.packet_num,
            block=block,
            normal_offsets=normal_offsets,
            zero_offsets=zero_offsets,
            hashes=hashes,
            payload=data,
            compression=comp_id,
            raw=raw and comp is not None,
        )
        self.conv.send("PACKET")
        t0 = time.perf_counter()
        self.limit.consume(sum(len(b) for b in bufs))
        sent = send_all(self.sock, bufs)
        if self.policy is not None:
            self.policy.observe_link(sent, time.perf_counter() - t0)
        self.wire_bytes += sent
        self.payload_bytes += size
        self.packet_num += 1
        self.epoch_counts += P.Counts(1, len(normal_offsets), len(zero_offsets))
        self.last_send = time.monotonic()

    def send_sync(self, epoch: int) -> P.Counts:
        """Close this channel's epoch: a SYNC packet with what it sent in it."""
        expect("sync epoch", epoch, self.epoch)
        counts = self.epoch_counts
        self.conv.send("SYNC")
        self.wire_bytes += send_all(self.sock, [P.encode_sync(epoch, self.packet_num, counts)])
        self.packet_num += 1
        self.epoch_counts = P.Counts()
        self.last_send = time.monotonic()
        return counts

    def heartbeat_if_idle(self, interval: float) -> None:
        if time.monotonic() - self.last_send >= interval:
            self.conv.send("HEARTBEAT")
            self.wire_bytes += send_all(self.sock, [P.encode_heartbeat()])
            self.last_send = time.monotonic()


def channel_main(index: int, pipe: Connection, args: SendChannelArgs) -> None:
    """Process entry point of a send channel."""
    if args.image is not None:
        from multifd_cli.image.writer import ImageSink

        path, layout, present = args.image
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IOFailure(f"cannot open image {path}: {e.strerror}") from None
        try:
            _serve(index, pipe, ImageSink(fd, layout, present), args)
        finally:
            os.close(fd)
        return
    assert args.uri is not None
    sock = connect(args.uri, args.timeout)
    try:
        sock, conv = handshake.client(sock, index, args.session, args.timeout, args.security)
        log.debug("connected to %s", args.uri)
        policy = None
        comp: Compressor | None = get_compressor(args.compression)
        if isinstance(comp, Auto):
            channels = args.config.channels
            policy = comp.policy(cap=lambda: args.limit.rate / channels)
            comp = None
        elif isinstance(comp, NoCompression):
            comp = None
        _serve(index, pipe, ChannelSender(sock, comp, args.limit, policy, conv), args)
    finally:
        sock.close()


def _open_sources(paths: Sequence[str], direct: bool,
                  identities: Sequence[tuple[int, int]] = ()) -> list[int]:
    """Each channel opens the sources itself; --direct-io bypasses the page cache,
    for writers that do too. Each must be the file main opened: a file renamed
    over SRC in between would mix two files in one copy."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fds = []
    for i, p in enumerate(paths):
        try:
            fds.append(os.open(p, flags))
        except OSError as e:
            hint = " (--direct-io is not supported there)" if direct and e.errno == errno.EINVAL else ""
            raise IOFailure(f"cannot open source {p}: {e.strerror}{hint}") from None
        st = os.fstat(fds[-1])
        if i < len(identities) and (st.st_dev, st.st_ino) != identities[i]:
            raise IOFailure(f"source {p} was replaced during the migration (a file was renamed "
                            "over it): start again to copy the new file")
    return fds


def _serve(index: int, pipe: Connection, sender: ChannelSender | ImageSink,
           args: SendChannelArgs) -> None:
    cfg = args.config
    client = PagedClient(sender, cfg.page_size, cfg.pages_per_packet)
    blobs = BlobClient(sender, cfg.packet_size)
    tracker = HashTracker(cfg.page_size, lambda: sender.heartbeat_if_idle(args.heartbeat))
    fds = _open_sources(args.sources, args.direct_io, args.identities)
    tracker.direct = args.direct_io
    block_device = [stat.S_ISBLK(os.fstat(fd).st_mode) for fd in fds]
    tree = TreeReader(args.tree_root, cfg.page_size,
                      lambda: sender.heartbeat_if_idle(args.heartbeat))
    pipe.send(Ready())
    while True:
        if not pipe.poll(args.heartbeat):
            sender.heartbeat_if_idle(args.heartbeat)
            continue
        cmd = next_order(pipe)
        if isinstance(cmd, Quit):
            return
        if isinstance(cmd, Work):
            if cmd.epoch != sender.epoch:
                # An epoch's packets never mix with the next one's in a batch.
                client.flush()
                sender.epoch = cmd.epoch
            block = cmd.block
            tables = args.tables[block]
            tables.refresh()
            t0 = time.monotonic()
            wire0 = sender.wire_bytes
            # SEEK_DATA/SEEK_HOLE cost a walk of the page cache on some filesystems
            # (tmpfs): only ask where the file has holes at all.
            st = os.fstat(fds[block])
            tracker.holes = not block_device[block] and st.st_blocks * 512 < st.st_size
            res = tracker.scan(fds[block], block, tables, cmd.start, cmd.end, cmd.size, cmd.full,
                               client, cmd.seeded)
            pipe.send(Done(cmd.item, res.dirty_pages, res.zero_pages, res.read_bytes,
                           sender.wire_bytes - wire0, time.monotonic() - t0, res.short_read))
        elif isinstance(cmd, TreeWork):
            if cmd.epoch != sender.epoch:
                client.flush()
                sender.epoch = cmd.epoch
            t0 = time.monotonic()
            wire0 = sender.wire_bytes
            res = tree.scan(cmd.block, cmd.files, client)
            pipe.send(Done(cmd.item, res.dirty_pages, res.zero_pages, res.read_bytes,
                           sender.wire_bytes - wire0, time.monotonic() - t0, res.short_read,
                           tuple(tree.unread)))
        elif isinstance(cmd, Forget):
            tree.files.forget(cmd.fids)
        elif isinstance(cmd, TreeDigest):
            pipe.send(TreeDigested(tree.files.digest(cfg.page_size, files=cmd.files)))
        elif isinstance(cmd, SendBlob):
            sender.epoch = cmd.epoch
            table = args.tables[cmd.block]
            table.refresh()
            blobs.send(cmd.block, cmd.path, cmd.first, cmd.end, cmd.size, table.page_hash.view)
            pipe.send(BlobSent(cmd.block, cmd.first, cmd.end))
        elif isinstance(cmd, Flush):
            client.flush()
            pipe.send(Flushed(sender.wire_bytes, sender.payload_bytes))
        elif isinstance(cmd, Sync):
            sender.epoch = cmd.epoch  # a channel given no work this epoch still syncs it
            counts = sender.send_sync(cmd.epoch)
            pipe.send(Synced(cmd.epoch, counts, sender.wire_bytes, sender.payload_bytes))
        else:
            raise ProtocolError(f"channel command: got {type(cmd).__name__}")
