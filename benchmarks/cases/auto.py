"""auto: does `--compress auto` pick as well as the best fixed codec, with and
without a bandwidth limit?
"""

from __future__ import annotations

import functools

from harness import MiB
from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread


def case_auto(ctx: Ctx, res: CaseResult) -> None:
    """--compress auto vs none, lz4, zstd:1 on mixed data, unlimited and at 50 MB/s."""
    methods = ["auto", "none", "lz4", "zstd:1"]
    fixed = methods[1:]
    limit = 1.10
    small = 128 * MiB if not ctx.quick else 32 * MiB
    res.title = (f"auto: --compress auto vs fixed codecs, mixed data ({human_size(ctx.size)}; "
                 f"{human_size(small)} under --max-bandwidth 50M), 2 channels, tmpfs to tmpfs")
    res.setup = ("The compression case's mixed file. Rounds of the four methods with a "
                 "rotating order. In each setting the best fixed method is the one with the "
                 "lowest median wall; auto's ratio to it is taken per round. Target (ours): "
                 f"auto ≤ {limit:.2f}× the best fixed method, i.e. never much worse.")
    for label, size, extra in (("unlimited", ctx.size, []),
                               ("--max-bandwidth 50M", small, ["--max-bandwidth", "50M"])):
        src = ctx.data.mixed_shm(size)
        dst = ctx.shm / "auto.multifd"
        ctx.log(f"  {label}, {human_size(size)}")
        runs = interleave({m: functools.partial(multifd_migrate, src, dst, compress=m,
                                                extra=extra) for m in methods},
                          ctx.pairs, ctx.log)
        unlink(dst)
        best = min(fixed, key=lambda m: med(secs(runs[m])))
        rows = []
        for m in methods:
            x = runs[m]
            wire = med(secs(x, "transferred_bytes"))
            rt = ratio(secs(runs["auto"]), secs(x))
            rows.append([m + (" (best fixed)" if m == best else ""), spread(secs(x)),
                         f"{size / 1e6 / med(secs(x)):.0f}",
                         rt.text() if m != "auto" else "1",
                         f"{wire / MiB:.0f}", f"{wire / size:.2f}", rss_text(x)])
        rb = ratio(secs(runs["auto"]), secs(runs[best]))
        ok = rb.median <= limit
        res.tables.append(f"**{label}, {human_size(size)}**\n\n" + md_table(
            ["compress", "wall s median (min–max)", "MB/s of file",
             "wall(auto) / wall(this), per round", "MiB on the wire", "wire / file size",
             "peak RSS MiB send / recv"], rows)
            + f"\n\nauto / best fixed ({best}): {rb.text()}, auto faster in {rb.below}/"
              f"{len(rb.ratios)} rounds; ≤ {limit:.2f}: "
            + verdict(ok, f"{sum(r <= limit for r in rb.ratios)}/{len(rb.ratios)} rounds"))
        res.summary.append([f"{label}: auto / best fixed ({best}), wall", rb.text(),
                            f"≤ {limit:.2f}", verdict(ok)])
        res.raw[label] = {"size": size, "runs": runs, "best_fixed": best,
                          "ratio_to_best": rb.as_json()}
