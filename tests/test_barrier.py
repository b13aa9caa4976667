"""The epoch barrier on its own: every interleaving of the events main sees.

A hypothesis state machine plays the source (EPOCH_START, EPOCH_END) and the
channels (Synced) in any order the network allows, and steps the barrier the
way recv's main loop does. A model of what has happened checks the decisions:
no channel goes into epoch k+1 before every channel synced epoch k and
EPOCH_END k arrived; every epoch closes exactly once, in order, with the
counts EPOCH_END gave; and wrong counts or an out-of-order event are refused
with a ProtocolError that says "got X, expected Y".
"""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from multifd_cli.errors import ProtocolError
from multifd_cli.recv.barrier import Closed, EpochBarrier, NoBarrier, Released, barrier_for
from multifd_cli.wire import Counts

MAX_EPOCHS = 5
counts_st = st.builds(Counts, st.integers(0, 9), st.integers(0, 99), st.integers(0, 99))


class BarrierMachine(RuleBasedStateMachine):
    """The strict barrier; NoBarrierMachine below relaxes only the release rule."""

    strict = True

    @initialize(channels=st.integers(1, 4), blocks=st.integers(1, 3))
    def setup(self, channels: int, blocks: int) -> None:
        self.n = channels
        self.blocks = blocks
        self.barrier = barrier_for(channels, blocks, enabled=self.strict)
        self.sizes: dict[int, tuple[int, ...]] = {}
        self.plan: dict[int, list[Counts]] = {}  # what each channel applies in each epoch
        self.ended: set[int] = set()
        self.synced: dict[int, set[int]] = {}
        self.at = [0] * channels  # the last epoch each channel was released into
        self.running = [False] * channels
        self.closed: list[int] = []

    # -- the source -------------------------------------------------------------------------
    @precondition(lambda self: len(self.sizes) < MAX_EPOCHS)
    @rule(data=st.data())
    def epoch_start(self, data: st.DataObject) -> None:
        k = len(self.sizes) + 1
        sizes = tuple(data.draw(st.lists(st.integers(0, 1 << 40), min_size=self.blocks,
                                         max_size=self.blocks)))
        self.plan[k] = data.draw(st.lists(counts_st, min_size=self.n, max_size=self.n))
        self.barrier.epoch_start(k, sizes)
        self.sizes[k] = sizes
        self.synced[k] = set()

    @precondition(lambda self: set(self.sizes) - self.ended)
    @rule(data=st.data())
    def epoch_end(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(set(self.sizes) - self.ended)))
        self.barrier.epoch_end(k, sum(self.plan[k], Counts()))
        self.ended.add(k)

    # -- the channels -----------------------------------------------------------------------
    @precondition(lambda self: any(self.running))
    @rule(data=st.data())
    def channel_synced(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from([c for c in range(self.n) if self.running[c]]))
        k = self.at[c]
        self.barrier.synced(c, k, self.plan[k][c])
        self.running[c] = False
        self.synced[k].add(c)

    # -- main's loop: release, then close while it can ----------------------------------------
    @rule()
    def step(self) -> None:
        while True:
            for r in self.barrier.releases():
                self._check_release(r)
            done = self.barrier.close_next()
            if done is None:
                break
            self._check_close(done)
        # Nothing that may go on is left holding, nothing that may close stays open.
        k = len(self.closed) + 1
        assert not (k in self.ended and len(self.synced.get(k, ())) == self.n)
        for c in range(self.n):
            nxt = self.at[c] + 1
            ready = nxt in self.sizes and (not self.strict or len(self.closed) >= nxt - 1)
            assert self.running[c] or not ready, f"channel {c} left holding before {nxt}"

    def _check_release(self, r: Released) -> None:
        c, k = r.channel, r.epoch
        assert not self.running[c], f"channel {c} released while running"
        assert k == self.at[c] + 1, f"channel {c} released into {k} from {self.at[c]}"
        assert r.sizes == self.sizes[k]
        if self.strict and k > 1:
            assert self.synced[k - 1] == set(range(self.n)), f"epoch {k - 1} not all synced"
            assert k - 1 in self.ended, f"released into {k} before EPOCH_END {k - 1}"
        self.at[c] = k
        self.running[c] = True

    def _check_close(self, done: Closed) -> None:
        k = done.epoch
        assert k not in self.closed, f"epoch {k} closed twice"
        assert k == len(self.closed) + 1, f"epoch {k} closed out of order"
        assert self.synced[k] == set(range(self.n)) and k in self.ended
        assert done.counts == sum(self.plan[k], Counts())
        self.closed.append(k)

    # -- what must be refused (each on a copy, so the run goes on) ----------------------------
    @precondition(lambda self: len(self.closed) < len(self.sizes))
    @rule(bump=st.sampled_from(["packets", "normal", "zero"]))
    def wrong_totals_are_refused(self, bump: str) -> None:
        k = len(self.closed) + 1
        b = copy.deepcopy(self.barrier)
        want = sum(self.plan[k], Counts())
        bad = want._replace(**{bump: getattr(want, bump) + 1})
        b.epoch_end(k, bad)
        if self.synced[k] == set(range(self.n)):
            with pytest.raises(ProtocolError, match=re.escape(f"epoch {k} totals: got {want!r}, "
                                                              f"expected {bad!r}")):
                b.close_next()
        else:
            assert b.close_next() is None

    @rule(data=st.data())
    def events_out_of_order_are_refused(self, data: st.DataObject) -> None:
        b = copy.deepcopy(self.barrier)
        started = len(self.sizes)
        what = data.draw(st.sampled_from(["start", "blocks", "end", "sync"]))
        if what == "start":
            k = data.draw(st.integers(0, MAX_EPOCHS + 2).filter(lambda k: k != started + 1))
            with pytest.raises(ProtocolError, match=f"epoch: got {k}, expected {started + 1}"):
                b.epoch_start(k, (0,) * self.blocks)
        elif what == "blocks":
            with pytest.raises(ProtocolError, match=f"block count: got {self.blocks + 1}, "):
                b.epoch_start(started + 1, (0,) * (self.blocks + 1))
        elif what == "end":
            k = data.draw(st.sampled_from([0, started + 1, started + 7]))
            with pytest.raises(ProtocolError, match=f"EPOCH_END for epoch {k} that never started"):
                b.epoch_end(k, Counts())
        else:
            c = data.draw(st.integers(0, self.n - 1))
            if self.running[c]:
                k = data.draw(st.integers(0, MAX_EPOCHS).filter(lambda k: k != self.at[c]))
                with pytest.raises(ProtocolError, match=f"sync epoch: got {k}, expected "
                                                        f"{self.at[c]}"):
                    b.synced(c, k, Counts())
            else:
                with pytest.raises(ProtocolError, match="twice"):
                    b.synced(c, self.at[c], Counts())

    @invariant()
    def counters_agree(self) -> None:
        if not hasattr(self, "barrier"):
            return
        assert self.barrier.closed == len(self.closed)
        assert self.barrier.started == len(self.sizes)
        assert self.barrier.furthest == max(self.at, default=0)
        last = len(self.sizes)
        assert self.barrier.settled(last) == (len(self.closed) == last)


class NoBarrierMachine(BarrierMachine):
    """The test-only switch: channels go on at once, closing is unchanged."""

    strict = False


SETTINGS = settings(max_examples=300, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestBarrier = BarrierMachine.TestCase
TestBarrier.settings = SETTINGS
TestNoBarrier = NoBarrierMachine.TestCase
TestNoBarrier.settings = SETTINGS


def test_without_the_barrier_a_channel_runs_ahead() -> None:
    """The negative control's mechanism: channel 1 enters epoch 2 while channel 0
    still applies epoch 1, which the strict barrier never allows."""
    for cls, ahead in ((EpochBarrier, False), (NoBarrier, True)):
        b = cls(2, 1)
        b.epoch_start(1, (10,))
        assert [r.channel for r in b.releases()] == [0, 1]
        b.epoch_start(2, (10,))
        b.synced(1, 1, Counts(1, 1, 0))
        b.epoch_end(1, Counts(2, 2, 0))
        assert (b.releases() == [Released(1, 2, (10,))]) is ahead
        assert b.close_next() is None  # channel 0 has not synced: epoch 1 stays open
        b.synced(0, 1, Counts(1, 1, 0))
        assert b.close_next() == Closed(1, Counts(2, 2, 0))
        assert b.close_next() is None


def test_the_switch_picks_the_variant() -> None:
    assert type(barrier_for(1, 1)) is EpochBarrier
    assert type(barrier_for(1, 1, enabled=False)) is NoBarrier
