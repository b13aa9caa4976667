"""packets: how throughput depends on --packet-size on tmpfs.
"""

from __future__ import annotations

import functools

from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread


def case_packets(ctx: Ctx, res: CaseResult) -> None:
    """Throughput for --packet-size 128K ... 4M on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "packets.multifd"
    sizes = ["128K", "256K", "512K", "1M", "2M", "4M"]
    base = "512K"
    res.title = (f"packets: --packet-size, {human_size(ctx.size)} random, tmpfs to tmpfs, "
                 "2 channels, no compression")
    res.setup = ("MB/s = file size (1e6 B) / send wall time. Rounds of all six sizes with a "
                 f"rotating order; ratio = wall(size) / wall({base}, the default) per round.")
    runs = interleave({s: functools.partial(multifd_migrate, src, dst,
                                            extra=["--packet-size", s]) for s in sizes},
                      ctx.pairs, ctx.log)
    unlink(dst)
    mbs = {s: [ctx.size / 1e6 / x for x in secs(runs[s])] for s in sizes}
    rts = {s: ratio(secs(runs[s]), secs(runs[base])) for s in sizes}
    best = min(sizes, key=lambda s: rts[s].median if s != base else 1.0)
    rows = []
    for s in sizes:
        rows.append([s + (" **best**" if s == best else ""), spread(mbs[s], 0),
                     spread(secs(runs[s])), spread(secs(runs[s], "total_time_ms"), 0),
                     f"{rts[s].text()}, faster in {rts[s].below}/{len(rts[s].ratios)}"
                     if s != base else "1", rss_text(runs[s])])
    res.tables.append(md_table(
        ["packet size", "MB/s median (min–max)", "wall s median (min–max)",
         "JSON total_time_ms", f"wall / wall({base}), per round", "peak RSS MiB send / recv"],
        rows))
    rb = rts[best]
    n = len(rb.ratios)
    clear = rb.median < 0.95 and rb.below >= max(1, -(-4 * n // 5))  # ≥ 5 %, ≥ 80 % of rounds
    if best == base:
        note = f"{base} (the default) is the fastest"
    elif not clear:
        note = (f"no clear winner: {best} at {rb.median:.2f}× the time of {base}, faster in "
                f"{rb.below}/{n} rounds (a clear win needs < 0.95× in ≥ 80 % of rounds)")
    else:
        note = (f"**{best} is faster**: {rb.median:.2f}× the time of {base}, faster in "
                f"{rb.below}/{n} rounds")
    res.tables.append(f"Best (lowest median per-round wall / wall({base})): **{best}**. {note}.")
    res.summary.append(["best packet size", f"{best} ({med(mbs[best]):.0f} MB/s; {base}: "
                        f"{med(mbs[base]):.0f} MB/s)", f"{base} is the default", note])
    res.raw = {"runs": runs, "best": best}
