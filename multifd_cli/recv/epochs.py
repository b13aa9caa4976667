"""recv's main process during the copy: the epoch loop.

Main touches no page bytes here. It reads the source's epoch messages and the
channels' reports, feeds them to the barrier, and carries out what the barrier
decides: releasing channels (resizing DEST first when an epoch changes a
size), and reporting each closed epoch, to the source too (EPOCH_ACK). In a tree
session it hands the TREE operations to recv/treeorder.py, which applies them where
the barrier makes that safe, and never resizes anything. The loop ends when the
source's DIGEST describes the last epoch and that epoch is closed.
"""

from __future__ import annotations

import time
from typing import Sequence

from multifd_cli import wire as P
from multifd_cli.common.progress import Progress, Snapshot
from multifd_cli.errors import ProtocolError
from multifd_cli.events import Events, Stats
from multifd_cli.net.connection import MainConnection
from multifd_cli.proc import workers
from multifd_cli.recv import messages as M
from multifd_cli.recv.barrier import Closed, EpochBarrier
from multifd_cli.recv.blocks import Blocks
from multifd_cli.recv.sink import Destination
from multifd_cli.recv.treedest import TreeDest
from multifd_cli.recv.treeorder import TreeOrder

MAX_FLUSH_US = 0xFFFFFFFF  # EPOCH_ACK's field is a u32


class EpochLoop:
    """Runs the epochs of one session, from the first EPOCH_START to DIGEST."""

    def __init__(
        self,
        main: MainConnection,
        channels: Sequence[workers.Worker],
        barrier: EpochBarrier,
        blocks: Blocks,
        dest: Destination | TreeDest,
        stats: Stats,
        events: Events,
        progress: Progress,
        heartbeat: float,
        tree: TreeOrder | None = None,
    ) -> None:
        self.main = main
        self.channels = channels
        self.barrier = barrier
        self.blocks = blocks
        self.dest = dest
        self.stats = stats
        self.events = events
        self.progress = progress
        self.heartbeat = heartbeat
        self.tree = tree  # a tree session: when its TREE operations land
        n = len(channels)
        self.wire = [0] * n  # per channel: bytes read from its socket
        self.written = [0] * n  # per channel: bytes written to DEST
        self.started: dict[int, float] = {}  # when each epoch's EPOCH_START arrived
        self.digest: P.Digest | None = None
        self.metadata: dict[int, P.Metadata] = {}  # --preserve, per block

    @property
    def written_bytes(self) -> int:
        return sum(self.written)

    def run(self, pending: list[P.Message]) -> P.Digest:
        """Serve the epochs; return the DIGEST once everything it covers is applied."""
        while True:
            self._on_main(pending)
            pending = []
            self._release()
            closed = self.barrier.close_next()
            if closed is not None:
                self._on_closed(closed)
                continue  # it may let channels go on, or close the next one too
            d = self.digest
            if d is not None and self.barrier.settled(d.epoch):
                self.stats.final_pass_started = self.started[d.epoch]
                return d
            pending = self._wait()

    def _on_main(self, msgs: list[P.Message]) -> None:
        for msg in msgs:
            if isinstance(msg, P.EpochStart):
                if self.tree is not None:
                    self.tree.on_epoch_start(msg.epoch)
                self.barrier.epoch_start(msg.epoch, msg.sizes)
                self.started[msg.epoch] = time.monotonic()
            elif isinstance(msg, P.EpochEnd):
                self.barrier.epoch_end(msg.epoch, msg.counts)
            elif isinstance(msg, P.Digest):
                self.digest = msg
            elif isinstance(msg, P.Tree) and self.tree is not None:
                self.tree.on_tree(msg, self.barrier.started, self.barrier.closed)
            elif isinstance(msg, P.Manifest) and self.tree is not None:
                self.tree.manifest = msg
            elif isinstance(msg, P.Metadata) and self.tree is None:
                if msg.block >= len(self.blocks):
                    raise ProtocolError(
                        f"METADATA block: got {msg.block}, expected < {len(self.blocks)}"
                    )
                self.metadata[msg.block] = msg
            else:
                raise ProtocolError(f"main connection: unexpected {type(msg).__name__}")

    def _release(self) -> None:
        for r in self.barrier.releases():
            if self.tree is not None:
                # A tree's size is its files' total, for progress: DEST is never resized.
                self.tree.on_release(r.epoch)
                self.blocks.sizes = r.sizes
            elif self.blocks.sizes != r.sizes and isinstance(self.dest, Destination):
                self.blocks.resize(r.sizes, self.dest)
            self.channels[r.channel].send(M.Release(r.epoch, r.sizes))

    def _on_closed(self, closed: Closed) -> None:
        k, total = closed
        st = self.stats
        st.passes = k
        st.normal_pages += total.normal
        st.zero_pages += total.zero
        st.transferred_bytes = sum(self.wire)
        st.payload_bytes = sum(self.written)
        if self.tree is not None:
            self.tree.on_closed(k)
        self.main.send(P.EpochAck(k, sum(self.wire), sum(self.written),
                                  min(self.dest.flush_us, MAX_FLUSH_US)))
        self.dest.background_flush()
        self.events.emit(
            "pass", **{"pass": k}, normal_pages=total.normal, zero_pages=total.zero,
            packets=total.packets, transferred_bytes=sum(self.wire),
            duration_ms=round((time.monotonic() - self.started[k]) * 1000, 1),
        )

    def _wait(self) -> list[P.Message]:
        """Wait a heartbeat for reports or the main connection; return its messages."""
        main = self.main
        reports, ready = workers.poll(self.channels, [main], min(self.heartbeat, 0.25))
        for w, r in reports:
            if isinstance(r, M.Progress):
                self.wire[w.index], self.written[w.index] = r
            elif isinstance(r, M.Synced):
                self.barrier.synced(w.index, r.epoch, r.counts)
                self.wire[w.index], self.written[w.index] = r.wire_bytes, r.written_bytes
            else:
                raise ProtocolError(f"channel report: got {type(r).__name__}")
        pending = main.read_available() if ready else []
        main.heartbeat_if_idle(self.heartbeat)
        main.check_silence()
        if self.progress.due():
            sent = sum(self.wire)
            self.progress.update(Snapshot(
                "pass", self.barrier.furthest, sent, sum(self.blocks.sizes),
                self.progress.rate(sent),
            ))
        return pending
