"""Clients produce the data that travels through the channels.

The paged client batches pages into packets and may hold a partial batch: its
`flush()` pushes that out. A blob client (the device-state analog) sends whole
units and has nothing to flush. Neither ever sends a SYNC: the orchestrator owns
the one sync that closes each epoch, after every client has flushed or sent.
"""

from __future__ import annotations

from typing import Protocol

from multifd_cli.errors import InternalError


class PacketSink(Protocol):
    """What a client needs from its channel: a way to put one packet on the wire."""

    def send_pages(
        self,
        block: int,
        normal_offsets: list[int],
        zero_offsets: list[int],
        hashes: list[int],
        payload: memoryview,
    ) -> None: ...


class PagedClient:
    """Queues dirty pages of one block at a time into packet-sized batches."""

    def __init__(self, sink: PacketSink, page_size: int, pages_per_packet: int) -> None:
        self.sink = sink
        self.page_size = page_size
        self.max_pages = pages_per_packet
        self._buf = bytearray(page_size * pages_per_packet)
        self._view = memoryview(self._buf)
        self._fill = 0
        self._block = -1
        self._normal: list[int] = []
        self._hashes: list[int] = []
        self._zero: list[int] = []

    @property
    def pending(self) -> int:
        """Pages queued but not yet handed to the channel."""
        return len(self._normal) + len(self._zero)

    def _room_for(self, block: int) -> None:
        if block != self._block:
            self.flush()
            self._block = block
        elif len(self._normal) + len(self._zero) >= self.max_pages:
            self.flush()

    def queue_page(self, block: int, offset: int, data: memoryview, page_hash: int) -> None:
        """Copy one page into the batch; `page_hash` must be the hash of exactly `data`."""
        self._room_for(block)
        end = self._fill + len(data)
        if end > len(self._buf):
            raise InternalError(f"page of {len(data)} bytes overflows the packet buffer")
        self._view[self._fill : end] = data
        self._fill = end
        self._normal.append(offset)
        self._hashes.append(page_hash)

    def queue_zero(self, block: int, offset: int) -> None:
        """Describe a zero page: no payload, the destination makes it zero."""
        self._room_for(block)
        self._zero.append(offset)

    def flush(self) -> None:
        """Push the partial batch, if any. Called when full, on a block change, and at pass end."""
        if not self._normal and not self._zero:
            return
        self.sink.send_pages(
            self._block, self._normal, self._zero, self._hashes, self._view[: self._fill]
        )
        self._normal = []
        self._hashes = []
        self._zero = []
        self._fill = 0
