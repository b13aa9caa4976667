"""The epoch barrier: the receiver's core rule, with no I/O.

A page may be sent again in every pass, each time on whichever channel is
free. If channel 0 still applied pass 1 while channel 1 already applied pass
2, an older copy of a page could land after a newer one. So every channel
holds at its SYNC for epoch k, and none is released into epoch k+1 before
every channel has synced epoch k and the source's EPOCH_END k has arrived:
then epoch k is closed, and its counts must add up to what EPOCH_END says.

The barrier is fed the events recv's main process sees (EPOCH_START,
EPOCH_END, a channel's Synced) and answers with decisions (which channels
to release now, which epoch just closed). Main does the I/O around it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from multifd_cli.errors import ProtocolError, expect
from multifd_cli.wire import Counts


class Released(NamedTuple):
    """Channel `channel` may now apply epoch `epoch`, whose block sizes are `sizes`."""

    channel: int
    epoch: int
    sizes: tuple[int, ...]


class Closed(NamedTuple):
    """Every channel synced `epoch` and EPOCH_END agreed: `counts` are its totals."""

    epoch: int
    counts: Counts


class EpochBarrier:
    """Who may go on into which epoch, and when an epoch is closed.

    Epochs are numbered from 1; epoch 0 stands for "before the first".
    """

    def __init__(self, channels: int, blocks: int) -> None:
        self.channels = channels
        self.blocks = blocks  # every EPOCH_START must give one size per block
        self.started = 0  # the last epoch EPOCH_START opened
        self.closed = 0  # the last epoch closed; all before it are closed too
        self._sizes: dict[int, tuple[int, ...]] = {}
        self._ends: dict[int, Counts] = {}  # EPOCH_END's counts, for epochs not yet closed
        self._synced: dict[int, dict[int, Counts]] = {}
        self._at = [0] * channels  # the last epoch each channel was released into
        self._holding = [True] * channels  # held at a SYNC (or not yet started)

    # -- inputs ------------------------------------------------------------------------------
    def epoch_start(self, epoch: int, sizes: Sequence[int]) -> None:
        """EPOCH_START: the source begins `epoch` with these block sizes."""
        expect("epoch", epoch, self.started + 1)
        expect("block count", len(sizes), self.blocks)
        self.started = epoch
        self._sizes[epoch] = tuple(sizes)
        self._synced[epoch] = {}

    def epoch_end(self, epoch: int, counts: Counts) -> None:
        """EPOCH_END: the source sent all of `epoch`, `counts` over all channels."""
        if not 1 <= epoch <= self.started:
            raise ProtocolError(f"EPOCH_END for epoch {epoch} that never started")
        if epoch > self.closed:  # a repeat for a closed epoch changes nothing
            self._ends[epoch] = counts

    def synced(self, channel: int, epoch: int, counts: Counts) -> None:
        """A channel applied all of `epoch` up to its SYNC and now holds."""
        expect(f"channel {channel} sync epoch", epoch, self._at[channel])
        if self._holding[channel]:
            raise ProtocolError(f"channel {channel} synced epoch {epoch} twice")
        self._holding[channel] = True
        self._synced[epoch][channel] = counts

    # -- outputs -----------------------------------------------------------------------------
    def releases(self) -> list[Released]:
        """The channels that may go on now; each is counted as running from here."""
        out: list[Released] = []
        for c in range(self.channels):
            k = self._at[c] + 1
            if not self._holding[c] or k > self.started or not self._may_open(k):
                continue
            self._at[c] = k
            self._holding[c] = False
            out.append(Released(c, k, self._sizes[k]))
        return out

    def close_next(self) -> Closed | None:
        """Close the next epoch if every channel synced it and EPOCH_END arrived.

        Call it until it returns None: one batch of events may close several.
        """
        k = self.closed + 1
        if k > self.started or k not in self._ends or len(self._synced[k]) < self.channels:
            return None
        total = sum(self._synced[k].values(), Counts())
        expect(f"epoch {k} totals", total, self._ends[k])
        self.closed = k
        del self._ends[k], self._synced[k]
        # A channel may still need the sizes of a later epoch, never of this one.
        self._sizes.pop(k, None)
        return Closed(k, total)

    def settled(self, epoch: int) -> bool:
        """True once `epoch` is the last one started and it is closed: the copy
        the source's DIGEST for `epoch` describes is all applied."""
        return epoch == self.closed == self.started

    @property
    def furthest(self) -> int:
        """The furthest epoch any channel was released into (for progress)."""
        return max(self._at, default=0)

    # -- the rule ------------------------------------------------------------------------------
    def _may_open(self, epoch: int) -> bool:
        return self.closed >= epoch - 1


class NoBarrier(EpochBarrier):
    """Test only (MULTIFD_TEST_NO_BARRIER=1): each channel goes on into the next
    epoch as soon as it alone synced, which lets a stale page land after a newer
    one. The tests use it to show that verification then catches the damage."""

    def _may_open(self, epoch: int) -> bool:
        return True


def barrier_for(channels: int, blocks: int, *, enabled: bool = True) -> EpochBarrier:
    """The barrier recv runs with; `enabled=False` only under the test switch."""
    return (EpochBarrier if enabled else NoBarrier)(channels, blocks)
