"""`multifd report`: a picture of one migration, pass by pass, from its JSON events.

`run` reads and joins the events (no drawing, no matplotlib); `draw` turns a
run into figures and files. matplotlib is an optional extra, imported only here
and only when a report is drawn.
"""

from __future__ import annotations

from multifd_cli.report.run import Run, load_run

__all__ = ["Run", "load_run", "write_report"]


def write_report(send_events: str, recv_events: str | None, output: str) -> Run:
    """Read the run's events and write its picture to `output` (.png, .svg or .html)."""
    from multifd_cli.report import draw

    draw.check_output(output)
    run = load_run(send_events, recv_events)
    draw.write(run, output)
    return run
