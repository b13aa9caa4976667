"""Who writes on the terminal while a progress bar is drawn.

The bar (common/progress.py) and the log handler (proc/logsetup.py) share
stderr. While a bar is up, it registers here how to print a line above it, and
the log handler prints its records that way, so a record never lands glued to
the end of the bar. Kept apart so that neither module imports the other.
"""

from __future__ import annotations

from typing import Callable

_above: Callable[[str], None] | None = None


def show_lines_above(display: Callable[[str], None] | None) -> None:
    """Route stderr's log lines through a live display (None: straight to stderr again)."""
    global _above
    _above = display


def line_printer() -> Callable[[str], None] | None:
    """How to print a line above the live display, or None when there is none."""
    return _above
