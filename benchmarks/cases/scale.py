"""scale: a live migration as the source grows, kernel tracker against hash tracker.

Issue 13's case: a writer at 32 MiB/s in a 64 MiB hot set, DEST on disk, sizes 1, 4
and 8 GiB (16 GiB where the disk has room), `--downtime-limit 300`. For each size the
kernel tracker, the hash tracker and one static copy of the same file run
interleaved (their order rotates each round). The table gives passes, wall time,
downtime, and the expected downtime the switchover was decided on beside the real one.

SCALE_SIZES (e.g. `1G,4G`) overrides the sizes; --quick takes 256M and 1G.
"""

from __future__ import annotations

import os
import shutil
import sys

from harness import WRITER, BenchError, GiB, MiB, Sample
from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate
from harness.stats import human_size, med, parse_size, ratio, secs, spread

RATE, HOT, LIMIT = "32M", "64M", 300
DOWNTIME_GOAL_MS = 150.0  # kernel tracker, every size
FLAT_GOAL = 1.3  # kernel tracker: downtime at the largest size / at the smallest
TOTAL_GOAL = 1.5  # kernel tracker: live wall / one static copy


def sizes_for(ctx: Ctx) -> list[int]:
    spec = os.environ.get("SCALE_SIZES", "")
    if spec:
        return [parse_size(x) for x in spec.split(",") if x.strip()]
    if ctx.quick:
        return [256 * MiB, GiB]
    sizes = [GiB, 4 * GiB, 8 * GiB]
    # Two copies (source and DEST) plus the harness's own original, with room to spare.
    if shutil.disk_usage(ctx.disk).free > 3 * 16 * GiB + 8 * GiB:
        sizes.append(16 * GiB)
    return sizes


def _expected(xs: list[Sample]) -> list[float]:
    return [float(x["expected_downtime_ms"]) for x in xs if x.get("expected_downtime_ms") is not None]


def _fallbacks(xs: list[Sample]) -> int:
    return sum(1 for x in xs for p in x["pass_events"] if p.get("tracker_fallback"))


def _later_read_mib(xs: list[Sample]) -> list[float]:
    """Per run: MiB read by each pass after the first, on median."""
    out = []
    for x in xs:
        later = [p["read_bytes"] for p in x["pass_events"][1:] if p.get("read_bytes") is not None]
        if later:
            out.append(med(later) / MiB)
    return out


def run_size(ctx: Ctx, name: str, size: int) -> dict[str, list[Sample]]:
    """Kernel tracker, hash tracker and a static copy of one size, interleaved."""
    src = ctx.data.copy_disk(name, size)
    dst = ctx.disk / f"{name}.multifd"
    writer = [sys.executable, str(WRITER), str(src), "--rate", RATE, "--hot-set", HOT]

    def live(tracker: str) -> Sample:
        s = multifd_migrate(src, dst, disk=True, writer=writer,
                            extra=["--tracker", tracker], timeout=1800)
        if not s["paused"]:
            raise BenchError("send completed without pausing the writer")
        if any(p.get("tracker") != tracker for p in s["pass_events"]):
            raise BenchError(f"--tracker {tracker} not used: {s['pass_events'][:2]}")
        return s

    runs = interleave({
        "kernel": lambda: live("kernel"),
        "hash": lambda: live("hash"),
        "static": lambda: multifd_migrate(src, dst, disk=True, timeout=1800),
    }, ctx.pairs, ctx.log)
    unlink(dst)
    return runs


def case_scale(ctx: Ctx, res: CaseResult) -> None:
    sizes = sizes_for(ctx)
    res.title = (f"scale: {', '.join(human_size(s) for s in sizes)} on disk, writer {RATE}/s "
                 f"in a {HOT} hot set, --pause-pid, --downtime-limit {LIMIT}: kernel vs hash "
                 "tracker")
    res.setup = ("Per size: recv listening, examples/writer.py started and warmed up 0.5 s, "
                 "then send (2 channels) with --pause-pid and --tracker kernel or --tracker hash; "
                 "plus one static copy (no writer, --tracker kernel, one pass) of the same file. "
                 "The three are interleaved, their order rotating each round. `sync` before "
                 "every run. expected = the completed event's expected_downtime_ms, the estimate "
                 "the switchover was decided on.")
    rows, summary_rows, raw = [], [], {}
    downs: dict[int, list[float]] = {}
    for size in sizes:
        name = f"scale-{human_size(size)}"
        runs = run_size(ctx, name, size)
        raw[name] = runs
        st = runs["static"]
        for variant in ("kernel", "hash"):
            xs = runs[variant]
            down = secs(xs, "downtime_ms")
            rt = ratio(secs(xs), secs(st))
            rows.append([human_size(size), variant, spread(secs(xs, "passes"), 0),
                         spread(secs(xs), 2), rt.text(), spread(down, 0),
                         spread(_expected(xs), 0), f"{sum(d <= LIMIT for d in down)}/{len(down)}",
                         spread(_later_read_mib(xs), 1), _fallbacks(xs)])
        rows.append([human_size(size), "static copy", spread(secs(st, "passes"), 0),
                     spread(secs(st), 2), "1", "-", "-", "-", "-", "-"])
        downs[size] = secs(runs["kernel"], "downtime_ms")
        kd = med(downs[size])
        kt = ratio(secs(runs["kernel"]), secs(st))
        summary_rows += [
            [f"{human_size(size)} kernel downtime_ms", spread(downs[size], 0),
             f"≤ {DOWNTIME_GOAL_MS:g}", verdict(kd <= DOWNTIME_GOAL_MS)],
            [f"{human_size(size)} kernel live / static copy, wall", kt.text(),
             f"≤ {TOTAL_GOAL:g}", verdict(kt.median <= TOTAL_GOAL)],
            [f"{human_size(size)} hash: limit kept", f"{sum(d <= LIMIT for d in secs(runs['hash'], 'downtime_ms'))}"
             f"/{len(runs['hash'])}", "≥ 9 of 10 where it can be kept", "context"],
        ]
    res.tables.append(md_table(
        ["size", "tracker", "passes", "wall s", "wall / static", "downtime_ms",
         "expected ms", f"≤ {LIMIT} ms", "MiB read per later pass", "fallback passes"], rows))
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        flat = med(downs[hi]) / med(downs[lo]) if med(downs[lo]) > 0 else float("nan")
        summary_rows.append([f"kernel downtime {human_size(hi)} / {human_size(lo)}",
                             f"{flat:.2f}", f"≤ {FLAT_GOAL:g}", verdict(flat <= FLAT_GOAL)])
    res.summary += summary_rows
    res.raw = raw
