"""scan: what a pass that finds no change costs, against reading and hashing the
file in a plain Python loop.
"""

from __future__ import annotations

import sys

from harness import BenchError, Sample
from harness.procs import Proc, unlink
from harness.report import CaseResult, Ctx, md_table, verdict
from harness.runs import interleave, multifd_migrate, rss_text
from harness.stats import human_size, med, ratio, secs, spread

HASH_REF = r"""
import mmap, os, sys, time, xxhash
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
mv = memoryview(mm)
t = time.perf_counter()
for off in range(0, size, 65536):
    xxhash.xxh3_64_intdigest(mv[off:off + 65536])
print(time.perf_counter() - t)
"""


def case_scan(ctx: Ctx, res: CaseResult) -> None:
    """The no-change pass: pass 2 of a --no-mtime-shortcut migration of a static file."""
    src = ctx.data.random_shm(ctx.size)
    dst = ctx.shm / "scan.multifd"
    res.title = f"scan: a pass that finds nothing, {human_size(ctx.size)} on tmpfs"
    res.setup = ("multifd send --no-mtime-shortcut (2 channels) of a static file: pass 2 finds "
                 "nothing; its duration_ms from send's JSON gives the scan rate (GB = 1e9 B). "
                 "Reference, interleaved: one Python process hashing the same file with "
                 "xxh3_64 per 64 KiB chunk over an mmap (timed inside the process).")

    def scan() -> Sample:
        s = multifd_migrate(src, dst, extra=["--no-mtime-shortcut"])
        p2 = [p for p in s["pass_events"] if p["pass"] == 2]
        if not p2:
            raise BenchError(f"no pass 2 in {s['pass_events']}")
        if p2[0]["dirty_bytes"]:
            raise BenchError(f"pass 2 found {p2[0]['dirty_bytes']} dirty bytes")
        s["pass2_ms"] = p2[0]["duration_ms"]
        s["gbps"] = ctx.size / 1e9 / (p2[0]["duration_ms"] / 1000)
        return s

    def ref() -> Sample:
        p = Proc([sys.executable, "-c", HASH_REF, str(src)])
        wall = p.wait(120)
        inner = float(p.lines[-1])
        return {"s": wall, "inner_s": inner, "gbps": ctx.size / 1e9 / inner}

    runs = interleave({"multifd pass 2": scan, "reference": ref}, ctx.pairs, ctx.log)
    unlink(dst)
    sc, rf = runs["multifd pass 2"], runs["reference"]
    g, gr = secs(sc, "gbps"), secs(rf, "gbps")
    rt = ratio(g, gr)
    res.tables.append(md_table(
        ["variant", "GB/s median (min–max)", "ms median (min–max)", "detail"],
        [["multifd pass 2 (no change)", spread(g, 2), spread(secs(sc, "pass2_ms"), 0),
          f"whole migration {spread(secs(sc))} s, peak RSS send / recv {rss_text(sc)} MiB"],
         ["reference: 1 process, mmap + xxh3_64 per 64 KiB", spread(gr, 2),
          spread(secs(rf, "inner_s"), 0, 1000), "-"]]))
    ok = med(g) >= 3
    res.tables.append(md_table(
        ["ratio", "median of per-pair ratios (min–max)", "target"],
        [["scan rate / reference rate", rt.text(), "scan ≥ 3 GB/s: " +
          verdict(ok, f"{sum(x >= 3 for x in g)}/{len(g)} runs")]]))
    res.summary.append(["no-change pass, GB/s", spread(g, 2), "≥ 3", verdict(ok)])
    res.raw = {"runs": runs, "ratio_to_reference": rt.as_json()}
