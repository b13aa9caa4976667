"""What any main process and any channel process say to each other, whichever the side.

Each side adds its own vocabulary (send/messages.py, recv/messages.py). These two
are the ones proc/workers.py itself sends and understands. They are NamedTuples:
they pickle small and compare by value, and a channel's loop dispatches on type.
"""

from __future__ import annotations

from typing import NamedTuple


class Quit(NamedTuple):
    """Main → channel: finish now; main is stopping its channels."""


class ChannelError(NamedTuple):
    """Channel → main: the channel failed; main raises WorkerFailed with this exit code."""

    exit_code: int
    message: str
