"""startup: what every `multifd` run pays before it moves a byte.
"""

from __future__ import annotations

import sys

from harness.procs import CHILD, timed
from harness.report import CaseResult, Ctx, md_table
from harness.runs import interleave
from harness.stats import med, ratio, secs, spread


def case_startup(ctx: Ctx, res: CaseResult) -> None:
    """`multifd --version` vs `python -c pass`."""
    n = 10
    res.title = "startup: `python -m multifd_cli --version` vs `python -c pass`"
    res.setup = f"{n} interleaved pairs, wall time of the process ({sys.executable})."
    runs = interleave({
        "multifd --version": lambda: {"s": timed([[*CHILD.multifd, "--version"]])[0]},
        "python -c pass": lambda: {"s": timed([[sys.executable, "-c", "pass"]])[0]},
    }, n, ctx.log)
    a, b = secs(runs["multifd --version"]), secs(runs["python -c pass"])
    rt = ratio(a, b)
    diff = [x - y for x, y in zip(a, b)]
    res.tables.append(md_table(
        ["variant", "ms median (min–max)"],
        [["multifd --version", spread(a, 0, 1000)], ["python -c pass", spread(b, 0, 1000)]]))
    res.tables.append(md_table(
        ["comparison", "median of per-pair values (min–max)"],
        [["ratio multifd / python", rt.text()],
         ["difference ms (multifd's own import cost)", spread(diff, 0, 1000)]]))
    res.summary.append(["`multifd --version` ms (python -c pass)",
                        f"{med(a) * 1000:.0f} ({med(b) * 1000:.0f})", "-", "context"])
    res.raw = {"runs": runs, "ratio": rt.as_json()}
