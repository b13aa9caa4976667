"""send's channel processes as one pool: fork them, hand them messages, gather reports.

The pool owns the process plumbing of the send side and the two steps that close
an epoch on every channel: flush(), then sync(). What to send, and when to
switch over, is decided elsewhere (passes.py, switchover.py).
"""

from __future__ import annotations

import itertools
import time
from types import TracebackType
from typing import Any, Callable, Iterable, Sequence, TypeVar

from multifd_cli import wire as P
from multifd_cli.common.tables import pages_of
from multifd_cli.errors import ProtocolError, WorkerFailed
from multifd_cli.proc import workers
from multifd_cli.send.channel import SendChannelArgs, channel_main
from multifd_cli.send.messages import (
    BlobSent,
    Flush,
    Flushed,
    FromChannel,
    Ready,
    SendBlob,
    Sync,
    Synced,
    ToChannel,
    TreeDigest,
    TreeDigested,
)
from multifd_cli.send.sources import Blob

#: Something main waits on besides its channels (a socket, say), and what to do
#: when it becomes readable.
Watch = tuple[Any, Callable[[], None]]

R = TypeVar("R", bound=FromChannel)
LONGEST_WAIT = 0.25  # between checks of cancel, progress and the main connection's silence


def expect_report(msg: Any, kind: type[R]) -> R:
    """A channel's report, checked to be the one main waits for now."""
    if not isinstance(msg, kind):
        raise ProtocolError(f"channel report: got {type(msg).__name__}, expected {kind.__name__}")
    return msg


class ChannelPool:
    """The channel processes of one migration and their per-channel totals."""

    def __init__(self, count: int, heartbeat: float, watched: Callable[[], Sequence[Watch]],
                 tick: Callable[[], None]) -> None:
        self.count = count
        self.heartbeat = heartbeat
        self.watched = watched  # asked on every wait: the main connection comes later
        self.tick = tick  # after every wait: cancel, progress, the main connection's heartbeat
        self.workers: list[workers.Worker] = []
        self.wire = [0] * count  # bytes each channel put on the wire
        self.payload = [0] * count  # and the page bytes behind them

    def __enter__(self) -> ChannelPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.workers:  # a failure: stop at once
            workers.terminate(self.workers)
            self.workers = []

    def start(self, args: SendChannelArgs, close: Callable[[], Iterable[Any]],
              timeout: float) -> None:
        """Fork the channels and wait until each has connected and opened the sources."""
        self.workers = workers.start(
            self.count, "send", channel_main, args_for=lambda i: (args,),
            close_for=lambda i: close(),
        )
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(self.workers):
            if time.monotonic() > deadline:
                raise WorkerFailed("channels did not connect in time", 3, -1)
            for w, msg in self.poll():
                expect_report(msg, Ready)
                ready.add(w.index)

    def stop(self) -> None:
        """The migration is complete: let every channel finish and reap it."""
        workers.stop(self.workers)
        self.workers = []

    def send(self, index: int, msg: ToChannel) -> None:
        self.workers[index].send(msg)

    def poll(self) -> list[tuple[workers.Worker, FromChannel]]:
        """Wait briefly for channel reports while serving whatever else is watched."""
        watched = dict(self.watched())
        reports, ready = workers.poll(self.workers, list(watched),
                                      min(self.heartbeat, LONGEST_WAIT))
        for obj in ready:
            watched[obj]()
        self.tick()
        return reports

    def gather(self, kind: type[R]) -> list[tuple[workers.Worker, R]]:
        """One report of `kind` from every channel."""
        got: dict[int, tuple[workers.Worker, R]] = {}
        while len(got) < len(self.workers):
            for w, msg in self.poll():
                got[w.index] = (w, expect_report(msg, kind))
        return list(got.values())

    def tree_digests(self, files: Sequence[tuple[tuple[int, int], ...]]) -> list[bytes]:
        """Each channel's digest of its tree files' page tables, in channel order;
        files[c] are channel c's (file id, size) in the final walk."""
        for w in self.workers:
            w.send(TreeDigest(files[w.index]))
        got = sorted(self.gather(TreeDigested), key=lambda r: r[0].index)
        return [msg.digest for _, msg in got]

    def flush(self) -> None:
        """Every client pushes out what it still holds; nothing is synced here."""
        for w in self.workers:
            w.send(Flush())
        self.gather(Flushed)

    def send_blobs(self, epoch: int, blobs: Sequence[Blob], first_block: int,
                   packet_size: int) -> None:
        """Each blob goes whole, in packet-size chunks spread over the channels."""
        pending = 0
        for i, blob in enumerate(blobs):
            chunks = pages_of(blob.size, packet_size)
            per = max(1, -(-chunks // len(self.workers)))
            for w, start in zip(itertools.cycle(self.workers), range(0, chunks, per)):
                w.send(SendBlob(epoch, first_block + i, blob.produced, start,
                                min(chunks, start + per), blob.size))
                pending += 1
        while pending:
            for _, msg in self.poll():
                expect_report(msg, BlobSent)
                pending -= 1

    def sync(self, epoch: int) -> P.Counts:
        """A SYNC packet on every channel; what the epoch held on all of them.

        With the file: transport the same gather is the source's own barrier: no
        page of pass k+1 is written before every channel finished pass k.
        """
        for w in self.workers:
            w.send(Sync(epoch))
        total = P.Counts()
        for w, msg in self.gather(Synced):
            total += msg.counts
            self.wire[w.index] = msg.wire_bytes
            self.payload[w.index] = msg.payload_bytes
        return total
