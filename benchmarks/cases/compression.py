"""compression: none, lz4 and zstd:1 on mixed data, unlimited and under a
bandwidth limit.
"""

from __future__ import annotations

import functools

from harness import MiB
from harness.procs import unlink
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread


def case_compression(ctx: Ctx, res: CaseResult) -> None:
    """none / lz4 / zstd:1 on mixed data, unlimited and under --max-bandwidth 50M."""
    methods = ["none", "lz4", "zstd:1"]
    small = 128 * MiB if not ctx.quick else 32 * MiB
    res.title = (f"compression: mixed data ({human_size(ctx.size)}; {human_size(small)} under "
                 "--max-bandwidth 50M), 2 channels, tmpfs to tmpfs")
    res.setup = ("Mixed data: shuffled 64 KiB chunks, a quarter zero, a quarter random, half "
                 "the standard library's .py sources (repeated). Zero pages are never sent by "
                 "any method. Rounds rotate the order; ratios are per round against `none`.")
    for label, size, extra in (("unlimited", ctx.size, []),
                               ("--max-bandwidth 50M", small, ["--max-bandwidth", "50M"])):
        src = ctx.data.mixed_shm(size)
        dst = ctx.shm / "compression.multifd"
        ctx.log(f"  {label}, {human_size(size)}")
        runs = interleave({m: functools.partial(multifd_migrate, src, dst, compress=m,
                                                extra=extra) for m in methods},
                          ctx.pairs, ctx.log)
        unlink(dst)
        rows = []
        for m in methods:
            x = runs[m]
            rt = ratio(secs(x), secs(runs["none"]))
            wire = med(secs(x, "transferred_bytes"))
            rows.append([m, spread(secs(x)), f"{size / 1e6 / med(secs(x)):.0f}",
                         rt.text() if m != "none" else "1", f"{wire / MiB:.0f}",
                         f"{wire / size:.2f}", rss_text(x)])
            if m != "none":
                res.summary.append([f"{label}: {m} / none, wall", rt.text(), "-",
                                    f"wire {wire / size:.2f} of the file"])
        res.tables.append(f"**{label}, {human_size(size)}**\n\n" + md_table(
            ["compress", "wall s median (min–max)", "MB/s of file", "wall / wall(none), per round",
             "MiB on the wire", "wire / file size", "peak RSS MiB send / recv"], rows))
        res.raw[label] = {"size": size, "runs": runs}
