"""send's main process: set up, iterate passes, switch over, complete.

Main touches no page bytes; the channels do (send/channel.py). The orchestrator
only composes the pieces, each owning one concern:

- transports.py: where the pages go (tcp/unix, ssh, file:), chosen once;
- pool.py: the channel processes, and the flush and sync of every channel;
- passes.py: one epoch at a time; switchover.py: when to stop, and the final pass;
- steering.py: progress and the control socket; writer/guard.py: the writer's safety.

Cleanup is an ExitStack: each resource is registered as it is acquired and
released in reverse order, whatever fails. The writer is released first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import uuid
from typing import Any

from multifd_cli import wire as P
from multifd_cli.common.tables import table_digest, tree_digest
from multifd_cli.config import SendConfig, TestHooks
from multifd_cli.errors import EXIT_CONNECTION, ProtocolError, UsageError, WorkerFailed
from multifd_cli.events import Events, Stats
from multifd_cli.proc import logsetup
from multifd_cli.send.channel import SendChannelArgs
from multifd_cli.send.convergence import Estimator
from multifd_cli.send.dirty import Tracking, open_tracking
from multifd_cli.send.passes import Blocks, OldCopy, PassRunner
from multifd_cli.send.pool import ChannelPool
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.sources import Blob, open_source, source_names
from multifd_cli.send.state import MigrationState
from multifd_cli.send.steering import Steering
from multifd_cli.send.switchover import ConvergencePolicy, Switchover
from multifd_cli.send.tracker import DirtyLog, SourceTables
from multifd_cli.send.transports import Transport, open_transport
from multifd_cli.send.tree.source import open_tree
from multifd_cli.writer.guard import WriterGuard
from multifd_cli.writer.pause import Pauser, pids_in_cgroup, writers_of, writers_under

log = logging.getLogger("multifd")


class Orchestrator:
    """One migration of cfg.sources to cfg.to."""

    def __init__(
        self,
        cfg: SendConfig,
        events: Events,
        hooks: TestHooks,
        dirty_log: DirtyLog | None = None,
        pauser: Pauser | None = None,
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.hooks = hooks
        self.dirty_log = dirty_log
        self.session = uuid.uuid4().bytes
        self.heartbeat = max(0.05, min(1.0, cfg.timeout / 4))
        self.state = MigrationState(
            Stats(channels=cfg.channels, compression=cfg.compression.label),
            cfg.convergence.downtime_limit_ms,
        )
        self.blocks = Blocks([], [], cfg.page_size, cfg.packet_size)
        state = cfg.state
        if state.wanted:
            name = state.name or (os.path.basename(state.file) if state.file else "state")
            self.blocks.blobs.append(Blob(name, state.cmd, state.file))
        self.old_copy = OldCopy(self.blocks, self.state)
        self.limit = SharedRateLimit(cfg.convergence.max_bandwidth)
        self.estimator = Estimator(
            channels=cfg.channels, scan_is_free=dirty_log is not None,
            bandwidth_cap=float(cfg.convergence.max_bandwidth),
        )
        self.writer = WriterGuard(cfg.pause, cfg.after_success, pauser)
        self.steering = Steering(cfg, events, self.state, self.estimator, self.writer, self.limit)
        self.transport: Transport = open_transport(cfg, self._on_main_message)
        self.pool = ChannelPool(cfg.channels, self.heartbeat, self._watched, self._tick)
        self.tracking = Tracking()

    # -- the whole migration -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            self._open_sources(stack)
            self.tracking = open_tracking(self.cfg.convergence.tracker, self.blocks.sources,
                                          self.cfg.page_size, self.dirty_log is not None,
                                          self.estimator, self.blocks.tree)
            stack.callback(self.tracking.close)  # the tracefs instance, on every exit path
            self._warn_unpaused_writers()
            stack.enter_context(self.steering)
            transport = stack.enter_context(self.transport)
            transport.start()
            # Inside these two, on the way out: the progress line is cleared, then
            # the writer released, before anything else is closed or terminated.
            with self.writer, self.steering.showing_progress():
                try:
                    summary = self._run(stack)
                except BaseException as e:
                    transport.abort(e)
                    raise
        return summary

    def _run(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        blocks, state = self.blocks, self.state
        if blocks.tree is not None:
            state.sizes = [blocks.tree.total_bytes()]
        else:
            state.sizes = [s.size for s in blocks.sources] + [0] * len(blocks.blobs)
            blocks.tables = [
                SourceTables.create(f"send{i}", size, ps)
                for i, (size, ps) in enumerate(zip(state.sizes, blocks.page_sizes))
            ]
        self.old_copy.begin(state.sizes)
        stack.callback(_close_all, blocks.tables)
        config = self.transport.setup(blocks.sources, blocks.blobs, self.session, blocks.tree)
        self.old_copy.enabled = self.transport.resume
        if self.hooks.internal_error:
            raise RuntimeError("test-only internal error (MULTIFD_TEST_INTERNAL_ERROR)")
        self._start_channels(stack, config)
        state.stats.setup_done = time.monotonic()
        try:
            self._migrate()
        except WorkerFailed as e:
            # A channel's socket may close before the peer's ABORT is read.
            if e.exit_code == EXIT_CONNECTION:
                self.transport.raise_pending_abort()
            raise
        self.transport.confirm_success()
        self.writer.succeeded = True
        logsetup.hold_signals_from_now()
        return state.stats.summary()

    def _open_sources(self, stack: contextlib.ExitStack) -> None:
        blocks = self.blocks
        # The blobs first: their clean-up runs last, as it always did.
        for b in blocks.blobs:
            stack.callback(b.cleanup)
        blocks.tree = open_tree(self.cfg, self.hooks.stale_tree)
        if blocks.tree is not None:
            return
        for p, n in source_names(self.cfg.sources):
            src = open_source(p, n)
            stack.callback(os.close, src.fd)
            blocks.sources.append(src)
        taken = {s.name for s in blocks.sources}
        for b in blocks.blobs:
            if b.name in taken:
                raise UsageError(f"the state {b.name!r} has the name of a source")
            try:
                P.check_block_name(b.name)
            except ProtocolError as e:
                raise UsageError(f"--state-name {b.name!r}: {e.message}") from None

    def _warn_unpaused_writers(self) -> None:
        covered = set(self.cfg.pause.pids)
        if self.cfg.pause.cgroup:
            covered |= pids_in_cgroup(self.cfg.pause.cgroup)
        tree = self.blocks.tree
        if tree is not None and not self.cfg.pause.pause_cmd:
            others = [p for p in writers_under(os.fsdecode(tree.root)) if p not in covered]
            if others:
                log.warning("files in %s are open for writing by process %s, which no pause "
                            "mechanism covers", os.fsdecode(tree.root), ", ".join(map(str, others)))
        for src in self.blocks.sources:
            if src.is_block_device:
                continue
            others = [p for p in writers_of(src.path) if p not in covered]
            if others and not self.cfg.pause.pause_cmd:
                log.warning(
                    "%s is open for writing by process %s, which no pause mechanism covers",
                    src.path, ", ".join(map(str, others)),
                )

    def _start_channels(self, stack: contextlib.ExitStack, config: P.Config) -> None:
        cfg, blocks = self.cfg, self.blocks
        uri, image = self.transport.channel_target()
        args = SendChannelArgs(
            uri, self.session, config, cfg.compression,
            tuple(s.path for s in blocks.sources), tuple(blocks.tables),
            cfg.timeout, self.heartbeat, self.limit, cfg.security, cfg.reading.direct_io, image,
            identities=tuple(s.identity for s in blocks.sources),
            tree_root=blocks.tree.root if blocks.tree is not None else b"",
        )
        stack.enter_context(self.pool)

        def close_in_channel() -> list[Any]:
            # main's connection and the watchdog's pipe are main's alone
            return [conn for conn, _ in self.transport.watched()] + self.writer.inherited_ends()

        self.pool.start(args, close_in_channel, cfg.timeout)

    def _on_main_message(self, msg: P.Message) -> None:
        """What recv says mid-migration: old-copy hashes, and each closed epoch."""
        if isinstance(msg, P.EpochAck):
            log.debug("recv applied epoch %d: %d bytes written", msg.epoch, msg.written_bytes)
            # Delivered bandwidth, the bytes still in flight, recv's flush (convergence.py).
            self.estimator.on_ack(time.monotonic(), msg.epoch, msg.wire_bytes, msg.flush_us)
            return
        self.old_copy.on_main_message(msg)

    def _watched(self) -> list[Any]:
        return [*self.transport.watched(), *self.steering.watched()]

    def _tick(self) -> None:
        self.steering.tick()
        self.transport.tick(self.heartbeat)

    # -- passes -----------------------------------------------------------------------------------
    def _migrate(self) -> None:
        policy = ConvergencePolicy(self.cfg.convergence, self.state, self.estimator, self.writer,
                                   self.blocks, self.dirty_log,
                                   # recv acks epochs over the main connection, if there is one
                                   self.pool.poll if self.transport.watched() else None)
        runner = PassRunner(self.blocks, self.pool, self.transport, self.state, self.estimator,
                            self.events, self.dirty_log, self.old_copy,
                            lambda: self.writer.throttle.pct, self.tracking, policy.await_ack)
        policy.warn_if_scan_exceeds_limit()
        epoch = 0
        while True:
            epoch += 1
            policy.pass_starts()
            res = runner.run(epoch, full=epoch == 1)
            if policy.converged(epoch, res):
                break
            if self.hooks.between_passes:
                subprocess.run(self.hooks.between_passes, shell=True, check=True,
                               stdout=subprocess.DEVNULL)
        if self.writer.can_pause:
            switchover = Switchover(runner, self.writer, self.limit, self.estimator, self.state,
                                    self.events)
            epoch = switchover.run(epoch)
        elif policy.saw_changes:
            log.warning(
                "completed without pausing the writer: the copy is only as consistent "
                "as the writer was quiet during the last pass"
            )
        self._complete(epoch)

    def _complete(self, epoch: int) -> None:
        blocks, state = self.blocks, self.state
        state.phase = "completing"
        tree = blocks.tree
        if tree is not None:
            # After the final TIMES: directory modes and mtimes, deepest first, then
            # what recv's walk of its copy must match, then the pages' digest.
            self.transport.send_tree(epoch, tree.finish_ops())
            self.transport.send_manifest(tree.manifest(self.transport.owners))
            digest = tree_digest(self.pool.tree_digests(tree.files_by_channel(self.pool.count)))
        else:
            for src in blocks.sources:
                src.check_identity()  # what the last pass read is still what SRC names
            digest = table_digest(
                (size, t.page_hash, ps)
                for size, t, ps in zip(state.sizes, blocks.tables, blocks.page_sizes)
            )
        self.transport.complete(epoch, blocks.sources, state.sizes, digest)
        state.stats.finished = time.monotonic()
        self.pool.stop()
        state.stats.digest = digest.hex()


def _close_all(tables: list[SourceTables]) -> None:
    for t in tables:
        t.close()


def run(cfg: SendConfig, events: Events, hooks: TestHooks) -> dict[str, Any]:
    """Migrate cfg.sources to cfg.to; return the completed counters."""
    return Orchestrator(cfg, events, hooks).run()
