"""resume: bring an old copy up to date (1 % of pages changed) with recv --resume,
against rsync's delta transfer.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from typing import Callable, Sequence

from harness import INSTALL_HINT, KiB, MiB, Sample
from harness.procs import Proc, cp_cmd, sync, timed, unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, rss_text, verify_once
from harness.stats import human_size, med, ratio, secs, spread


def rsync_stat(lines: Sequence[str], key: str) -> float | None:
    """A byte count from `rsync --stats` output, e.g. key 'Literal data'."""
    for line in lines:
        if line.startswith(key + ":"):
            with contextlib.suppress(ValueError, IndexError):
                return float(line.split(":", 1)[1].split()[0].replace(",", ""))
    return None


def case_resume(ctx: Ctx, res: CaseResult) -> None:
    """Update an old copy with 1 % of its pages changed: recv --resume vs rsync delta."""
    size, frac = ctx.size, 0.01
    old = ctx.data.random_disk(size)
    src = ctx.data.changed_disk(size, frac)
    dm, dr = ctx.disk / "resume.multifd", ctx.disk / "resume.rsync"
    changed = int(size // (4 * KiB) * frac)
    res.title = (f"resume: update an old copy of {human_size(size)} with 1 % of its 4 KiB "
                 "pages changed, on disk")
    res.setup = (f"SRC: the random file with {changed} random 4 KiB pages ({human_size(changed * 4 * KiB)}) "
                 "rewritten; before every run the old copy is recreated from the pristine file "
                 "with `cp` and everything is written back with `sync` (both untimed). multifd: "
                 "`multifd recv --resume DEST` listening, then `send SRC` (2 channels, no "
                 "compression), timed from starting send to its exit (recv hashes DEST and "
                 "fsyncs it inside that time); also shown from recv's start. rsync: `rsync "
                 "--inplace --no-whole-file --stats SRC DEST` (local, delta algorithm), timed "
                 "with and without a following `sync DEST` (multifd's copy is fsynced, so the "
                 "target uses rsync + sync). Both sources and the old copy are in the page "
                 "cache. Pairs alternate A B.")
    have_rsync = shutil.which("rsync") is not None

    def multifd() -> Sample:
        s = multifd_migrate(src, dm, disk=True, resume_from=old)
        verify_once(src, dm)
        return s

    def rsync() -> Sample:
        unlink(dr)
        subprocess.run(cp_cmd(old, dr), check=True)
        sync()
        t0 = time.perf_counter()
        p = Proc(["rsync", "--inplace", "--no-whole-file", "--stats", str(src), str(dr)], t0=t0)
        rs = p.wait(600)
        total = timed([["sync", str(dr)]])[0] + rs
        verify_once(src, dr)
        return {"s": total, "rsync_s": rs, "sync_s": total - rs,
                "literal_bytes": rsync_stat(p.lines, "Literal data"),
                "sent_bytes": rsync_stat(p.lines, "Total bytes sent")}

    variants: dict[str, Callable[[], Sample]] = {"multifd --resume": multifd}
    if have_rsync:
        variants["rsync + sync"] = rsync
    runs = interleave(variants, ctx.pairs, ctx.log)
    unlink(dm)
    unlink(dr)
    m = runs["multifd --resume"]
    mbs = size / 1e6
    rows = [["multifd recv --resume + send", spread(secs(m)), f"{mbs / med(secs(m)):.0f}",
             f"{med(secs(m, 'transferred_bytes')) / MiB:.2f} MiB "
             f"({med(secs(m, 'transferred_bytes')):.0f} B; {med(secs(m, 'normal_pages')):.0f} "
             "pages)",
             f"from recv's start {spread(secs(m, 'from_recv_start_s'))} s; JSON total_time_ms "
             f"{spread(secs(m, 'total_time_ms'), 0)}; recv total_time_ms "
             f"{spread(secs(m, 'recv_total_time_ms'), 0)}; passes {m[0]['passes']}",
             rss_text(m)]]
    summ = [["bytes sent on resume", f"{med(secs(m, 'transferred_bytes')) / MiB:.2f} MiB",
             "-", f"{changed} changed pages = {changed * 4 * KiB / MiB:.2f} MiB"]]
    rrows = []
    if have_rsync:
        r = runs["rsync + sync"]
        lit = [x["literal_bytes"] for x in r if x["literal_bytes"] is not None]
        sent = [x["sent_bytes"] for x in r if x["sent_bytes"] is not None]
        rows.append(["rsync --inplace --no-whole-file + sync", spread(secs(r)),
                     f"{mbs / med(secs(r)):.0f}",
                     (f"literal data {med(lit) / MiB:.2f} MiB; rsync's total bytes sent "
                      f"{med(sent) / MiB:.2f} MiB") if lit and sent else "-",
                     f"rsync {spread(secs(r, 'rsync_s'))} s + sync {spread(secs(r, 'sync_s'))} s",
                     "-"])
        rt = ratio(secs(m), secs(r))
        ra = ratio(secs(m), secs(r, "rsync_s"))
        rr = ratio(secs(m, "from_recv_start_s"), secs(r))
        ok = rt.median <= 0.3
        rrows = [["multifd / (rsync + sync)", rt.text(), f"{rt.below}/{len(rt.ratios)} pairs",
                  "≤ 0.3: " + verdict(ok, f"{sum(x <= 0.3 for x in rt.ratios)}/"
                                          f"{len(rt.ratios)} pairs")],
                 ["multifd / rsync alone (no sync)", ra.text(),
                  f"{ra.below}/{len(ra.ratios)} pairs", "context"],
                 ["multifd from recv's start / (rsync + sync)", rr.text(),
                  f"{rr.below}/{len(rr.ratios)} pairs", "context"]]
        summ.insert(0, ["multifd --resume / (rsync + sync), wall", rt.text(), "≤ 0.3",
                        verdict(ok)])
        summ.insert(1, ["rsync alone, s", spread(secs(r, "rsync_s")), "-",
                        "the issue measured 4.6 s"])
        res.raw["ratio"] = rt.as_json()
    else:
        rows.append(["rsync", f"not installed: `{INSTALL_HINT}`", "-", "-", "-", "-"])
        summ.insert(0, ["rsync", "not installed", "-", f"`{INSTALL_HINT}`"])
    res.tables.append(md_table(
        ["variant", "wall s median (min–max)", "MB/s of file", "bytes sent", "detail",
         "peak RSS MiB send / recv"], rows))
    if rrows:
        res.tables.append(md_table(["ratio", "median of per-pair ratios (min–max)",
                                    "multifd faster in", "target"], rrows))
    res.summary += summ
    res.raw.update({"runs": runs, "changed_pages": changed})
