"""The report's figures: one column of panels that share the pass axis.

matplotlib is imported here only, lazily, and used without pyplot (no global
state, no display): a Figure on the Agg canvas.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multifd_cli.common.progress import human_bytes
from multifd_cli.errors import UsageError
from multifd_cli.report.run import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".html")
INSTALL = "pip install 'multifd-cli[report]'"
MiB = 1 << 20
COLORS = {"dirty": "#d95f02", "sent": "#1b9e77", "recv": "#7570b3", "bandwidth": "#1b9e77",
          "dirty_rate": "#d95f02", "expected": "#7570b3", "real": "#e7298a",
          "throttle": "#666666", "switchover": "#e7298a"}


@dataclass
class Picture:
    """A drawn report, and what was plotted: label -> (passes, values), so a test
    can hold the picture against the events it came from."""

    figure: Figure
    plotted: dict[str, tuple[list[int], list[float | None]]] = field(default_factory=dict)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"multifd report needs matplotlib: {INSTALL}") from None
    return matplotlib


def check_output(output: str) -> None:
    """Refuse what cannot be written before reading any event."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in FORMATS:
        raise UsageError(f"--output {output}: expected a .png, .svg or .html file")
    _matplotlib()


def draw(run: Run) -> Picture:
    """The figure of one run: bytes, rates, downtime and throttle per pass."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = run.series()
    xs = [int(x) for x in s["pass"] if x is not None]
    fig = Figure(figsize=(10, 11), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True, height_ratios=[3, 2, 2, 1.2])
    pic = Picture(fig)

    def line(ax: Axes, key: str, label: str, color: str, scale: float = 1.0,
             **kw: Any) -> None:
        ys = [None if v is None else v / scale for v in s[key]]
        pic.plotted[label] = (xs, ys)
        ax.plot(xs, [float("nan") if v is None else v for v in ys], marker="o", ms=4,
                label=label, color=color, **kw)

    # 1. What each pass found dirty and what it sent (and recv received), in bytes.
    ax = axes[0]
    bars = [("dirty_bytes", "dirty (found by send)", COLORS["dirty"]),
            ("sent_bytes", "sent (on the wire)", COLORS["sent"])]
    if run.has_recv:
        bars.append(("recv_bytes", "received by recv", COLORS["recv"]))
    width = 0.8 / len(bars)
    for i, (key, label, color) in enumerate(bars):
        ys = [None if v is None else float(v) for v in s[key]]
        pic.plotted[label] = (xs, ys)
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [0 if v is None else v for v in ys], width,
               label=label, color=color)
    _bytes_axis(ax, [float(v) for key, _, _ in bars for v in s[key] if v])
    ax.set_ylabel("bytes per pass")
    ax.set_title("Bytes per pass", loc="left", fontsize=10)

    # 2. Convergence: the writer must dirty slower than the link sends.
    ax = axes[1]
    line(ax, "bandwidth_bytes_per_s", "bandwidth", COLORS["bandwidth"], MiB)
    line(ax, "dirty_rate_bytes_per_s", "dirty rate", COLORS["dirty_rate"], MiB)
    ax.set_ylabel("MiB/s")
    _headroom(ax, pic.plotted["bandwidth"][1], pic.plotted["dirty rate"][1])
    ax.set_title("Bandwidth and dirty rate", loc="left", fontsize=10)

    # 3. Where the downtime went: the estimate that decided, and what it really was.
    ax = axes[2]
    line(ax, "expected_downtime_ms", "expected downtime", COLORS["expected"])
    real = run.downtime_ms
    if real is not None and xs:
        final = run.switchover_pass or xs[-1]
        pic.plotted["real downtime"] = ([final], [real])
        ax.plot([final], [real], marker="*", ms=14, ls="none", color=COLORS["real"],
                label=f"real downtime ({real:.0f} ms)")
    ax.set_ylabel("ms")
    _headroom(ax, pic.plotted["expected downtime"][1], [real])
    ax.set_title("Downtime", loc="left", fontsize=10)

    # 4. --auto-converge's throttle on the writer.
    ax = axes[3]
    ys_t = [v for v in s["throttle_pct"]]
    pic.plotted["throttle"] = (xs, [None if v is None else float(v) for v in ys_t])
    ax.step(xs, [0 if v is None else v for v in ys_t], where="mid", color=COLORS["throttle"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("% stopped")
    ax.set_title("Throttle (--auto-converge)", loc="left", fontsize=10)
    ax.set_xlabel("pass")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)

    if run.switchover_pass is not None:
        for a in axes:
            a.axvspan(run.switchover_pass - 0.5, run.switchover_pass + 0.5,
                      color=COLORS["switchover"], alpha=0.08, lw=0)
            a.axvline(run.switchover_pass - 0.5, color=COLORS["switchover"], ls="--", lw=1.2)
        for a in axes[:3]:
            a.annotate("switchover", (run.switchover_pass - 0.5, 0.5),
                       xycoords=("data", "axes fraction"), xytext=(-3, 0),
                       textcoords="offset points", ha="right", va="center", rotation=90,
                       fontsize=8, color=COLORS["switchover"])
        pic.plotted["switchover"] = ([run.switchover_pass], [run.switchover_expected_ms])
    for a in axes:
        a.grid(True, axis="y", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.suptitle(title(run), fontsize=12)
    return pic


def _bytes_axis(ax: Axes, values: list[float]) -> None:
    """Ticks at round binary sizes, labelled as the progress bar labels them. Pass 1
    sends everything, so a wide range goes on a log scale where the last passes
    stay visible."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MultipleLocator, NullFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
    if values and max(values) > 20 * min(values):
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=1024, subs=(1.0, 32.0)))
        ax.yaxis.set_minor_locator(LogLocator(base=2, subs=(1.0,), numticks=64))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        ax.set_ylim(bottom=min(values) / 2)
    elif values:
        step = 2 ** math.ceil(math.log2(max(values) / 5)) if max(values) >= 5 else 1
        ax.yaxis.set_major_locator(MultipleLocator(step))


def _headroom(ax: Axes, *series: list[float | None]) -> None:
    """From 0, with room above the data for the legend."""
    top = max((y for ys in series for y in ys if y is not None), default=0.0)
    ax.set_ylim(0, top * 1.35 or 1.0)


def title(run: Run) -> str:
    end = run.send_end
    n = len(run.passes)
    head = f"multifd send: {n} pass{'es' if n != 1 else ''}"
    if end.get("event") == "failed":
        return f"{head}, failed (exit {end.get('exit_code')}): {end.get('error', '')}"[:140]
    if end.get("event") != "completed":
        return f"{head}, unfinished (no completed or failed event)"
    parts = [head, f"{human_bytes(end.get('transferred_bytes', 0))} sent",
             f"{end.get('total_time_ms', 0) / 1000:.1f} s"]
    real = run.downtime_ms
    if real is not None:
        parts.append(f"switchover at pass {run.switchover_pass or n}, downtime {real:.0f} ms")
    else:
        parts.append("writer not paused")
    return ", ".join(parts)


def write(run: Run, output: str) -> Picture:
    """Draw the run into `output`; its extension chooses the format."""
    pic = draw(run)
    ext = os.path.splitext(output)[1].lower()
    try:
        if ext == ".html":
            with open(output, "w", encoding="utf-8") as f:
                f.write(to_html(run, pic))
        else:
            pic.figure.savefig(output, format=ext[1:])
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from None
    return pic


def to_html(run: Run, pic: Picture) -> str:
    """One self-contained page: the figure (embedded) and the per-pass table."""
    png = io.BytesIO()
    pic.figure.savefig(png, format="png")
    img = base64.b64encode(png.getvalue()).decode("ascii")
    s = run.series()
    cols: list[tuple[str, str, float]] = [
        ("pass", "pass", 1), ("dirty_bytes", "dirty MiB", MiB), ("sent_bytes", "sent MiB", MiB),
        ("recv_bytes", "received MiB", MiB), ("duration_ms", "send ms", 1),
        ("recv_duration_ms", "recv ms", 1), ("bandwidth_bytes_per_s", "bandwidth MiB/s", MiB),
        ("dirty_rate_bytes_per_s", "dirty rate MiB/s", MiB),
        ("expected_downtime_ms", "expected downtime ms", 1), ("throttle_pct", "throttle %", 1),
    ]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
    rows = []
    for i in range(len(run.passes)):
        cells = "".join(f"<td>{_cell(s[key][i], scale)}</td>" for key, _, scale in cols)
        mark = ' class="final"' if run.passes[i].final else ""
        rows.append(f"<tr{mark}>{cells}</tr>")
    name = html.escape(title(run))
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{name}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "tr.final{background:#fde0ef}</style></head><body>\n"
        f"<h1>{name}</h1>\n<img alt=\"{name}\" src=\"data:image/png;base64,{img}\">\n"
        f"<table><tr>{head}</tr>\n" + "\n".join(rows) + "</table>\n</body></html>\n"
    )


def _cell(value: float | int | None, scale: float) -> str:
    if value is None:
        return "-"
    return str(value) if scale == 1 else f"{value / scale:.2f}"
