"""static-tmpfs: a file at rest on tmpfs, against cp and a naive 2+2-process copy.
"""

from __future__ import annotations

from harness import Sample
from harness.procs import cp_cmd, timed, unlink
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave, multifd_migrate, naive_copy, rss_text, verify_once
from harness.stats import human_size, med, ratio, secs, spread


def case_static_tmpfs(ctx: Ctx, res: CaseResult) -> None:
    """multifd vs cp vs a naive 2+2-process Python copy, all on tmpfs."""
    src = ctx.data.random_shm(ctx.size)
    d_m, d_c, d_n = (ctx.shm / f"static-tmpfs.{x}" for x in ("multifd", "cp", "naive"))
    res.title = f"static-tmpfs: {human_size(ctx.size)} of random data, tmpfs to tmpfs"
    res.setup = (f"Source and destination on tmpfs ({ctx.shm}). multifd: 2 channels, no "
                 "compression, fsync included (a no-op on tmpfs). `cp --reflink=never`. "
                 "naive: benchmarks/naive.py, 2 sender processes (pread + sendall of half the "
                 "file each, own TCP socket) and 2 receiver processes (recv_into + pwrite), "
                 "no hashing, no verification; timed until both sides exited. Rounds rotate "
                 "the order.")
    def naive() -> Sample:
        s = naive_copy(src, d_n)
        verify_once(src, d_n)
        return s

    def cp() -> Sample:
        unlink(d_c)
        s = {"s": timed([cp_cmd(src, d_c)])[0]}
        verify_once(src, d_c)
        return s

    runs = interleave({"multifd": lambda: multifd_migrate(src, d_m), "cp": cp, "naive": naive},
                      ctx.pairs, ctx.log)
    for p in (d_m, d_c, d_n):
        unlink(p)
    m, c, n = runs["multifd"], runs["cp"], runs["naive"]
    mbs = ctx.size / 1e6
    rc, rn = ratio(secs(m), secs(c)), ratio(secs(m), secs(n))
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s", "peak RSS MiB send / recv"],
        [["multifd", spread(secs(m)), f"{mbs / med(secs(m)):.0f}", rss_text(m)],
         ["cp", spread(secs(c)), f"{mbs / med(secs(c)):.0f}", "-"],
         ["naive Python (2+2 processes)", spread(secs(n)), f"{mbs / med(secs(n)):.0f}",
          rss_text(n)]]))
    res.tables.append(md_table(
        ["ratio", "median of per-round ratios (min–max)", "multifd faster in"],
        [["multifd / cp", rc.text(), f"{rc.below}/{len(rc.ratios)} rounds"],
         ["multifd / naive", rn.text(), f"{rn.below}/{len(rn.ratios)} rounds"]]))
    res.summary.append(["multifd / cp, wall", rc.text(), "-", "context"])
    res.summary.append(["multifd / naive Python, wall", rn.text(), "-", "context"])
    res.raw = {"runs": runs, "ratio_cp": rc.as_json(), "ratio_naive": rn.as_json()}
