"""recv's main process: accept one session, run the epoch barrier, complete.

Main never touches page bytes. It accepts the connections, checks what the
source declares, forks one channel per channel connection, releases the
channels epoch by epoch, and at the end compares digests and names the file.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from multifd_cli import wire as P
from multifd_cli.common.progress import Progress, Snapshot
from multifd_cli.common.tables import pages_of, table_digest
from multifd_cli.compression import by_wire_id
from multifd_cli.config import RecvConfig, TestHooks
from multifd_cli.errors import (
    EXIT_CONNECTION,
    ConnectionFailed,
    MultifdError,
    ProtocolError,
    Timeout,
    VerifyError,
    WorkerFailed,
    exit_code_of,
    expect,
)
from multifd_cli.events import Events, Stats
from multifd_cli.net import handshake
from multifd_cli.net.connection import MainConnection
from multifd_cli.net.transport import Uri, listen, parse_uri, tune
from multifd_cli.proc import logsetup, workers
from multifd_cli.recv.channel import RecvChannelArgs, channel_main
from multifd_cli.recv.sink import HOLE_BIT, Destination, DestTables

log = logging.getLogger("multifd")


@dataclass
class EpochState:
    sizes: tuple[int, ...] = ()
    started: float = 0.0
    end: P.EpochEnd | None = None
    synced: dict[int, P.Counts] = field(default_factory=dict)


class Receiver:
    def __init__(self, cfg: RecvConfig, events: Events, hooks: TestHooks) -> None:
        self.cfg = cfg
        self.events = events
        self.hooks = hooks
        self.heartbeat = max(0.05, min(1.0, cfg.timeout / 4))
        self.stats = Stats()
        self.dest = Destination(
            cfg.dest, force=cfg.force, keep_partial=cfg.keep_partial, resume=cfg.resume
        )
        self.uri: Uri = parse_uri(cfg.listen)
        self.lsock: socket.socket | None = None
        self.real_uri: Uri | None = None
        self.main: MainConnection | None = None
        self.workers: list[workers.Worker] = []
        self.config: P.Config | None = None
        self.sizes: tuple[int, ...] = ()
        self.progress = Progress(events, tty=cfg.progress, json_interval=cfg.json_interval)
        self._early: list[P.Message] = []  # main-connection messages read while hashing
        self._greeted: list[tuple[socket.socket, P.Hello, P.Conversation]] = []  # from handshake threads
        self._wake_r, self._wake_w = os.pipe()  # handshake threads wake the accept loop
        self.tables: list[DestTables] = []
        self.page_sizes: tuple[int, ...] = ()
        self.layout = P.Layout(())
        self.metadata: dict[int, P.Metadata] = {}
        self.blobs: list[dict[str, object]] = []

    # -- the whole session ------------------------------------------------------------
    def run(self) -> dict[str, object]:
        try:
            self.dest.check()
            self.dest.lock()
            self.lsock, self.real_uri = listen(self.uri)
            self.events.emit("listening", uri=str(self.real_uri))
            log.info("listening on %s", self.real_uri)
            deadline = time.monotonic() + self.cfg.timeout
            self.events.stream.flush()
            self._accept_session(deadline)
            socks = self._accept_channels(deadline)
            self._close_listener()
            self._start_channels(socks)
            if self.dest.in_place is not None:
                self._hash_old_copy()
            self.stats.setup_done = time.monotonic()
            try:
                self._serve()
            except WorkerFailed as e:
                if e.exit_code == EXIT_CONNECTION and self.main is not None:
                    self.main.raise_pending_abort(0.5)
                raise
            summary = self.stats.summary()
            del summary["paused"]  # only send knows whether it paused the writer
            if self.blobs:
                summary["blobs"] = self.blobs
            return summary
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self.progress.finish()
            self._close_listener()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            for t in self.tables:
                t.close()
            self.dest.close()

    def _fail(self, e: BaseException) -> None:
        code = exit_code_of(e)
        if self.main is not None:
            self.main.abort(code, f"destination: {e}")
        if self.workers:
            workers.terminate(self.workers)
            self.workers = []
        self.dest.discard()

    def _close_listener(self) -> None:
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None
            if self.uri.scheme == "unix":
                try:
                    os.unlink(self.uri.path)
                except OSError:
                    pass

    # -- handshake ------------------------------------------------------------------------
    def _accept(
        self, deadline: float, watch: MainConnection | None = None
    ) -> tuple[socket.socket, P.Hello, P.Conversation]:
        """Accept the next connection that says HELLO; drop anything else.

        Each handshake runs in its own thread, so a peer that connects and then
        says nothing (a half-open socket, a slow scanner) delays no one else.
        While channels connect, the main connection is watched too, so an ABORT
        from the source ends the wait at once.
        """
        assert self.lsock is not None
        while True:
            if self._greeted:
                return self._greeted.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                what = "the channels did not connect" if watch else "no session started"
                raise Timeout(f"{what} within {self.cfg.timeout:g} s (--timeout)")
            ready = wait([self.lsock, self._wake_r, *([watch.sock] if watch else [])], left)
            if watch is not None and watch.sock in ready:
                self._early.extend(watch.read_available())
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if self.lsock in ready:
                conn, peer = self.lsock.accept()
                hs_deadline = min(deadline, time.monotonic() + min(10.0, self.cfg.timeout))
                threading.Thread(
                    target=self._greet, args=(conn, peer, hs_deadline), daemon=True
                ).start()

    def _greet(self, conn: socket.socket, peer: object, deadline: float) -> None:
        """A handshake thread: HELLO (and TLS, and the key proof) or drop."""
        try:
            tune(conn)
            result = handshake.server(conn, deadline, self.cfg.security)
        except MultifdError as e:
            log.warning("dropped a connection from %s: %s", peer or "a local peer", e)
            conn.close()
        except OSError as e:
            log.warning("dropped a connection from %s: %s", peer or "a local peer", e)
            conn.close()
        else:
            self._greeted.append(result)
        finally:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _accept_session(self, deadline: float) -> None:
        while True:
            conn, hello, conv = self._accept(deadline)
            if hello.role != P.ROLE_MAIN:
                log.warning("dropped channel %d: it arrived before any session", hello.role)
                conn.close()
                continue
            main = MainConnection(conn, conv, self.cfg.timeout)
            self.main = main  # so a protocol error in CONFIG or LAYOUT is answered with ABORT
            try:
                main.send(P.Welcome(P.VERSION, hello.session))
                setup_deadline = min(deadline, time.monotonic() + min(10.0, self.cfg.timeout))
                cfg = main.receive(setup_deadline)
                layout = main.receive(setup_deadline)
            except (ConnectionFailed, Timeout) as e:
                # No session yet: a source that went away, or never said more,
                # is dropped like any bad connection, and recv keeps listening.
                log.warning("dropped a session start: %s", e)
                main.close()
                self.main = None
                continue
            break
        self.session = hello.session
        self.main = main
        if not isinstance(cfg, P.Config) or not isinstance(layout, P.Layout):
            raise ProtocolError("setup: expected CONFIG then LAYOUT")
        P.check_config(cfg, max_channels=self.cfg.max_channels)
        if cfg.compression != P.COMPRESSION_AUTO:
            by_wire_id(cfg.compression, cfg.level)  # an unknown method fails here, not mid-copy
        self.dest.plan([(b.name, b.size, b.allocated, b.kind) for b in layout.blocks])
        self.config = cfg
        self.layout = layout
        self.sizes = tuple(b.size for b in layout.blocks)
        # A blob's "pages" are packet-size chunks; everything else is paged.
        self.page_sizes = tuple(
            cfg.packet_size if b.kind == P.KIND_BLOB else cfg.page_size for b in layout.blocks
        )
        self.dest.create()
        self.tables = [
            DestTables.create(f"recv{i}", b.size, ps)
            for i, (b, ps) in enumerate(zip(layout.blocks, self.page_sizes))
        ]
        self.stats.channels = cfg.channels
        if cfg.compression == P.COMPRESSION_AUTO:
            self.stats.compression = "auto"
        else:
            method = by_wire_id(cfg.compression, cfg.level).name
            self.stats.compression = method if method == "none" else f"{method}:{cfg.level}"
        main.send(P.Accept(P.ACCEPT_RESUME if self.dest.in_place else 0))
        log.info(
            "session %s: %d channels, %d-byte pages, %d block(s), %d bytes",
            self.session.hex()[:8], cfg.channels, cfg.page_size, len(layout.blocks),
            sum(self.sizes),
        )

    def _accept_channels(self, deadline: float) -> dict[int, socket.socket]:
        assert self.config is not None
        socks: dict[int, socket.socket] = {}
        while len(socks) < self.config.channels:
            conn, hello, conv = self._accept(deadline, watch=self.main)
            problem = ""
            if hello.session != self.session:
                problem = f"session {hello.session.hex()[:8]}, expected {self.session.hex()[:8]}"
            elif hello.role >= self.config.channels:
                problem = f"channel id {hello.role}, expected 0..{self.config.channels - 1}"
            elif hello.role in socks:
                problem = f"duplicate channel id {hello.role}"
            if problem:
                log.warning("dropped a connection: %s", problem)
                conn.close()
                continue
            handshake.welcome(conn, conv, self.session)
            socks[hello.role] = conn
        return socks

    def _start_channels(self, socks: dict[int, socket.socket]) -> None:
        assert self.config is not None and self.tables is not None and self.main is not None
        args = RecvChannelArgs(
            self.config, self.dest.fds, tuple(self.tables), self.cfg.timeout, self.hooks,
            new_file=self.dest.new_file, page_sizes=self.page_sizes,
            shadow_fd=self.dest.shadow_fd,
        )
        n = self.config.channels
        others = [self.main.sock] + ([self.lsock] if self.lsock else [])
        self.workers = workers.start(
            n,
            "recv",
            channel_main,
            args_for=lambda i: (socks[i], args),
            close_for=lambda i: [*others, *(s for j, s in socks.items() if j != i)],
        )
        for s in socks.values():
            s.close()

    # -- the epochs ---------------------------------------------------------------------------
    def _hash_old_copy(self) -> None:
        """--resume: the channels hash what DEST holds, range by range, and main
        streams each range's hashes to the source in page order as it completes,
        so the source can start comparing before the whole file is hashed."""
        assert self.main is not None and self.config is not None
        main = self.main
        ps = self.config.page_size
        size = self.sizes[0]
        n = pages_of(size, ps)
        step = min(P.MAX_RESUME_HASHES, max(1, (8 << 20) // ps))
        ranges = deque((s, min(n, s + step)) for s in range(0, n, step))
        done: dict[int, int] = {}
        outstanding = [0] * len(self.workers)
        sent_upto = 0
        t0 = time.monotonic()
        while sent_upto < n:
            for w in self.workers:
                while ranges and outstanding[w.index] < 2:
                    start, end = ranges.popleft()
                    w.send("hash", 0, start, end, size)
                    outstanding[w.index] += 1
            reports, ready = workers.poll(self.workers, [main], min(self.heartbeat, 0.25))
            for w, r in reports:
                if r[0] == "hashed":
                    outstanding[w.index] -= 1
                    done[r[2]] = r[3]
            while sent_upto in done:
                end = done.pop(sent_upto)
                view = self.tables[0].page_hash.view
                main.send(P.ResumeHashes(0, sent_upto, tuple(view[sent_upto:end])))
                sent_upto = end
            if ready:
                self._early.extend(main.read_available())
            main.heartbeat_if_idle(self.heartbeat)
        log.info("hashed the old copy (%d pages) in %.0f ms", n, (time.monotonic() - t0) * 1000)

    def _serve(self) -> None:
        assert self.main is not None and self.config is not None
        main = self.main
        n = self.config.channels
        epochs: dict[int, EpochState] = {}
        chan_epoch = [0] * n  # last epoch each channel was released into
        running = [False] * n
        done = 0  # last epoch applied by every channel and closed by EPOCH_END
        digest: P.Digest | None = None
        wire = [0] * n
        written = [0] * n
        pending = list(main.drain()) + self._early
        while True:
            for msg in pending:
                if isinstance(msg, P.EpochStart):
                    expect("epoch", msg.epoch, max(epochs, default=0) + 1)
                    expect("block count", len(msg.sizes), len(self.sizes))
                    epochs[msg.epoch] = EpochState(msg.sizes, time.monotonic())
                elif isinstance(msg, P.EpochEnd):
                    st = epochs.get(msg.epoch)
                    if st is None:
                        raise ProtocolError(f"EPOCH_END for epoch {msg.epoch} that never started")
                    st.end = msg
                elif isinstance(msg, P.Digest):
                    digest = msg
                elif isinstance(msg, P.Metadata):
                    if msg.block >= len(self.sizes):
                        raise ProtocolError(f"METADATA block: got {msg.block}, expected < {len(self.sizes)}")
                    self.metadata[msg.block] = msg
                else:
                    raise ProtocolError(f"main connection: unexpected {type(msg).__name__}")
            pending = []
            # Release channels. With the barrier, epoch k+1 opens only once every
            # channel applied all of epoch k; the test-only switch releases each
            # channel as soon as it alone is done.
            for c in range(n):
                k = chan_epoch[c] + 1
                if running[c] or k not in epochs:
                    continue
                if not self.hooks.no_barrier and done < k - 1:
                    continue
                if self.sizes != epochs[k].sizes:
                    self._resize(epochs[k].sizes)
                self.workers[c].send("release", k, epochs[k].sizes)
                chan_epoch[c] = k
                running[c] = True
            # Close an epoch once all channels synced it and EPOCH_END arrived.
            k = done + 1
            st = epochs.get(k)
            if st is not None and st.end is not None and len(st.synced) == n:
                total = sum(st.synced.values(), P.Counts())
                expect(f"epoch {k} totals", total, st.end.counts)
                done = k
                self.stats.passes = k
                self.stats.normal_pages += total.normal
                self.stats.zero_pages += total.zero
                self.stats.transferred_bytes = sum(wire)
                self.stats.payload_bytes = sum(written)
                self.dest.background_flush()
                self.events.emit(
                    "pass", **{"pass": k}, normal_pages=total.normal, zero_pages=total.zero,
                    packets=total.packets, transferred_bytes=sum(wire),
                    duration_ms=round((time.monotonic() - st.started) * 1000, 1),
                )
                continue
            if digest is not None and digest.epoch == done and done == max(epochs, default=0):
                self.stats.final_pass_started = epochs[done].started
                self._complete(digest, sum(written))
                return
            reports, ready = workers.poll(self.workers, [main], min(self.heartbeat, 0.25))
            for w, r in reports:
                if r[0] == "progress":
                    _, wire[w.index], written[w.index] = r
                    continue
                if r[0] != "synced":
                    raise ProtocolError(f"channel report: got {r[0]!r}")
                _, epoch, counts, wire[w.index], written[w.index] = r
                expect(f"channel {w.index} sync epoch", epoch, chan_epoch[w.index])
                epochs[epoch].synced[w.index] = P.Counts(*counts)
                running[w.index] = False
            if ready:
                pending = main.read_available()
            main.heartbeat_if_idle(self.heartbeat)
            main.check_silence()
            if self.progress.due():
                sent = sum(wire)
                self.progress.update(Snapshot(
                    "pass", max(chan_epoch), sent, sum(self.sizes), self.progress.rate(sent)
                ))

    def _resize(self, sizes: tuple[int, ...]) -> None:
        for i, (old, new) in enumerate(zip(self.sizes, sizes)):
            if old == new:
                continue
            if self.layout.blocks[i].kind == P.KIND_PAGES:
                log.info("%s changed size: %d -> %d bytes", self.layout.blocks[i].name, old, new)
            self.dest.resize(i, new)
            self.tables[i].resize(old, new, self.page_sizes[i])
        self.sizes = sizes

    def _complete(self, digest: P.Digest, written: int) -> None:
        assert self.main is not None and self.config is not None
        ours = table_digest(zip(self.sizes, (t.page_hash for t in self.tables), self.page_sizes))
        if ours != digest.digest:
            raise VerifyError(
                f"digest: got {digest.digest.hex()} from the source, "
                f"computed {ours.hex()} from what was written"
            )
        self._check_blobs(digest.epoch)
        self.dest.finalize(self.metadata)
        logsetup.hold_signals_from_now()  # DEST is complete and named: this run succeeded
        self.main.send(P.Complete(ours, written))
        workers.stop(self.workers)
        self.workers = []
        self.stats.digest = ours.hex()
        self.stats.finished = time.monotonic()
        log.info("verified and completed %s", self.dest.path)

    def _check_blobs(self, final: int) -> None:
        """Every blob must have arrived whole in the final epoch, after the pause."""
        for i, b in enumerate(self.layout.blocks):
            if b.kind != P.KIND_BLOB:
                continue
            n = pages_of(self.sizes[i], self.page_sizes[i])
            stamps = self.tables[i].stamp.view[:n].tolist()
            late = [s & ~HOLE_BIT for s in stamps if s & ~HOLE_BIT != final]
            if late:
                raise VerifyError(
                    f"blob {b.name}: {len(late)} of {n} chunks not sent in the final epoch {final}"
                )
            self.blobs.append({"name": b.name, "bytes": self.sizes[i], "epoch": final})


def run(cfg: RecvConfig, events: Events, hooks: TestHooks) -> dict[str, object]:
    """Serve one session into cfg.dest; return the completed counters."""
    try:
        return Receiver(cfg, events, hooks).run()
    except ConnectionResetError as e:
        raise ConnectionFailed(f"connection reset: {e}") from None
