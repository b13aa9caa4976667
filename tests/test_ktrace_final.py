"""The kernel tracker's final pass start: narrow only where narrowing pays.

Narrowing a large folio's extent means writing the window's dirty pages back and
reading which blocks went out. Under the pause that writeback is downtime, and for
a writer that dirties most of what its folios span it saves almost no reading.
These tests drive a real tracefs instance (see test_kernel_tracker for the fixture)
and check both choices and, above all, that the final window still covers every
write either way.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from test_kernel_tracker import PAGE, covered, kdir, make_source

from multifd_cli.send.ktrace import KernelTracker, PassWindow
from multifd_cli.send.ktrace.bio import Bio
from multifd_cli.send.ktrace.inflight import Inflight
from multifd_cli.send.ktrace.tracker import NARROW_PAYS_BELOW, overlap_bytes

__all__ = ["kdir"]  # the fixture, imported for pytest


def _spans(xs: list[int]) -> list[tuple[int, int]]:
    """Sorted disjoint ranges from a list of cut points."""
    cuts = sorted(set(xs))
    return [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]


@given(st.lists(st.integers(0, 500)), st.lists(st.integers(0, 500)))
def test_overlap_bytes_matches_counting_each_byte(xs: list[int], ys: list[int]) -> None:
    a, b = _spans(xs), _spans(ys)
    in_a = {i for s, e in a for i in range(s, e)}
    in_b = {i for s, e in b for i in range(s, e)}
    assert overlap_bytes(a, b) == len(in_a & in_b)


def _dirty(fd: int, offsets: list[int], rng: random.Random) -> None:
    for off in offsets:
        os.pwrite(fd, rng.randbytes(PAGE), off)


def _final_pass(src: Path, first: list[int], again: list[int],
                seed: int) -> tuple[float, bool | None, PassWindow]:
    """Dirty FIRST, close a window, dirty AGAIN, close the final one: what narrowing
    kept of the first window, what the final pass start chose, and its window, which
    must cover every write of AGAIN whatever it chose."""
    rng = random.Random(seed)
    fd = os.open(src, os.O_RDWR)
    try:
        with KernelTracker([str(src)]) as t:
            assert t.begin_pass().full
            _dirty(fd, first, rng)
            w = t.begin_pass()
            assert not w.full, w.reason
            assert t.narrow_kept is not None
            _dirty(fd, again, rng)
            final = t.begin_pass(final=True)
            assert not final.full, final.reason
            for off in again:
                assert covered(final, src, off), (off, final.ranges)
            return t.narrow_kept, t.final_narrowed, final
    finally:
        os.close(fd)


def test_dense_writer_final_pass_skips_the_writeback_and_still_covers_every_write(
        kdir: Path) -> None:
    dense = [i * PAGE for i in range((4 << 20) // PAGE)]  # every page of 4 MiB
    again = random.Random(3).sample(dense, 300)
    kept, narrowed, _ = _final_pass(make_source(kdir / "src", 16 << 20), dense, again, 3)
    assert kept >= NARROW_PAYS_BELOW and narrowed is False, kept


def test_sparse_writer_final_pass_still_narrows(kdir: Path) -> None:
    rng = random.Random(4)
    # One page in each 2 MiB: a largest folio per write, almost none of it dirty.
    sparse = [(i << 21) + rng.randrange(512) * PAGE for i in range(32)]
    again = sparse[::3]
    kept, narrowed, final = _final_pass(make_source(kdir / "src", 64 << 20), sparse, again, 4)
    assert kept < NARROW_PAYS_BELOW and narrowed is True, kept
    # Narrowed: far less than a 2 MiB folio per write.
    assert final.dirty_bytes() <= len(again) * (256 << 10), final.ranges


# -- the in-flight bios: the same answers as a plain list, found by sector ------------------


def _bio(dev: int, sector: int, sectors: int, completion: bool) -> Bio:
    return Bio(0, dev, sector, sectors, completion, 1)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 300),
                          st.integers(0, 40)), max_size=200))
def test_inflight_matches_a_plain_list(ops: list[tuple[bool, int, int, int]]) -> None:
    cap = 16
    held, model = Inflight(cap), []
    for is_completion, dev, sector, sectors in ops:
        b = _bio(dev, sector, sectors, is_completion)
        if not is_completion:
            held.add(b)
            model.append(b)
            if len(model) > cap:
                del model[: len(model) - cap // 2]  # the newest half stays
            continue
        want = any(q.overlaps(b) for q in model)
        model = [q for q in model if not q.overlaps(b)]
        assert held.complete(b) == want
        assert len(held) == len(model)
