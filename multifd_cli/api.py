"""Embedding API: migrate a file from inside the program that writes it.

An application that knows what it writes reports it, and each pass then costs
what was dirtied rather than a scan of the whole file (as KVM's dirty log does
for QEMU):

    from multifd_cli.api import LiveMigration

    mig = LiveMigration("disk.img", to="tcp:10.0.0.2:4444",
                        pause=writer.pause, resume=writer.resume)
    writer.on_write = mig.mark_dirty         # call after every completed write
    summary = mig.run()                      # blocks; raises MultifdError on failure

`pause` must return only once no further write can happen; `resume` undoes
it. They are called from the thread that runs `run()`. After success the writer
stays paused unless `after_success="resume"`, because writes that land in the
old copy after the switchover would be lost.
"""

from __future__ import annotations

from typing import Any, Callable

from multifd_cli.config import Convergence, SendConfig, TestHooks
from multifd_cli.events import Events
from multifd_cli.send.orchestrator import Orchestrator
from multifd_cli.send.tracker import DirtyLog
from multifd_cli.writer.pause import Pauser, PauseSpec


class LiveMigration:
    """One migration of `source` to the recv at `to`, driven by reported writes."""

    def __init__(
        self,
        source: str,
        to: str,
        *,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        channels: int = 2,
        compress: str = "none",
        page_size: int = 4096,
        packet_size: int = 512 << 10,
        downtime_limit_ms: float = 300.0,
        max_passes: int = 30,
        timeout: float = 60.0,
        after_success: str = "keep-paused",
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if (pause is None) != (resume is None):
            raise ValueError("pause and resume go together")
        # The CLI's own checks: a bad value fails here, before anything connects.
        self.config = SendConfig.create(
            (source,), to, compress, channels=channels, page_size=page_size,
            packet_size=packet_size, timeout=timeout, pause=PauseSpec(),
            convergence=Convergence(downtime_limit_ms=downtime_limit_ms, max_passes=max_passes),
            after_success=after_success,
        )
        self.dirty = DirtyLog(page_size)
        self._pauser = Pauser(PauseSpec(), extra_pause=pause, extra_resume=resume)
        self._on_event = on_event

    def mark_dirty(self, offset: int, length: int) -> None:
        """Report that bytes [offset, offset + length) were written. Thread-safe."""
        self.dirty.mark_dirty(offset, length)

    def run(self) -> dict[str, Any]:
        """Migrate; return the completed counters (the CLI's completed event)."""
        events = _CallbackEvents(self._on_event)
        orch = Orchestrator(self.config, events, TestHooks(), self.dirty, self._pauser)
        return orch.run()


class _CallbackEvents(Events):
    """Events delivered to a callable instead of stdout."""

    def __init__(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        super().__init__("send", callback is not None)
        self._callback = callback

    def emit(self, event: str, **fields: Any) -> None:
        if self._callback is not None:
            self._callback({"event": event, "side": self.side, **fields})
