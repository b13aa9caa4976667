"""live-256M and live-1G: a file that a writer keeps changing; passes, downtime and
whether the downtime limit holds.
"""

from __future__ import annotations

import sys

from harness import WRITER, BenchError, MiB, Sample
from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread


def live_case(ctx: Ctx, res: CaseResult, size: int, rate: str, hot: str, limit: int,
              total_target: float | None) -> None:
    """A live migration with examples/writer.py vs a static multifd copy of the same file."""
    src = ctx.data.copy_disk(res.name, size)
    dst = ctx.disk / f"{res.name}.multifd"
    res.title = (f"{res.name}: {human_size(size)} on disk, writer {rate}/s of random 4 KiB pages "
                 f"in a {hot} hot set, --pause-pid, downtime limit {limit} ms")
    res.setup = ("Live: recv listening, writer started and warmed up 0.5 s, then send "
                 "(2 channels) with --pause-pid; the writer is continued and killed after each "
                 "run. Static: multifd copy of the same file at rest (untimed wait until its "
                 "mtime and ctime are 2.5 s old, so one pass), "
                 "interleaved. `sync` before every run. Ratio = live wall / static wall per pair.")
    writer = [sys.executable, str(WRITER), str(src), "--rate", rate, "--hot-set", hot]
    extra = [] if limit == 300 else ["--downtime-limit", str(limit)]

    def live() -> Sample:
        s = multifd_migrate(src, dst, disk=True, writer=writer, extra=extra)
        if not s["paused"]:
            raise BenchError("send completed without pausing the writer")
        return s

    runs = interleave({"live": live, "static": lambda: multifd_migrate(src, dst, disk=True)},
                      ctx.pairs, ctx.log)
    unlink(dst)
    lv, st = runs["live"], runs["static"]
    rt = ratio(secs(lv), secs(st))
    down = secs(lv, "downtime_ms")
    res.tables.append(md_table(
        ["variant", "wall s", "JSON total_time_ms", "downtime_ms", "passes", "MiB sent",
         "peak RSS MiB send / recv"],
        [[v, spread(secs(x)), spread(secs(x, "total_time_ms"), 0),
          spread(secs(x, "downtime_ms"), 0), spread(secs(x, "passes"), 0),
          spread(secs(x, "transferred_bytes"), 0, 1 / MiB), rss_text(x)]
         for v, x in (("live", lv), ("static copy", st))]))
    d_ok = med(down) <= limit
    rows = [["downtime_ms", spread(down, 0), f"≤ {limit}",
             verdict(d_ok, f"{sum(d <= limit for d in down)}/{len(down)} runs")]]
    t_ok = True
    if total_target is not None:
        t_ok = rt.median <= total_target
        rows.append(["live / static, wall", rt.text(), f"≤ {total_target:g}",
                     verdict(t_ok, f"{sum(r <= total_target for r in rt.ratios)}/"
                             f"{len(rt.ratios)} pairs")])
    else:
        rows.append(["live / static, wall", rt.text(), "-", "context"])
    res.tables.append("The static copy pauses nothing; its downtime_ms is send's figure as "
                      "reported (the final pass and completion).")
    res.tables.append(md_table(["metric", "median (min–max)", "target", "verdict"], rows))
    res.summary += [["downtime_ms", spread(down, 0), f"≤ {limit}", verdict(d_ok)],
                    ["live / static copy, wall", rt.text(),
                     f"≤ {total_target:g}" if total_target else "-",
                     verdict(t_ok) if total_target else "context"],
                    ["passes; MiB sent", f"{med(secs(lv, 'passes')):.0f}; "
                     f"{med(secs(lv, 'transferred_bytes')) / MiB:.0f}", "-", "context"]]
    res.raw = {"runs": runs, "ratio": rt.as_json()}


def case_live_256m(ctx: Ctx, res: CaseResult) -> None:
    """256 MiB, writer 32 MiB/s in a 64 MiB hot set, default downtime limit (300 ms)."""
    live_case(ctx, res, 256 * MiB, "32M", "64M", 300, None)


def case_live_1g(ctx: Ctx, res: CaseResult) -> None:
    """--size (1 GiB), writer 64 MiB/s in a 128 MiB hot set, --downtime-limit 500."""
    live_case(ctx, res, ctx.size, "64M", "128M", 500, 2.0)
