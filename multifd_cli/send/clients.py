"""Clients produce the data that travels through the channels.

The paged client batches pages into packets and may hold a partial batch: its
`flush()` pushes that out. A blob client (the device-state analog) sends whole
units and has nothing to flush. Neither ever sends a SYNC: the orchestrator owns
the one sync that closes each epoch, after every client has flushed or sent.
"""

from __future__ import annotations

import os
from typing import Protocol

from multifd_cli.common.tables import page_hash
from multifd_cli.errors import IOFailure


class PacketSink(Protocol):
    """What a client needs from its channel: a way to put one packet on the wire."""

    def send_pages(
        self,
        block: int,
        normal_offsets: list[int],
        zero_offsets: list[int],
        hashes: list[int],
        payload: list[memoryview | bytes],
    ) -> None: ...


class PagedClient:
    """Queues dirty pages of one block at a time into packet-sized batches.

    A batch holds views into the tracker's read buffer, so full packets go out
    with no copy; `detach()` copies what is still queued before that buffer is
    reused.
    """

    def __init__(self, sink: PacketSink, page_size: int, pages_per_packet: int) -> None:
        self.sink = sink
        self.page_size = page_size
        self.max_pages = pages_per_packet
        self._block = -1
        self._parts: list[memoryview | bytes] = []
        self._normal: list[int] = []
        self._hashes: list[int] = []
        self._zero: list[int] = []

    @property
    def pending(self) -> int:
        """Pages queued but not yet handed to the channel."""
        return len(self._normal) + len(self._zero)

    def _switch(self, block: int) -> None:
        if block != self._block:
            self.flush()
            self._block = block

    def queue_run(self, block: int, offset: int, data: memoryview, hashes: list[int]) -> None:
        """Queue consecutive pages starting at `offset`; hashes[i] is of page i of `data`.

        Only the last page of a run may be short (the tail of the block).
        """
        self._switch(block)
        ps = self.page_size
        done = 0
        count = len(hashes)
        while done < count:
            take = min(count - done, self.max_pages - len(self._normal) - len(self._zero))
            lo = done * ps
            hi = (done + take) * ps if done + take < count else len(data)
            self._parts.append(data[lo:hi])
            start = offset + lo
            self._normal.extend(range(start, start + take * ps, ps))
            self._hashes.extend(hashes[done : done + take])
            done += take
            if len(self._normal) + len(self._zero) >= self.max_pages:
                self.flush()

    def queue_page(self, block: int, offset: int, data: memoryview, page_hash: int) -> None:
        """Queue one page; `page_hash` must be the hash of exactly `data`."""
        self.queue_run(block, offset, data, [page_hash])

    def queue_zero(self, block: int, offset: int) -> None:
        """Describe a zero page: no payload, the destination makes it zero."""
        self._switch(block)
        self._zero.append(offset)
        if len(self._normal) + len(self._zero) >= self.max_pages:
            self.flush()

    def queue_zeros(self, block: int, offsets: range) -> None:
        """Describe a run of zero pages, as queue_zero() would one by one."""
        self._switch(block)
        done = 0
        while done < len(offsets):
            take = min(len(offsets) - done, self.max_pages - len(self._normal) - len(self._zero))
            self._zero.extend(offsets[done : done + take])
            done += take
            if len(self._normal) + len(self._zero) >= self.max_pages:
                self.flush()

    def detach(self) -> None:
        """Copy queued page data out of buffers the caller is about to reuse."""
        if self._parts and not (len(self._parts) == 1 and isinstance(self._parts[0], bytes)):
            self._parts = [b"".join(self._parts)]

    def flush(self) -> None:
        """Push the partial batch, if any. Called when full, on a block change, and at pass end."""
        if not self._normal and not self._zero:
            return
        self.sink.send_pages(self._block, self._normal, self._zero, self._hashes, self._parts)
        self._parts = []
        self._normal = []
        self._hashes = []
        self._zero = []


class BlobClient:
    """Sends one blob (the device-state analog) whole, chunk by chunk as it reads it.

    Every chunk goes out at once, so it holds nothing back and has no flush();
    it never syncs either: the orchestrator's one sync closes the epoch.
    """

    def __init__(self, sink: PacketSink, chunk_size: int) -> None:
        self.sink = sink
        self.chunk_size = chunk_size

    def send(self, block: int, path: str, first: int, end: int, size: int,
             hashes: memoryview) -> int:
        """Send chunks [first, end) of the blob in `path`; record each chunk's hash."""
        cs = self.chunk_size
        sent = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IOFailure(f"cannot open the state {path}: {e.strerror}") from None
        try:
            for c in range(first, end):
                off = c * cs
                want = min(cs, size - off)
                data = os.pread(fd, want, off)
                if len(data) != want:
                    raise IOFailure(f"the state {path} shrank while being sent")
                h = page_hash(data)
                hashes[c] = h
                self.sink.send_pages(block, [off], [], [h], [data])
                sent += want
        finally:
            os.close(fd)
        return sent
