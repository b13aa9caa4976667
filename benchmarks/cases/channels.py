"""channels: how throughput scales with --channels on tmpfs.
"""

from __future__ import annotations

import functools
import os

from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread


def case_channels(ctx: Ctx, res: CaseResult) -> None:
    """Throughput for --channels 1, 2, 4, 8 on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "channels.multifd"
    counts = [1, 2, 4, 8]
    res.title = f"channels: {human_size(ctx.size)} random, tmpfs to tmpfs, no compression"
    res.setup = (f"MB/s = file size (1e6 B) / send wall time. {os.cpu_count()} CPUs. Rounds of "
                 "1, 2, 4, 8 channels with a rotating order; ratio = wall(N) / wall(2) per round.")
    runs = interleave({f"{c}": functools.partial(multifd_migrate, src, dst, channels=c)
                       for c in counts}, ctx.pairs, ctx.log)
    unlink(dst)
    mbs = {c: [ctx.size / 1e6 / x for x in secs(runs[f"{c}"])] for c in counts}
    # Best by the paired comparison with the default: the median per-round wall(N) / wall(2).
    rts = {c: ratio(secs(runs[f"{c}"]), secs(runs["2"])) for c in counts}
    best = min(counts, key=lambda c: rts[c].median if c != 2 else 1.0)
    rows = []
    for c in counts:
        rows.append([f"{c}" + (" **best**" if c == best else ""), spread(mbs[c], 0),
                     spread(secs(runs[f"{c}"])),
                     f"{rts[c].text()}, faster in {rts[c].below}/{len(rts[c].ratios)}"
                     if c != 2 else "1", rss_text(runs[f"{c}"])])
    res.tables.append(md_table(
        ["channels", "MB/s median (min–max)", "wall s median (min–max)",
         "wall / wall(2), per round", "peak RSS MiB send / recv"], rows))
    rb = rts[best]
    n = len(rb.ratios)
    clear = rb.median < 0.95 and rb.below >= max(1, -(-4 * n // 5))  # ≥ 5 %, ≥ 80 % of rounds
    if best == 2:
        second = min((c for c in counts if c != 2), key=lambda c: rts[c].median)
        note = (f"met: 2 is the fastest; next best {second} channels at "
                f"{rts[second].median:.2f}× the time of 2")
    elif not clear:
        note = (f"no clear winner: {best} channels at {rb.median:.2f}× the time of 2, faster "
                f"in only {rb.below}/{n} rounds (a clear win needs < 0.95× in ≥ 80 % of rounds)")
    else:
        note = (f"**{best} is faster**: {rb.median:.2f}× the time of 2, faster in "
                f"{rb.below}/{n} rounds")
    res.tables.append(f"Best (lowest median per-round wall / wall(2)): **{best} channels**. "
                      f"{note}.")
    value = f"{best} ({med(mbs[best]):.0f} MB/s" + (
        f"; 2: {med(mbs[2]):.0f} MB/s)" if best != 2 else ")")
    res.summary.append(["best channel count", value, "2 is the default", note])
    res.raw = {"runs": runs, "best": best}
