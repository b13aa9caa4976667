"""Logging: stderr (or --log-file) in main; channel records reach it through
multiprocessing-logging, tagged with the process and channel name.

A channel killed while it holds the log queue must not hang anyone: children
cancel the queue's join, and shutdown never waits on logging for long.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Any, Iterator

from multiprocessing_logging import MultiProcessingHandler

from multifd_cli.common import terminal
from multifd_cli.errors import UsageError

FORMAT = "%(asctime)s %(processName)s %(levelname)s %(message)s"
_root = logging.getLogger("multifd")


_held_depth = 0
_held_signals: list[int] = []


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold main's SIGINT/SIGTERM handling for the duration; deliver it on the way out.

    main's signal handlers raise (see cli.py). Raised inside the log queue's
    put(), the exception could leave the queue's lock taken, so the shutdown that
    followed deadlocked on it, or logging swallowed it as a "Logging error" and
    recv listened on until --timeout. The handler asks hold_signal() first; a
    flag, not a signal mask, because the kernel may hand the signal to another
    thread while Python still runs the handler in this one.
    """
    global _held_depth
    _held_depth += 1
    try:
        yield
    finally:
        _held_depth -= 1
        if not _held_depth and _held_signals:
            signal.raise_signal(_held_signals.pop(0))


def hold_signals_from_now() -> None:
    """The run has succeeded: hold SIGINT/SIGTERM until exit and never raise them.

    A signal during the cleanup after success would otherwise report a failure
    (exit 130/143) for a migration that is complete, while send keeps the writer
    paused as asked after success: a script would then restart a writer whose
    data already lives on elsewhere, or wait on one that never resumes.
    """
    global _held_depth
    _held_depth += 1


def hold_signal(signum: int) -> bool:
    """For main's signal handler: True if the signal must wait for a log call to end."""
    if _held_depth:
        _held_signals.append(signum)
        return True
    return False


class _ChannelLogHandler(MultiProcessingHandler):  # type: ignore[misc]
    """Main's end of the log queue.

    Its receive loop stops on a None sentinel, so closing wakes it at once
    instead of waiting out the library's 0.2 s poll; the join is bounded, so
    a channel killed while holding the queue can never hang main's exit.
    """

    def emit(self, record: logging.LogRecord) -> None:
        with _signals_held():
            super().emit(record)

    def _receive(self) -> None:
        while True:
            try:
                record = self.queue.get()
            except (EOFError, OSError):
                break
            if record is None:
                break
            try:
                self.sub_handler.emit(record)
            except Exception:  # noqa: BLE001 - a bad record must not kill logging
                pass

    def close(self) -> None:
        if not self._is_closed:  # type: ignore[has-type]
            self._is_closed = True
            with _signals_held():
                try:
                    self.queue.put_nowait(None)
                except (OSError, ValueError):
                    pass
                self._receive_thread.join(0.5)
                self.sub_handler.flush()
                logging.Handler.close(self)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in newer typeshed
    """stderr, shared with the progress bar: while one is drawn, a record is printed
    above it on a line of its own, never glued to the end of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        above = terminal.line_printer()
        if above is None:
            super().emit(record)
            return
        try:
            above(self.format(record))
        except Exception:  # noqa: BLE001 - as logging does: a record must not kill the run
            self.handleError(record)


def default_level(log_file: str | None = None) -> str:
    """warning on a terminal, info elsewhere.

    On a terminal the progress bar shows the passes, and both sides, which may share
    that terminal, would otherwise interleave their info records with it; a log
    file or a pipe keeps every record.
    """
    if log_file:
        return "info"
    try:
        return "warning" if sys.stderr is not None and sys.stderr.isatty() else "info"
    except (OSError, ValueError):
        return "info"


def configure(level: str | None = None, log_file: str | None = None) -> None:
    """Send records to stderr, or to a file; stdout is reserved for --json events.

    `level` None is the default of `default_level()`. A log file that cannot be
    opened (missing directory, /proc, /sys, ...) is the user's error: a
    UsageError, not a traceback.
    """
    handler: logging.Handler
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as e:
            raise UsageError(f"cannot open log file {log_file}: {e.strerror or e}") from None
    else:
        handler = _StderrHandler(sys.stderr)
    for h in list(_root.handlers):
        _root.removeHandler(h)
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    _root.addHandler(handler)
    _root.setLevel((level or default_level(log_file)).upper())
    _root.propagate = False


def install_for_channels() -> None:
    """Wrap main's handlers so forked channels log through one queue."""
    for i, h in enumerate(list(_root.handlers)):
        if isinstance(h, MultiProcessingHandler):
            continue
        mp = _ChannelLogHandler(f"multifd-log-{i}", sub_handler=h)
        _root.removeHandler(h)
        _root.addHandler(mp)


def shutdown() -> None:
    """Stop the log thread and go back to plain handlers (main only)."""
    for h in list(_root.handlers):
        if isinstance(h, MultiProcessingHandler):
            _root.removeHandler(h)
            h.close()
            _root.addHandler(h.sub_handler)


def _queues() -> list[Any]:
    return [h.queue for h in _root.handlers if isinstance(h, MultiProcessingHandler)]


def in_child() -> None:
    """In a forked channel: never block exit on the shared log queue."""
    for q in _queues():
        q.cancel_join_thread()


def flush_child() -> None:
    """Give the queue's feeder a moment to hand over the last records, no more."""
    for q in _queues():
        try:
            q.close()
            thread = getattr(q, "_thread", None)
            if thread is not None:
                thread.join(1.0)
        except Exception:  # noqa: BLE001 - logging must never keep a channel alive
            pass
