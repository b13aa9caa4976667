"""What send's main process and its channel processes say to each other.

Main hands out work descriptions and closes epochs; a channel answers each one.
Every message is a NamedTuple: it pickles small, compares by value, and a
channel's loop dispatches on its type. None carries page bytes: a channel reads
the source itself, so the pipe sees one message per work item (up to 8 MiB of
pages), never one per page. `proc/messages.py` adds the two both sides share:
`Quit` (main → channel) and `ChannelError` (channel → main).

The order on one channel's pipe, per epoch::

    main → channel: [Forget] (Work | TreeWork)*  ...  Flush  [SendBlob*]  Sync
    channel → main: Done*  ...  Flushed  [BlobSent*]  Synced

and, for a directory source, once at completion TreeDigest → TreeDigested.

(after one Ready when the channel has connected and opened the sources).
"""

from __future__ import annotations

from typing import NamedTuple, Union

from multifd_cli.send.tree.diff import ScanItem
from multifd_cli.wire import Counts


# -- main → channel ---------------------------------------------------------------------------
class Work(NamedTuple):
    """Scan pages [start, end) of `block` for epoch `epoch` and send what changed.

    `size` is the block's size this epoch; `full` sends every page whatever its
    hash; `seeded` compares against the old copy's hashes (--resume, pass 1).
    """

    item: int
    epoch: int
    block: int
    start: int
    end: int
    size: int
    full: bool
    seeded: bool


class TreeWork(NamedTuple):
    """Read these files of the directory source for epoch `epoch` and send the pages
    that changed. Every file id is this channel's (id modulo the channel count), so
    the channel alone keeps its page table; `block` is the tree's block id."""

    item: int
    epoch: int
    block: int
    files: tuple[ScanItem, ...]


class Forget(NamedTuple):
    """These file ids left the tree: drop their page tables."""

    fids: tuple[int, ...]


class TreeDigest(NamedTuple):
    """At completion: the digest of this channel's files' page tables, over the
    (file id, size) of its files in the final walk, in file id order."""

    files: tuple[tuple[int, int], ...]


class Flush(NamedTuple):
    """Push out what the paged client still holds (its partial batch); no SYNC yet."""


class SendBlob(NamedTuple):
    """Send chunks [first, end) of the blob produced at `path` whole, in `epoch`."""

    epoch: int
    block: int
    path: str
    first: int
    end: int
    size: int


class Sync(NamedTuple):
    """Close this channel's epoch with its SYNC packet (sent even if it had no work)."""

    epoch: int


ToChannel = Union[Work, TreeWork, Forget, TreeDigest, Flush, SendBlob, Sync]


# -- channel → main ---------------------------------------------------------------------------
class Ready(NamedTuple):
    """Connected (or opened the image) and opened every source: work may come."""


class Done(NamedTuple):
    """One Work item finished: what the scan found and what went on the wire for it."""

    item: int
    dirty_pages: int
    zero_pages: int
    read_bytes: int
    wire_bytes: int
    seconds: float
    short_read: bool
    # Tree files no longer at their path when the channel opened them: (dev, ino) of
    # each, so the next pass reads them wherever they are (a directory may have moved
    # them, leaving their own size, mtime and ctime as they were).
    unread: tuple[tuple[int, int], ...] = ()


class BlobSent(NamedTuple):
    """One SendBlob finished."""

    block: int
    first: int
    end: int


class TreeDigested(NamedTuple):
    """The answer to TreeDigest."""

    digest: bytes


class Flushed(NamedTuple):
    """The Flush is done; the channel's totals so far."""

    wire_bytes: int
    payload_bytes: int


class Synced(NamedTuple):
    """The SYNC packet of `epoch` is out; what the epoch held and the totals so far."""

    epoch: int
    counts: Counts
    wire_bytes: int
    payload_bytes: int


FromChannel = Union[Ready, Done, BlobSent, TreeDigested, Flushed, Synced]
