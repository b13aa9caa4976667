"""Convergence maths: pure functions of the samples fed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multifd_cli.send.convergence import Estimator, PassSample, StallWatch

MiB = 1 << 20


def sample(n: int, started: float, duration: float, dirty: int, wire: int, scanned: int,
           sync: float = 0.005) -> PassSample:
    return PassSample(n, started, duration, dirty, wire, scanned, sync)


def test_nothing_is_expected_before_two_passes_with_the_hash_tracker() -> None:
    est = Estimator(channels=2)
    assert est.expected_downtime(256 * MiB) == math.inf
    est.end_pass(sample(1, 0.0, 0.5, 256 * MiB, 257 * MiB, 256 * MiB))
    # Pass 1 sent everything; it says nothing yet about the writer.
    assert est.expected_downtime(256 * MiB) == math.inf


def test_bandwidth_comes_from_a_pass_that_sent_a_lot() -> None:
    est = Estimator(channels=2)
    est.end_pass(sample(1, 0.0, 0.5, 256 * MiB, 256 * MiB, 256 * MiB))
    assert est.bandwidth == pytest.approx(512 * MiB)


def test_bandwidth_is_capped_by_max_bandwidth() -> None:
    est = Estimator(channels=2, bandwidth_cap=50e6)
    est.end_pass(sample(1, 0.0, 0.5, 256 * MiB, 256 * MiB, 256 * MiB))
    assert est.bandwidth == 50e6
    assert Estimator(bandwidth_cap=10e6).bandwidth == 10e6


def test_expected_downtime_adds_scan_send_and_sync() -> None:
    est = Estimator(channels=2)
    est.end_pass(sample(1, 0.0, 1.0, 1024 * MiB, 1024 * MiB, 1024 * MiB, sync=0.01))
    # Pass 2 found 8 MiB dirty and sent them; it scanned 1 GiB in 0.3 s.
    est.end_pass(sample(2, 1.0, 0.3, 8 * MiB, 8 * MiB, 1024 * MiB, sync=0.01))
    bw = est.bandwidth
    assert bw == pytest.approx(0.9 * 1024 * MiB)  # pass 1's rate, a pass old
    # Pass 1 was all sending and says nothing about scanning; pass 2 was a scan.
    assert est.scan_rate == pytest.approx(1024 * MiB / 0.3)
    want = 1024 * MiB / est.scan_rate + 8 * MiB / bw + 2 * 0.01
    assert est.expected_downtime(1024 * MiB) == pytest.approx(want)
    assert est.remaining == 8 * MiB


def test_the_api_tracker_scans_for_free_and_knows_what_is_pending() -> None:
    est = Estimator(channels=2, scan_is_free=True)
    est.end_pass(sample(1, 0.0, 1.0, 1024 * MiB, 1024 * MiB, 1024 * MiB))
    est.pending_bytes = 2 * MiB
    assert est.scan_seconds(1 << 40) == 0.0
    assert est.remaining == 2 * MiB
    assert est.expected_downtime(1 << 40) == pytest.approx(2 * MiB / (1024 * MiB) + 2 * 0.005)


def test_dirty_rate_uses_the_interval_between_pass_ends() -> None:
    est = Estimator()
    est.end_pass(sample(1, 0.0, 1.0, 100 * MiB, 100 * MiB, 100 * MiB))
    est.end_pass(sample(2, 1.5, 0.5, 20 * MiB, 20 * MiB, 100 * MiB))
    # Pages found in pass 2 were dirtied between the end of pass 1 (t=1.0) and pass 2 (t=2.0).
    assert est.dirty_rate == pytest.approx(20 * MiB / 1.0)


def test_converging_detects_a_writer_that_outruns_the_link() -> None:
    est = Estimator()
    est.end_pass(sample(1, 0.0, 1.0, 100 * MiB, 100 * MiB, 100 * MiB))  # link: 100 MiB/s
    est.end_pass(sample(2, 1.0, 1.0, 30 * MiB, 30 * MiB, 100 * MiB))
    est.end_pass(sample(3, 2.0, 1.0, 60 * MiB, 60 * MiB, 100 * MiB))
    assert est.converging()  # one heavy interval is not a trend
    est.end_pass(sample(4, 3.0, 1.0, 70 * MiB, 70 * MiB, 100 * MiB))
    assert not est.converging()  # two in a row: over half the link each time
    est.end_pass(sample(5, 4.0, 1.0, 20 * MiB, 20 * MiB, 100 * MiB))
    assert est.converging()


def test_on_sent_measures_a_window_of_sending() -> None:
    est = Estimator()
    for i in range(11):
        est.on_sent(i * 0.05, 8 * MiB)  # 8 MiB every 50 ms = 160 MiB/s
    assert est.bandwidth == pytest.approx(160 * MiB)


def test_a_scan_bound_pass_does_not_pull_the_link_down_to_the_writer() -> None:
    # Pass 1 sends at 200 MiB/s. Then hash passes send only what a 30 MiB/s writer
    # dirtied, a report every 50 ms: the link is as fast as before, give or take the
    # tenth per pass that lets a slower link be followed.
    est = Estimator()
    t = 0.0
    for _ in range(40):
        t += 0.05
        est.on_sent(t, 10 * MiB)
    est.end_pass(PassSample(1, 0.0, t, 400 * MiB, 400 * MiB, 400 * MiB, 0.01))
    for n in range(2, 5):
        start = t
        for _ in range(20):
            t += 0.05
            est.on_sent(t, int(1.5 * MiB))
        est.end_pass(PassSample(n, start, t - start, 30 * MiB, 30 * MiB, 4096 * MiB, 0.01))
    assert 0.9**3 * 200 * MiB * 0.99 <= est.bandwidth <= 200 * MiB * 1.01


# -- the stall rule: passes that stop improving the expected downtime are wasted -------------


def test_stall_needs_three_passes_without_a_ten_percent_gain() -> None:
    w = StallWatch()
    assert not w.observe(math.inf)  # no estimate yet: nothing to judge
    assert not w.observe(1.00)
    assert not w.observe(0.95)  # 5 % better than the best: not enough
    assert not w.observe(0.92)
    assert w.observe(0.91)  # third pass in a row under 10 %


def test_a_real_gain_resets_the_stall_count() -> None:
    w = StallWatch()
    for x in (1.0, 0.99, 0.98):
        assert not w.observe(x)
    assert not w.observe(0.85)  # 15 % better than 1.0: progress, count starts again
    assert not w.observe(0.84)
    assert not w.observe(0.90)  # worse than the best counts as flat too
    assert w.observe(0.80)  # 0.80 is not 10 % under 0.85


def test_a_slow_creep_is_judged_against_the_lowest_estimate() -> None:
    # CI saw 1608, 1494, 1492, 1444, ...: 1444 is 10 % under 1608 but not under 1492,
    # so it is no gain, and the third pass without one ends the passes.
    w = StallWatch()
    assert not w.observe(1608.7)
    assert not w.observe(1493.8)
    assert not w.observe(1492.0)
    assert w.observe(1444.2)


@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=40))
def test_a_steady_ten_percent_gain_never_stalls(xs: list[float]) -> None:
    w = StallWatch()
    x = 100.0
    for _ in xs:
        assert not w.observe(x)
        x *= 0.85


def test_bound_names_the_biggest_part_of_the_downtime() -> None:
    est = Estimator(channels=2)
    # A slow scan: 4 GiB scanned in 2 s, little sent.
    est.end_pass(sample(1, 0.0, 2.0, 64 * MiB, 64 * MiB, 4096 * MiB))
    est.end_pass(sample(2, 2.5, 2.0, 1 * MiB, 1 * MiB, 4096 * MiB))
    assert "the hash tracker reads all of the source" in est.bound(4096 * MiB)
    # A writer that outruns the link: the send part dominates.
    est2 = Estimator(channels=2, scan_is_free=True, bandwidth_cap=10 * MiB)
    est2.pending_bytes = 50 * MiB
    est2.end_pass(sample(1, 0.0, 1.0, 64 * MiB, 64 * MiB, 0))
    assert "MiB/s of bandwidth" in est2.bound(64 * MiB)


def test_kernel_tracker_pays_its_pass_start_and_its_window_not_the_size() -> None:
    est = Estimator(channels=2)
    est.end_pass(sample(1, 0.0, 2.0, 64 * MiB, 64 * MiB, 4096 * MiB))
    est.end_pass(sample(2, 2.5, 2.0, 1 * MiB, 1 * MiB, 4096 * MiB))
    hashed = est.scan_seconds(4096 * MiB)
    assert hashed == pytest.approx(2.0)  # the measured rate: 4 GiB in 2 s
    est.tracker_cost, est.scan_bytes = 0.030, 8 * MiB
    assert est.scan_seconds(4096 * MiB) == pytest.approx(0.030 + 8 / 4096 * 2.0)
    assert est.scan_seconds(8192 * MiB) == est.scan_seconds(1024 * MiB)  # flat in size
    assert "kernel tracker" in est.bound(4096 * MiB) or "bandwidth" in est.bound(4096 * MiB)
