"""What a case fills in, and how a run becomes benchmarks/results/*.{md,json}.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from harness import REPO, RESULTS
from harness.data import Data
from harness.procs import CHILD


@dataclass
class Ctx:
    size: int
    pairs: int
    quick: bool
    data: Data
    disk: Path
    shm: Path
    log: Callable[[str], None]


@dataclass
class CaseResult:
    name: str
    title: str = ""
    setup: str = ""
    tables: list[str] = field(default_factory=list)
    summary: list[list[str]] = field(default_factory=list)  # [metric, value, target, verdict]
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    others_cores: float = 0.0


def verdict(ok: bool, detail: str = "") -> str:
    return ("met" if ok else "**missed**") + (f" ({detail})" if detail else "")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def render(meta: dict[str, Any], results: list[CaseResult]) -> str:
    out = ["# multifd benchmarks", ""]
    out.append(md_table(["", ""], [[k, v] for k, v in meta.items() if not isinstance(v, dict)]))
    out += ["", "How to read: every comparison ran interleaved in this one run; cells are "
            "median (min–max) over the runs, ratios are medians of per-pair ratios (< 1: "
            "multifd is faster). *other load* is the CPU other processes used during the case, "
            "in cores (of " + str(os.cpu_count()) + "); load average is the kernel's 1-minute "
            "figure, which includes this benchmark itself. Peak RSS is GNU time's %M (ru_maxrss): "
            "the largest single process of each side, max over the runs. Page caches are not dropped (that needs root "
            "and disturbs everyone else on the machine): sources are read from the page cache by "
            "every variant alike; disk cases run `sync` (untimed) before each timed run. multifd "
            "runs from a snapshot of multifd_cli/ taken at the start.", "", "## Summary", ""]
    rows = []
    for r in results:
        tail = f"other load {r.others_cores:.2f}, loadavg {r.load[0]:.1f}→{r.load[1]:.1f}"
        if r.error:
            rows.append([r.name, "**failed**", r.error.replace("|", "/")[:200], "-", tail])
        for metric, value, target, v in r.summary:
            rows.append([r.name, metric, value, f"{target}: {v}" if target != "-" else v, tail])
    out.append(md_table(["case", "metric", "median (min–max)", "target / verdict",
                         "machine during the case"], rows))
    for r in results:
        out += ["", f"## {r.title or r.name}", ""]
        if r.setup:
            out += [r.setup, ""]
        out += [f"Case took {r.seconds:.0f} s; other processes used {r.others_cores:.2f} cores; "
                f"load average {r.load[0]:.2f} → {r.load[1]:.2f}.", ""]
        if r.error:
            out += [f"**FAILED:** {r.error}", ""]
        for t in r.tables:
            out += [t, ""]
    return "\n".join(out).rstrip() + "\n"


def write_results(md: str, blob: dict[str, Any], stamp: str) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = {"md": md, "json": json.dumps(blob, indent=1, default=str) + "\n"}
    written = []
    for base in (f"bench-{stamp}", "latest"):
        for ext, body in text.items():
            final = RESULTS / f"{base}.{ext}"
            tmp = RESULTS / f"{base}.{ext}.tmp"
            tmp.write_text(body)
            tmp.replace(final)
            written.append(final)
    return written


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"],
                           capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def multifd_version() -> str:
    out = subprocess.run([*CHILD.multifd, "--version"], capture_output=True, text=True,
                         cwd=CHILD.cwd, env=CHILD.env)
    return out.stdout.strip() or out.stderr.strip()


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind
