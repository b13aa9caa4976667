"""What several parts of send's main process read while one migration runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from multifd_cli.events import Stats


@dataclass
class MigrationState:
    """The live counters behind the pass events, `multifd status` and the progress line.

    The pass runner and the orchestrator write them; the steering side only reads
    them, except for the downtime limit, which `multifd set` may change.
    """

    stats: Stats
    downtime_limit_ms: float
    phase: str = "setup"  # setup, pass, switchover, completing
    pass_no: int = 0
    live_wire: int = 0  # bytes on the wire so far, including the running pass
    sizes: list[int] = field(default_factory=list)  # per block, as of the current epoch
