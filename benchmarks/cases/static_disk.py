"""static-disk: a file at rest to a new file on disk, against cp + sync.
"""

from __future__ import annotations

from harness import Sample
from harness.procs import cp_cmd, sync, timed, unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, rss_text, verify_once
from harness.stats import human_size, med, ratio, secs, spread


def case_static_disk(ctx: Ctx, res: CaseResult) -> None:
    """multifd (2 channels, no compression) to a new file on disk vs cp + sync."""
    src = ctx.data.random_disk(ctx.size)
    d_m, d_c = ctx.disk / "static-disk.multifd", ctx.disk / "static-disk.cp"
    res.title = f"static-disk: {human_size(ctx.size)} of random data to a new file on disk"
    res.setup = (f"Source and destination on disk ({ctx.disk}), source in the page cache. "
                 "multifd: 2 channels, no compression, wall time from starting send (recv "
                 "listening) to send's exit; its copy is fsynced. Baseline: `cp --reflink=never "
                 "SRC DST && sync DST`, both timed. `sync` (untimed) before every run.")

    def cp_sync() -> Sample:
        unlink(d_c)
        sync()
        cp_s, total = timed([cp_cmd(src, d_c), ["sync", str(d_c)]])
        verify_once(src, d_c)
        return {"s": total, "cp_s": cp_s, "sync_s": total - cp_s}

    runs = interleave({
        "multifd": lambda: multifd_migrate(src, d_m, disk=True),
        "cp+sync": cp_sync,
    }, ctx.pairs, ctx.log)
    unlink(d_m)
    unlink(d_c)
    m, c = runs["multifd"], runs["cp+sync"]
    rt = ratio(secs(m), secs(c))
    mbs = ctx.size / 1e6
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s", "detail", "peak RSS MiB send / recv"],
        [["multifd send", spread(secs(m)), f"{mbs / med(secs(m)):.0f}",
          f"recv exits at {spread(secs(m, 'recv_s'))} s; JSON total_time_ms "
          f"{spread(secs(m, 'total_time_ms'), 0)}; recv total_time_ms "
          f"{spread(secs(m, 'recv_total_time_ms'), 0)}; passes {m[0]['passes']}",
          rss_text(m)],
         ["cp + sync", spread(secs(c)), f"{mbs / med(secs(c)):.0f}",
          f"cp {spread(secs(c, 'cp_s'))} s + sync {spread(secs(c, 'sync_s'))} s", "-"]]))
    res.tables.append(md_table(
        ["ratio", "median of per-pair ratios (min–max)", "multifd faster in", "target"],
        [["multifd / (cp + sync)", rt.text(), f"{rt.below}/{len(rt.ratios)} pairs",
          "≤ 1.2: " + verdict(rt.median <= 1.2)]]))
    res.summary.append(["multifd / (cp+sync), wall", rt.text(), "≤ 1.2", verdict(rt.median <= 1.2)])
    res.raw = {"runs": runs, "ratio": rt.as_json()}
