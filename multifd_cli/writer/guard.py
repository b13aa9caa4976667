"""The writer's safety rules for one migration, in one object.

Whatever happens, the writer is never left paused or throttled by a failed
migration: leaving the `with` block resumes it. Only after success, and only
with --after-success keep-paused (QEMU's postmigrate), does it stay paused,
because writes landing in the old copy after the switchover would be lost. With
a pause mechanism, a watchdog process resumes the writer even if send is killed.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from multifd_cli.writer.pause import Pauser, PauseSpec
from multifd_cli.writer.throttle import Throttle
from multifd_cli.writer.watchdog import Watchdog

log = logging.getLogger("multifd")


class WriterGuard:
    """Pauses, throttles and always releases the writer; owns the watchdog."""

    def __init__(self, spec: PauseSpec, after_success: str, pauser: Pauser | None = None) -> None:
        self.spec = spec
        self.after_success = after_success
        self.pauser = pauser or Pauser(spec)
        self.throttle = Throttle(spec)
        self.watchdog: Watchdog | None = None
        self.succeeded = False  # set once the copy is verified: may keep the writer paused
        self.paused_at = 0.0

    @property
    def can_pause(self) -> bool:
        """A pause mechanism exists (options, or the API's callbacks)."""
        return self.spec.any or self.pauser.extra_pause is not None

    def __enter__(self) -> WriterGuard:
        if self.spec.any:
            self.watchdog = Watchdog(self.spec)
            self.pauser.on_intent = self.watchdog.paused
            self.pauser.on_command = self.watchdog.command
            self.throttle.watchdog = self.watchdog
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def inherited_ends(self) -> list[Any]:
        """What a forked channel must close: the watchdog's pipe is main's alone."""
        return [self.watchdog.inherited_end()] if self.watchdog is not None else []

    def pause(self) -> None:
        """Stop the writer for the switchover; the downtime starts now."""
        self.throttle.stop()
        self.paused_at = time.monotonic()
        self.pauser.pause()

    def release(self) -> None:
        """Never leave the writer paused or throttled, except after success if asked."""
        self.throttle.stop()
        keep = self.succeeded and self.after_success == "keep-paused"
        try:
            if self.pauser.paused and not keep:
                self.pauser.resume()
                log.info("the writer runs again")
        finally:
            if self.watchdog is not None:
                if self.pauser.paused and not keep:
                    self.watchdog.hand_over()  # a signal cut the resume short
                else:
                    self.watchdog.close(keep=keep and self.pauser.paused)
                self.watchdog = None
