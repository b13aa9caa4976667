"""What recv's main process and its channel processes say to each other.

These are the only messages on the pipes of the receive side (the network recv
and the `file:` restore), besides the two every side shares from
proc/messages.py: `Quit` (main → channel) and `ChannelError` (channel → main).
Each message names a stretch of work or reports one; none carries page bytes,
so a message is pickled once per epoch or per range, never per page.

A channel's loop dispatches on the type, as main does on a report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Union

from multifd_cli.wire import Counts

if TYPE_CHECKING:
    pass

# -- main → channel -------------------------------------------------------------------------


class Release(NamedTuple):
    """Apply packets until this channel's SYNC for `epoch`.

    Sent once per epoch: a channel holds at every SYNC until released, which is
    what makes the epoch barrier. `sizes` are the block sizes of that epoch.
    """

    epoch: int
    sizes: tuple[int, ...]


class HashRange(NamedTuple):
    """--resume: hash pages [start, end) of `block` as DEST holds them now.

    `size` is the block's size, so the short last page hashes as what is there.
    """

    block: int
    start: int
    end: int
    size: int


class RestoreRange(NamedTuple):
    """`file:` restore: copy the image's pages [start, end) of `block` to DEST."""

    block: int
    start: int
    end: int


class TreeDigest(NamedTuple):
    """A tree session is complete: digest this channel's files' page tables
    (FileTables.digest, with each file's size as the id directory holds it now)."""


# -- channel → main -------------------------------------------------------------------------


class Progress(NamedTuple):
    """Byte counters so far, sent at most every quarter second while applying."""

    wire_bytes: int
    written_bytes: int


class Synced(NamedTuple):
    """The channel applied all of `epoch` up to its SYNC and is holding.

    `counts` are what it applied in that epoch (checked against its SYNC);
    the byte counters are its totals since the start.
    """

    epoch: int
    counts: Counts
    wire_bytes: int
    written_bytes: int


class Hashed(NamedTuple):
    """The pages of a HashRange are hashed into the shared table."""

    block: int
    start: int
    end: int


class Restored(NamedTuple):
    """A RestoreRange is written: `normal` pages held data, the rest were zero."""

    block: int
    start: int
    end: int
    written_bytes: int
    normal: int


class TreeDigested(NamedTuple):
    """The answer to TreeDigest."""

    digest: bytes


#: What a receive channel may report to main (ChannelError aside).
Report = Union[Progress, Synced, Hashed, TreeDigested]
