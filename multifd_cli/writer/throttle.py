"""--auto-converge: slow a writer that dirties faster than the link sends, as
QEMU's auto-converge does (a SIGSTOP duty cycle for PIDs, cpu.max for a cgroup)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from multifd_cli.writer.pause import PauseSpec, is_stopped
from multifd_cli.writer.watchdog import Watchdog

log = logging.getLogger("multifd")


class Throttle:
    """QEMU-style auto-converge: slow the writer by a growing duty cycle.

    PIDs get SIGSTOP for pct% of every 100 ms; a cgroup gets cpu.max.
    """

    PERIOD_S = 0.1
    INITIAL = 20
    STEP = 10
    MAX = 99

    def __init__(self, spec: PauseSpec, watchdog: Watchdog | None = None) -> None:
        self.spec = spec
        self.watchdog = watchdog
        self.pct = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_cpu_max: str | None = None
        self._pids: list[int] = []

    def step(self) -> int:
        """Throttle harder: 20 %, then +10 % per call, up to 99 %."""
        self.pct = self.INITIAL if self.pct == 0 else min(self.MAX, self.pct + self.STEP)
        start = bool(self.spec.pids) and self._thread is None
        if start:
            # A process someone else stopped is theirs: never cycle it.
            self._pids = [p for p in self.spec.pids if not is_stopped(p)]
        if self.spec.cgroup and self._old_cpu_max is None:
            self._old_cpu_max = self._read_cpu_max()
        # The watchdog learns what it may have to undo before the first SIGSTOP or
        # cpu.max write: a SIGKILL of main in between must not strand the writer.
        if self.watchdog is not None:
            self.watchdog.throttling(self._pids, self._old_cpu_max)
        if self.spec.cgroup:
            self._set_cpu_max()
        if start:
            self._thread = threading.Thread(target=self._cycle, name="throttle", daemon=True)
            self._thread.start()
        return self.pct

    def _read_cpu_max(self) -> str | None:
        try:
            with open(os.path.join(self.spec.cgroup, "cpu.max")) as f:
                return f.read().strip()
        except OSError as e:
            log.warning("cannot throttle %s through cpu.max: %s", self.spec.cgroup, e.strerror)
            return None

    def _set_cpu_max(self) -> None:
        if self._old_cpu_max is None:
            return  # unreadable, so it could not be restored: leave it alone
        path = os.path.join(self.spec.cgroup, "cpu.max")
        period = 100_000
        try:
            with open(path, "w") as f:
                f.write(f"{max(1000, period * (100 - self.pct) // 100)} {period}")
        except OSError as e:
            log.warning("cannot throttle %s through cpu.max: %s", self.spec.cgroup, e.strerror)

    def _cycle(self) -> None:
        pids = list(self._pids)
        while not self._stop.is_set():
            stop_for = self.PERIOD_S * self.pct / 100
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            self._stop.wait(stop_for)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self._stop.wait(self.PERIOD_S - stop_for)

    def stop(self) -> None:
        """Stop and join the cycle, so its SIGCONT cannot land during the final pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            for pid in self._pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self._pids = []
        if self._old_cpu_max is not None:
            with contextlib.suppress(OSError), open(os.path.join(self.spec.cgroup, "cpu.max"), "w") as f:
                f.write(self._old_cpu_max)
            self._old_cpu_max = None
        if self.watchdog is not None and self.pct:
            self.watchdog.throttle_off()
