"""send's main process: passes, flush, sync, completion.

Main touches no page bytes. Each pass it announces the epoch and the source
size on the main connection, hands chunk-aligned ranges to whichever channel is
free, then closes the epoch in two separate steps:

1. flush(): every client pushes what it still holds (the paged client's
   partial batch; a blob client has nothing to flush);
2. sync(): every channel sends its SYNC packet, and main sends EPOCH_END.

The orchestrator owns that one sync per epoch; no client ever syncs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shlex
import subprocess
import time
import uuid
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multifd_cli import wire as P
from multifd_cli.common.progress import Progress, Snapshot
from multifd_cli.common.tables import SharedTable, chunk_pages, pages_of, table_digest
from multifd_cli.compression import get_compressor, parse_spec
from multifd_cli.config import SendConfig, TestHooks, parse_rate
from multifd_cli.errors import (
    EXIT_CONNECTION,
    EXIT_SIGINT,
    Cancelled,
    ConvergeError,
    IOFailure,
    PeerAborted,
    ProtocolError,
    UsageError,
    VerifyError,
    WorkerFailed,
    exit_code_of,
    expect,
)
from multifd_cli.events import Events, Stats
from multifd_cli.net import handshake
from multifd_cli.net.connection import MainConnection
from multifd_cli.net.control import ControlServer, control_path
from multifd_cli.net.transport import connect, is_ssh_target, parse_uri
from multifd_cli.proc import logsetup, workers
from multifd_cli.send.channel import SendChannelArgs, channel_main
from multifd_cli.send.convergence import Estimator, PassSample
from multifd_cli.send.ratelimit import SharedRateLimit
from multifd_cli.send.sources import Blob, Source, open_source, read_metadata, source_names
from multifd_cli.send.tracker import DirtyLog, SourceTables
from multifd_cli.writer.pause import Pauser, pids_in_cgroup, writers_of
from multifd_cli.writer.throttle import Throttle
from multifd_cli.writer.watchdog import Watchdog

if TYPE_CHECKING:  # both are imported where used: most sessions need neither
    from multifd_cli.image.layout import ImageLayout
    from multifd_cli.net.ssh import RemoteRecv, SshTarget

log = logging.getLogger("multifd")

ITEM_BYTES = 8 << 20  # one work description covers this much of a block
IN_FLIGHT = 2  # work items queued per channel, so none idles between items
# mtime/ctime granularity can be a clock tick or more; a change within this
# window of the pass start might not move them, so the shortcut is not trusted.
MTIME_MARGIN_NS = 2_000_000_000


@dataclass
class PassResult:
    dirty_pages: int = 0
    zero_pages: int = 0
    read_bytes: int = 0
    wire_bytes: int = 0
    short_read: bool = False
    counts: P.Counts = field(default_factory=P.Counts)


class Orchestrator:
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
        self.image_path = cfg.to[len("file:"):] if cfg.to.startswith("file:") else ""
        self.ssh_target: SshTarget | None = None
        if is_ssh_target(cfg.to):
            from multifd_cli.net.ssh import parse_ssh_target

            self.ssh_target = parse_ssh_target(cfg.to)
        self.uri = parse_uri(cfg.to) if not (self.ssh_target or self.image_path) else None
        self.image_layout: ImageLayout | None = None
        self.image_fd = -1
        self.image_tmp = ""  # the hidden name the image is written under until complete
        self.present: list[SharedTable] = []  # file: transport, u8 per page
        self.remote: RemoteRecv | None = None
        self.auto = cfg.compression.strip().lower() == "auto"
        self.spec = parse_spec("none" if self.auto else cfg.compression)
        self.compressor = get_compressor(self.spec)
        self.heartbeat = max(0.05, min(1.0, cfg.timeout / 4))
        method = self.spec.name
        self.stats = Stats(
            channels=cfg.channels,
            compression="auto" if self.auto
            else method if method == "none" else f"{method}:{self.spec.effective_level}",
        )
        self.sources: list[Source] = []
        self.tables: list[SourceTables] = []
        self.main: MainConnection | None = None
        self.workers: list[workers.Worker] = []
        self.session = uuid.uuid4().bytes
        self.sizes: list[int] = []
        self.wire = [0] * cfg.channels  # bytes each channel put on the wire
        self.payload = [0] * cfg.channels  # and the page bytes behind them
        self._next_channel = 0
        self.resume = False
        self.covered: list[int] = [0]  # pages per block whose old-copy hashes arrived
        self.blobs: list[Blob] = []
        if cfg.state_cmd or cfg.state_file:
            name = cfg.state_name or (os.path.basename(cfg.state_file) if cfg.state_file else "state")
            self.blobs.append(Blob(name, cfg.state_cmd, cfg.state_file))

        self.limit = SharedRateLimit(cfg.max_bandwidth)
        self.estimator = Estimator(
            channels=cfg.channels, scan_is_free=dirty_log is not None,
            bandwidth_cap=float(cfg.max_bandwidth),
        )
        self.pauser = pauser or Pauser(cfg.pause)
        self.can_pause = cfg.pause.any or self.pauser.extra_pause is not None
        self.throttle = Throttle(cfg.pause)
        self.watchdog: Watchdog | None = None
        self.paused_at = 0.0
        self.succeeded = False
        self._saw_changes = False  # a later pass found dirty pages: someone writes
        self.downtime_limit_ms = cfg.downtime_limit_ms
        self.phase = "setup"
        self.live_wire = 0  # bytes on the wire so far, including the running pass
        self.pass_no = 0
        self.control: ControlServer | None = None
        self._cancel = False
        self.progress = Progress(events, tty=cfg.progress, json_interval=cfg.json_interval)

    @property
    def page_sizes(self) -> list[int]:
        """Per block: the page size, or the packet size for a blob's chunks."""
        return [self.cfg.page_size] * len(self.sources) + [self.cfg.packet_size] * len(self.blobs)

    # -- the whole migration -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.sources = [open_source(p, n) for p, n in source_names(self.cfg.sources)]
            taken = {s.name for s in self.sources}
            for b in self.blobs:
                if b.name in taken:
                    raise UsageError(f"the state {b.name!r} has the name of a source")
                try:
                    P.check_block_name(b.name)
                except ProtocolError as e:
                    raise UsageError(f"--state-name {b.name!r}: {e.message}") from None
            self._warn_unpaused_writers()
            if self.cfg.control:
                self.control = ControlServer(control_path(self.cfg.control), self._on_control)
            if self.ssh_target is not None:
                self._start_remote(self.ssh_target)
            if self.cfg.pause.any:
                self.watchdog = Watchdog(self.cfg.pause)
                self.pauser.on_intent = self.watchdog.paused
                self.pauser.on_command = self.watchdog.command
                self.throttle.watchdog = self.watchdog
            if self.image_path:
                self._open_image()
            else:
                self._connect()
            if self.hooks.internal_error:
                raise RuntimeError("test-only internal error (MULTIFD_TEST_INTERNAL_ERROR)")
            self._start_channels()
            self.stats.setup_done = time.monotonic()
            try:
                self._migrate()
            except WorkerFailed as e:
                # A channel's socket may close before the peer's ABORT is read.
                if e.exit_code == EXIT_CONNECTION and self.main is not None:
                    self.main.raise_pending_abort(0.5)
                raise
            if self.remote is not None:
                self.remote.relay_failure(self.cfg.timeout)
            self.succeeded = True
            logsetup.hold_signals_from_now()
            return self.stats.summary()
        except BaseException as e:
            code = exit_code_of(e)
            if self.main is not None and not isinstance(e, PeerAborted):
                self.main.abort(code, f"source: {e}")
            raise
        finally:
            self.progress.finish()
            self._release_writer()
            if self.remote is not None:
                self.remote.terminate()
            if self.control is not None:
                self.control.close()
            if self.workers:
                workers.terminate(self.workers)
            if self.main is not None:
                self.main.close()
            for t in self.tables:
                t.close()
            for p in self.present:
                p.close()
            if self.image_fd >= 0:
                os.close(self.image_fd)
            if self.image_tmp:
                from multifd_cli.image.writer import discard_image

                discard_image(self.image_tmp)
            for s in self.sources:
                os.close(s.fd)
            for b in self.blobs:
                b.cleanup()

    def _start_remote(self, target: SshTarget) -> None:
        """Start recv on the far side over ssh, then connect to it directly (rsync -e ssh)."""
        from multifd_cli.net.ssh import RemoteRecv

        cfg = self.cfg
        recv_args = ["--timeout", f"{cfg.timeout:g}", *cfg.remote_recv_args]
        ssh_words = shlex.split(cfg.ssh) if cfg.ssh else ["ssh"]
        self.remote = RemoteRecv.start(
            target, remote_command=cfg.remote_command or None, recv_args=recv_args,
            timeout=cfg.timeout, ssh=ssh_words[0], ssh_options=ssh_words[1:],
        )
        self.uri = self.remote.uri
        log.info("recv started on %s over ssh, listening at %s", target.host, self.uri)

    def _release_writer(self) -> None:
        """Never leave the writer paused or throttled, except after success if asked."""
        self.throttle.stop()
        keep = self.succeeded and self.cfg.after_success == "keep-paused"
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

    def _warn_unpaused_writers(self) -> None:
        covered = set(self.cfg.pause.pids)
        if self.cfg.pause.cgroup:
            covered |= pids_in_cgroup(self.cfg.pause.cgroup)
        for src in self.sources:
            if src.is_block_device:
                continue
            others = [p for p in writers_of(src.path) if p not in covered]
            if others and not self.cfg.pause.pause_cmd:
                log.warning(
                    "%s is open for writing by process %s, which no pause mechanism covers",
                    src.path, ", ".join(map(str, others)),
                )

    def _connect(self) -> None:
        cfg = self.cfg
        assert self.uri is not None
        sock = connect(self.uri, cfg.timeout)
        sock, conv = handshake.client(sock, P.ROLE_MAIN, self.session, cfg.timeout, cfg.security)
        self.main = main = MainConnection(sock, conv, cfg.timeout)
        self.config = P.Config(
            cfg.channels,
            P.COMPRESSION_AUTO if self.auto else self.compressor.wire_id,
            self.spec.effective_level,
            cfg.page_size,
            cfg.packet_size,
        )
        self.sizes = [s.size for s in self.sources] + [0] * len(self.blobs)
        self.covered = [0] * len(self.sizes)
        layout = P.Layout(
            tuple(P.BlockInfo(s.name, s.size, s.allocated) for s in self.sources)
            + tuple(P.BlockInfo(b.name, 0, 0, P.KIND_BLOB) for b in self.blobs)
        )
        main.send(self.config, layout)
        reply = main.receive(time.monotonic() + cfg.timeout)
        if not isinstance(reply, P.Accept):
            raise ProtocolError(f"setup: got {type(reply).__name__}, expected ACCEPT")
        self.tables = [
            SourceTables.create(f"send{i}", size, ps)
            for i, (size, ps) in enumerate(zip(self.sizes, self.page_sizes))
        ]
        self.resume = reply.resume
        if self.resume:
            log.info("the destination holds an old copy: pass 1 sends only what differs")
        for msg in main.drain():
            self._on_main_message(msg)

    def _open_image(self) -> None:
        """The file: transport: a fixed-offset image instead of a peer."""
        from multifd_cli.image.layout import ImageLayout
        from multifd_cli.image.writer import create_image

        cfg = self.cfg
        if self.blobs:
            raise UsageError("--state-cmd/--state-file cannot go into a file: image")
        if cfg.preserve:
            raise UsageError("--preserve is not kept in file: images")
        for src in self.sources:
            with contextlib.suppress(OSError):
                if os.path.samefile(self.image_path, src.path):
                    raise UsageError(f"the image {self.image_path} is the source {src.path}")
        self.config = P.Config(cfg.channels, 0, 0, cfg.page_size, cfg.packet_size)
        self.sizes = [s.size for s in self.sources]
        self.covered = [0] * len(self.sizes)
        self.image_layout = ImageLayout.plan(
            cfg.page_size, [(s.name, s.size, P.KIND_PAGES) for s in self.sources]
        )
        self.image_fd, self.image_tmp = create_image(self.image_path, self.image_layout)
        self.tables = [
            SourceTables.create(f"send{i}", s.size, cfg.page_size) for i, s in enumerate(self.sources)
        ]
        self.present = [
            SharedTable(f"present{i}", "B", pages_of(s.size, cfg.page_size))
            for i, s in enumerate(self.sources)
        ]

    def _start_channels(self) -> None:
        image = None
        if self.image_layout is not None:
            image = (self.image_tmp, self.image_layout, tuple(self.present))
        args = SendChannelArgs(
            self.uri,
            self.session,
            self.config,
            "auto" if self.auto else str(self.spec),
            tuple(s.path for s in self.sources),
            tuple(self.tables),
            self.cfg.timeout,
            self.heartbeat,
            self.limit,
            self.cfg.security,
            self.cfg.direct_io,
            image,
            identities=tuple(s.identity for s in self.sources),
        )
        self.workers = workers.start(
            self.cfg.channels, "send", channel_main, args_for=lambda i: (args,),
            close_for=lambda i: [
                *([self.main.sock] if self.main else []),
                *([self.watchdog.inherited_end()] if self.watchdog else []),
            ],
        )
        ready: set[int] = set()
        deadline = time.monotonic() + self.cfg.timeout
        while len(ready) < len(self.workers):
            if time.monotonic() > deadline:
                raise WorkerFailed("channels did not connect in time", 3, -1)
            for w, msg in self._poll():
                expect("channel report", msg[0], "ready")
                ready.add(w.index)

    def _poll(self) -> list[tuple[workers.Worker, tuple[Any, ...]]]:
        """Wait briefly for channel reports while watching the main connection
        and the control socket."""
        extras: list[Any] = [self.main] if self.main is not None else []
        if self.control is not None:
            extras.append(self.control)
        reports, ready = workers.poll(self.workers, extras, min(self.heartbeat, 0.25))
        for obj in ready:
            if obj is self.control:
                self.control.serve_ready()
            elif self.main is not None:
                for msg in self.main.read_available():
                    self._on_main_message(msg)
        if self._cancel:
            raise Cancelled("cancelled by `multifd cancel`", EXIT_SIGINT)
        if self.main is not None:
            self.main.heartbeat_if_idle(self.heartbeat)
            self.main.check_silence()
        if self.progress.due():
            self.progress.update(self._snapshot())
        return reports

    def _on_main_message(self, msg: P.Message) -> None:
        """Mid-migration, recv only streams the old copy's hashes (--resume)."""
        if not isinstance(msg, P.ResumeHashes) or not self.resume:
            raise ProtocolError(f"main connection: unexpected {P.event_name(msg)} mid-pass")
        b = msg.block
        if b >= len(self.tables):
            raise ProtocolError(f"RESUME_HASHES block: got {b}, expected < {len(self.tables)}")
        expect(f"RESUME_HASHES first page of block {b}", msg.first, self.covered[b])
        n = len(msg.hashes)
        total = pages_of(self.sizes[b], self.cfg.page_size)
        if msg.first + n > total:
            raise ProtocolError(f"RESUME_HASHES: pages up to {msg.first + n}, expected at most {total}")
        # What the destination holds stands in for "last sent": pass 1 then
        # compares page by page and sends only what differs.
        self.tables[b].page_hash.view[msg.first : msg.first + n] = array("Q", msg.hashes)
        self.covered[b] += n

    # -- what the user sees and steers ------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        est = self.estimator
        total = sum(self.sizes)
        rate = self.progress.rate(self.live_wire)
        expected = est.expected_downtime(total) if self.phase != "setup" else float("inf")
        eta = None
        if self.pass_no == 1 and rate > 0:
            eta = max(0.0, total - self.live_wire) / rate
        return Snapshot(
            self.phase, self.pass_no, self.live_wire, total, rate,
            est.remaining if est.passes else None,
            round(expected * 1000, 1) if expected != float("inf") else None, eta,
        )

    def status(self) -> dict[str, Any]:
        """What `multifd status` shows: query-migrate's counters and the estimates."""
        s = self.stats.summary()
        s.update(self._snapshot().fields())
        s.update(
            status="completed" if self.succeeded else ("setup" if self.phase == "setup" else "active"),
            transferred_bytes=self.live_wire,
            downtime_ms=s["downtime_ms"] if self.paused_at or self.succeeded else 0.0,
            dirty_rate_bytes_per_s=round(self.estimator.dirty_rate),
            throttle_pct=self.throttle.pct,
            downtime_limit_ms=self.downtime_limit_ms,
            max_bandwidth=int(self.limit.rate),
        )
        return s

    def _on_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "cancel":
            self._cancel = True
            return {"ok": True}
        if cmd == "set":
            param, value = req.get("param"), str(req.get("value", ""))
            if param == "max-bandwidth":
                rate = parse_rate(value)
                self.estimator.bandwidth_cap = float(rate)
                if not self.pauser.paused:  # the downtime always runs unlimited
                    self.limit.set_rate(rate)
                log.info("max-bandwidth set to %d bytes/s", rate)
                return {"ok": True}
            if param == "downtime-limit":
                try:
                    ms = float(value)
                except ValueError:
                    raise UsageError(f"downtime-limit {value!r}: expected milliseconds") from None
                if not math.isfinite(ms) or ms <= 0:
                    raise UsageError("downtime-limit must be a number of milliseconds above 0")
                self.downtime_limit_ms = ms
                log.info("downtime-limit set to %g ms", ms)
                return {"ok": True}
            raise UsageError(f"unknown parameter {param!r}: expected max-bandwidth or downtime-limit")
        raise UsageError(f"unknown command {cmd!r}: expected status, cancel or set")

    # -- passes ---------------------------------------------------------------------------------
    def _migrate(self) -> None:
        cfg = self.cfg
        size = sum(self.sizes)
        if self.can_pause and self.estimator.scan_seconds(size) > cfg.downtime_limit_ms / 1000:
            log.warning(
                "scanning %d bytes alone may take about %.0f ms, more than --downtime-limit %g ms: "
                "raise the limit, or track writes with the API tracker",
                size, self.estimator.scan_seconds(size) * 1000, cfg.downtime_limit_ms,
            )
        epoch = 0
        while True:
            epoch += 1
            keys = [s.stat_key() for s in self.sources]
            wall_start = time.time_ns()
            res = self._pass(epoch, full=epoch == 1)
            found = res.dirty_pages + res.zero_pages
            self._saw_changes |= epoch > 1 and found > 0
            if self.dirty_log is not None:
                self.estimator.pending_bytes = self.dirty_log.pending_bytes()
            expected = self.estimator.expected_downtime(sum(self.sizes))
            if not self.can_pause:
                if epoch > 1 and found == 0 and not res.short_read:
                    break  # a pass that found nothing to send confirms the copy
                # A device node's mtime does not move when its blocks are written.
                if (cfg.mtime_shortcut and self.dirty_log is None and not res.short_read
                        and not any(s.is_block_device for s in self.sources)
                        and self._unchanged(keys, wall_start)):
                    break
                if epoch >= cfg.max_passes:
                    raise ConvergeError(
                        f"still changing after {epoch} passes (--max-passes); "
                        "pause the writer (--pause-pid, --pause-cgroup, --pause-cmd) "
                        "or raise --max-passes"
                    )
            else:
                if expected <= self.downtime_limit_ms / 1000:
                    break
                if epoch >= cfg.max_passes:
                    if cfg.strict_downtime:
                        raise ConvergeError(
                            f"expected downtime {expected * 1000:.0f} ms is over --downtime-limit "
                            f"{self.downtime_limit_ms:g} ms after {epoch} passes (--strict-downtime)"
                        )
                    log.warning(
                        "reached --max-passes %d: switching over now; the downtime may exceed "
                        "%g ms (expected %.0f ms)", epoch, self.downtime_limit_ms, expected * 1000,
                    )
                    break
                if cfg.auto_converge and not self.estimator.converging():
                    pct = self.throttle.step()
                    log.info("auto-converge: throttling the writer to %d%%", 100 - pct)
            if self.hooks.between_passes:
                subprocess.run(self.hooks.between_passes, shell=True, check=True,
                               stdout=subprocess.DEVNULL)
        if self.can_pause:
            epoch = self._switchover(epoch)
        elif self._saw_changes:
            log.warning(
                "completed without pausing the writer: the copy is only as consistent "
                "as the writer was quiet during the last pass"
            )
        self._complete(epoch)

    def _switchover(self, epoch: int) -> int:
        """Pause, run the final pass, and check nothing else wrote meanwhile."""
        self.throttle.stop()
        self.phase = "switchover"
        self.limit.set_rate(0)  # the downtime runs at full speed
        expected = self.estimator.expected_downtime(sum(self.sizes))
        self.events.emit(
            "switchover", **{"pass": epoch + 1},
            expected_downtime_ms=round(expected * 1000, 1) if math.isfinite(expected) else None,
            remaining_bytes=self.estimator.remaining,
        )
        self.paused_at = time.monotonic()
        self.pauser.pause()
        self.stats.paused = True
        log.info("writer paused; final pass")
        for b in self.blobs:
            b.produce()
        keys = [s.stat_key() for s in self.sources]
        epoch += 1
        res = self._pass(epoch, full=False, final=True)
        if [s.stat_key() for s in self.sources] != keys or res.short_read:
            raise IOFailure(
                "the source changed during the final pass although the writer was paused: "
                "another process writes to it (pause it too)"
            )
        return epoch

    def _pass(self, epoch: int, full: bool, final: bool = False) -> PassResult:
        """One epoch: announce it, scan and send, flush, sync, report."""
        cfg = self.cfg
        for src in self.sources:
            src.check_identity()
        sizes = [s.current_size() for s in self.sources] + [b.size for b in self.blobs]
        pass_start = time.monotonic()
        self.pass_no = epoch
        if not final:
            self.phase = "pass"
        if not final:
            self.stats.final_pass_started = pass_start
        else:
            self.stats.final_pass_started = self.paused_at
        self._begin_epoch(epoch, sizes)
        wire_before = sum(self.wire)
        res = self._run_pass(epoch, full)
        sync_start = time.monotonic()
        # The one order that closes an epoch: pages.flush(), then blob.send(), then
        # sync(). The blob client never flushes and never syncs on its own.
        self.flush()
        if final:
            self.send_blobs(epoch)
        res.counts = self.sync(epoch)
        now = time.monotonic()
        res.wire_bytes = sum(self.wire) - wire_before
        self.stats.passes = epoch
        self.stats.normal_pages += res.counts.normal
        self.stats.zero_pages += res.counts.zero
        self.estimator.end_pass(
            PassSample(epoch, pass_start, now - pass_start,
                       (res.dirty_pages + res.zero_pages) * cfg.page_size, res.wire_bytes,
                       res.read_bytes, now - sync_start)
        )
        est = self.estimator
        if self.dirty_log is not None:
            est.pending_bytes = self.dirty_log.pending_bytes()
        expected = est.expected_downtime(sum(self.sizes))
        self.events.emit(
            "pass", **{"pass": epoch},
            dirty_bytes=res.dirty_pages * cfg.page_size,
            sent_bytes=res.wire_bytes,
            normal_pages=res.counts.normal,
            zero_pages=res.counts.zero,
            duration_ms=round((now - pass_start) * 1000, 1),
            bandwidth_bytes_per_s=round(est.bandwidth),
            dirty_rate_bytes_per_s=round(est.dirty_rate),
            remaining_bytes=est.remaining,
            expected_downtime_ms=round(expected * 1000, 1) if expected != float("inf") else None,
            throttle_pct=self.throttle.pct,
            final=final,
        )
        log.info(
            "pass %d: %d dirty pages, %d zero pages, %d bytes sent in %.0f ms",
            epoch, res.dirty_pages, res.zero_pages, res.wire_bytes, (now - pass_start) * 1000,
        )
        return res

    def _unchanged(self, keys: list[tuple[int, int, int]], wall_start: int) -> bool:
        """Size, mtime and ctime unchanged since the pass began, and old enough to trust.

        Writes through a shared mmap need not update mtime, which is why
        --no-mtime-shortcut exists.
        """
        for src, before in zip(self.sources, keys):
            if src.stat_key() != before:
                return False
            if wall_start - max(before[1], before[2]) < MTIME_MARGIN_NS:
                return False
        return True

    def _begin_epoch(self, epoch: int, sizes: list[int]) -> None:
        if self.image_layout is not None:
            for b, new in zip(self.image_layout.blocks, sizes):
                if new > b.capacity * self.cfg.page_size:
                    raise IOFailure(
                        f"{b.name} grew past its size at the start ({new} bytes); "
                        "a file: image has a fixed layout"
                    )
        for i, (old, new) in enumerate(zip(self.sizes, sizes)):
            if old != new:
                if i < len(self.sources):
                    log.info("%s changed size: %d -> %d bytes", self.sources[i].path, old, new)
                self.tables[i].resize(old, new, self.page_sizes[i])
                if self.dirty_log is not None and new > old:
                    self.dirty_log.mark_dirty(old, new - old, block=i)
        self.sizes = sizes
        if self.main is not None:
            self.main.send(P.EpochStart(epoch, tuple(sizes)))

    def _work_items(self, full: bool) -> deque[tuple[int, int, int]]:
        """Chunk-aligned ranges: at most ITEM_BYTES, and small enough that every
        channel gets several per pass, so a slow channel cannot hold up the pass."""
        ps = self.cfg.page_size
        cp = chunk_pages(ps)
        total_pages = sum(pages_of(size, ps) for size in self.sizes[: len(self.sources)])
        per_item = min(ITEM_BYTES // ps, total_pages // (8 * len(self.workers)))
        step = max(cp, per_item // cp * cp)
        items: deque[tuple[int, int, int]] = deque()
        if self.dirty_log is not None and not full:
            # The API tracker: only chunks the application marked, merged into runs.
            for b, chunks in sorted(self.dirty_log.take().items()):
                n = pages_of(self.sizes[b], ps)
                run_start = run_end = -1
                for c in chunks + [-2]:
                    if c == run_end and run_end - run_start < step // cp:
                        run_end += 1
                        continue
                    if run_start >= 0 and run_start * cp < n:
                        items.append((b, run_start * cp, min(n, run_end * cp)))
                    run_start, run_end = c, c + 1
            return items
        for b, size in enumerate(self.sizes[: len(self.sources)]):
            n = pages_of(size, ps)
            for start in range(0, n, step):
                items.append((b, start, min(n, start + step)))
        return items

    def _run_pass(self, epoch: int, full: bool) -> PassResult:
        """Hand every range to whichever channel is free; gather what they found.

        The round-robin start carries over between passes, as QEMU's does, so
        a range need not travel on the same channel twice: only the barrier
        keeps an older copy from landing last.
        """
        if self.dirty_log is not None and full:
            self.dirty_log.take()  # the full pass covers everything marked so far
        items = self._work_items(full)
        res = PassResult()
        n = len(self.workers)
        outstanding = [0] * n
        next_id = 0
        # With --resume, pass 1 compares against the old copy, range by range
        # as its hashes arrive, instead of sending everything.
        seeded = full and self.resume
        if seeded:
            full = False
        while items or any(outstanding):
            for _ in range(n):
                w = self.workers[self._next_channel]
                self._next_channel = (self._next_channel + 1) % n
                ready = items and (not seeded or items[0][2] <= self.covered[items[0][0]])
                if ready and outstanding[w.index] < IN_FLIGHT:
                    b, start, end = items.popleft()
                    w.send("work", next_id, epoch, b, start, end, self.sizes[b], full, seeded)
                    next_id += 1
                    outstanding[w.index] += 1
            for w, msg in self._poll():
                expect("channel report", msg[0], "done")
                s = msg[2]
                outstanding[w.index] -= 1
                res.dirty_pages += s["dirty_pages"]
                res.zero_pages += s["zero_pages"]
                res.read_bytes += s["read_bytes"]
                res.short_read |= s["short_read"]
                self.live_wire += s["wire_bytes"]
                self.estimator.on_sent(time.monotonic(), s["wire_bytes"])
        return res

    def flush(self) -> None:
        """Every client pushes out what it still holds; nothing is synced here."""
        for w in self.workers:
            w.send("flush")
        self._gather("flushed")

    def send_blobs(self, epoch: int) -> None:
        """Each blob goes whole, in packet-size chunks spread over the channels."""
        pending = 0
        for i, blob in enumerate(self.blobs):
            block = len(self.sources) + i
            chunks = pages_of(blob.size, self.cfg.packet_size)
            per = max(1, -(-chunks // len(self.workers)))
            for w, start in zip(itertools.cycle(self.workers), range(0, chunks, per)):
                w.send("blob", epoch, block, blob.produced, start, min(chunks, start + per),
                       blob.size)
                pending += 1
        while pending:
            for _, msg in self._poll():
                expect("channel report", msg[0], "blob-sent")
                pending -= 1

    def sync(self, epoch: int) -> P.Counts:
        """Close the epoch: a SYNC packet on every channel, then EPOCH_END on main.

        With the file: transport the same gather is the source's own barrier: no
        page of pass k+1 is written before every channel finished pass k.
        """
        for w in self.workers:
            w.send("sync", epoch)
        total = P.Counts()
        for w, msg in self._gather("synced"):
            total += P.Counts(*msg[2])
            self.wire[w.index] = msg[3]
            self.payload[w.index] = msg[4]
        self.stats.payload_bytes = sum(self.payload)
        self.stats.transferred_bytes = self.live_wire = sum(self.wire)
        if self.main is not None:
            self.main.send(P.EpochEnd(epoch, total))
        return total

    def _gather(self, what: str) -> list[tuple[workers.Worker, tuple[Any, ...]]]:
        got: dict[int, tuple[workers.Worker, tuple[Any, ...]]] = {}
        while len(got) < len(self.workers):
            for w, msg in self._poll():
                expect("channel report", msg[0], what)
                got[w.index] = (w, msg)
        return list(got.values())

    # -- completion -------------------------------------------------------------------------------
    def _complete(self, epoch: int) -> None:
        self.phase = "completing"
        for src in self.sources:
            src.check_identity()  # what the last pass read is still what SRC names
        if self.image_layout is not None:
            from multifd_cli.image.writer import complete_image

            digest = table_digest(
                (size, t.page_hash, self.cfg.page_size) for size, t in zip(self.sizes, self.tables)
            )
            complete_image(self.image_fd, self.image_tmp, self.image_path, self.image_layout,
                           self.sizes, self.present, digest)
            self.image_tmp = ""  # renamed to the image: nothing to discard
            self.stats.finished = time.monotonic()
            workers.stop(self.workers)
            self.workers = []
            self.stats.digest = digest.hex()
            return
        assert self.main is not None
        if self.cfg.preserve:
            for i, src in enumerate(self.sources):
                self.main.send(read_metadata(i, src))
        digest = table_digest(
            (size, t.page_hash, ps) for size, t, ps in zip(self.sizes, self.tables, self.page_sizes)
        )
        self.main.send(P.Digest(epoch, digest))
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            msg = self.main.receive(deadline)
            if isinstance(msg, P.Complete):
                break
            raise ProtocolError(f"completion: got {type(msg).__name__}, expected COMPLETE")
        if msg.digest != digest:
            raise VerifyError(f"digest: destination reported {msg.digest.hex()}, expected {digest.hex()}")
        self.stats.finished = time.monotonic()
        workers.stop(self.workers)
        self.workers = []
        self.stats.digest = digest.hex()


def run(cfg: SendConfig, events: Events, hooks: TestHooks) -> dict[str, Any]:
    """Migrate cfg.sources to cfg.to; return the completed counters."""
    return Orchestrator(cfg, events, hooks).run()
