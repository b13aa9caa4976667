"""recv's main process: accept one session, run its epochs, complete.

Main never touches page bytes. It accepts the connections, checks what the
source declares, forks one channel per channel connection, hands the epochs to
the epoch loop (recv/epochs.py, around the barrier of recv/barrier.py), and at
the end compares digests and names the file. A directory tree (one KIND_TREE
block) is staged beside DEST instead (recv/treedest.py) and verified by its manifest
as well as its pages' digest before it becomes DEST in one rename.
"""

from __future__ import annotations

import logging
import socket
import time

from multifd_cli import wire as P
from multifd_cli.common.progress import Progress
from multifd_cli.common.tables import tree_digest
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
)
from multifd_cli.events import Events, Stats
from multifd_cli.net import handshake
from multifd_cli.net.connection import MainConnection
from multifd_cli.net.transport import parse_uri
from multifd_cli.proc import logsetup, workers
from multifd_cli.recv import messages as M
from multifd_cli.recv.barrier import barrier_for
from multifd_cli.recv.blocks import Blocks
from multifd_cli.recv.channel import RecvChannelArgs, channel_main
from multifd_cli.recv.epochs import EpochLoop
from multifd_cli.recv.listener import Listener
from multifd_cli.recv.resume import hash_old_copy
from multifd_cli.recv.sink import Destination
from multifd_cli.recv.treedest import TreeDest, check_tree_dest
from multifd_cli.recv.treeorder import TreeOrder

log = logging.getLogger("multifd")


class Receiver:
    """One session, from listening to a verified, named DEST (or a clean failure)."""

    def __init__(self, cfg: RecvConfig, events: Events, hooks: TestHooks) -> None:
        self.cfg = cfg
        self.events = events
        self.hooks = hooks
        self.heartbeat = max(0.05, min(1.0, cfg.timeout / 4))
        self.stats = Stats()
        self.dest = Destination(
            cfg.dest, force=cfg.force, keep_partial=cfg.keep_partial, resume=cfg.resume
        )
        self.listener = Listener(parse_uri(cfg.listen), cfg.security, cfg.timeout)
        self.main: MainConnection | None = None
        self.session = b""
        self.config: P.Config | None = None
        self.blocks: Blocks | None = None
        self.workers: list[workers.Worker] = []
        self.progress = Progress(events, tty=cfg.progress, json_interval=cfg.json_interval)
        self.blobs: list[dict[str, object]] = []
        self.tree: TreeDest | None = None  # a directory tree session: its staging
        self.order: TreeOrder | None = None  # ... and when its TREE operations land

    # -- the whole session ------------------------------------------------------------
    def run(self) -> dict[str, object]:
        try:
            self.dest.check()
            self.dest.lock()
            real_uri = self.listener.open()
            self.events.emit("listening", uri=str(real_uri))
            log.info("listening on %s", real_uri)
            deadline = time.monotonic() + self.cfg.timeout
            self.events.stream.flush()
            self._accept_session(deadline)
            socks = self._accept_channels(deadline)
            self.listener.close()
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
            self.listener.release()
            if self.blocks is not None:
                self.blocks.close()
            if self.tree is not None:
                self.tree.close()
            self.dest.close()

    def _fail(self, e: BaseException) -> None:
        code = exit_code_of(e)
        if self.main is not None:
            self.main.abort(code, f"destination: {e}")
        if self.workers:
            workers.terminate(self.workers)
            self.workers = []
        if self.tree is not None:
            self.tree.cleanup()  # before publishing: the whole copy; DEST is untouched
        self.dest.discard()

    # -- session acceptance -----------------------------------------------------------------
    def _accept_session(self, deadline: float) -> None:
        while True:
            conn, hello, conv = self.listener.accept(deadline)
            if hello.role != P.ROLE_MAIN:
                log.warning("dropped channel %d: it arrived before any session", hello.role)
                conn.close()
                continue
            main = MainConnection(conn, conv, self.cfg.timeout)
            # Until ACCEPT there is no session, and nothing at DEST: a would-be source
            # that goes away, says nothing or says something malformed is dropped like
            # any bad connection; one whose well-formed CONFIG we refuse is told why.
            # Either way recv keeps listening for a real source.
            try:
                main.send(P.Welcome(P.VERSION, hello.session))
                setup_deadline = min(deadline, time.monotonic() + min(10.0, self.cfg.timeout))
                cfg = main.receive(setup_deadline)
                layout = main.receive(setup_deadline)
                if not isinstance(cfg, P.Config) or not isinstance(layout, P.Layout):
                    raise ProtocolError("setup: expected CONFIG then LAYOUT")
                root = main.receive(setup_deadline) if _is_tree(layout) else None
                if root is not None and not isinstance(root, P.TreeRoot):
                    raise ProtocolError("setup: expected TREE_ROOT after a tree's LAYOUT")
            except (ConnectionFailed, Timeout) as e:
                log.warning("dropped a session start: %s", e)
                main.close()
                continue
            except ProtocolError as e:
                self._refuse(main, "dropped a session start", e)
                continue
            try:
                self._check_config(cfg)
                if root is not None:
                    c = self.cfg
                    check_tree_dest(self.dest.path, root, force=c.force, resume=c.resume,
                                    keep_partial=c.keep_partial)
            except MultifdError as e:
                self._refuse(main, "refused a session start", e)
                continue
            break
        self.session = hello.session
        self.main = main
        self.config = cfg
        self.blocks = blocks = Blocks(layout, cfg)
        if root is not None:
            self.tree = TreeDest(self.dest.path, self.dest.hidden_name(), force=self.cfg.force,
                                 xattrs=bool(cfg.features & P.CONFIG_XATTRS))
            b = layout.blocks[0]
            self.tree.check_space(min(b.size, b.allocated))
            self.order = TreeOrder(self.tree.create())
        else:
            self.dest.plan([(b.name, b.size, b.allocated, b.kind) for b in layout.blocks])
            self.dest.create()
            blocks.create_tables()
        self.stats.channels = cfg.channels
        if cfg.compression == P.COMPRESSION_AUTO:
            self.stats.compression = "auto"
        else:
            method = by_wire_id(cfg.compression, cfg.level).name
            self.stats.compression = method if method == "none" else f"{method}:{cfg.level}"
        flags = P.ACCEPT_RESUME if self.dest.in_place else 0
        main.send(P.Accept(self.tree.accept_flags if self.tree is not None else flags))
        log.info(
            "session %s: %d channels, %d-byte pages, %d block(s), %d bytes",
            self.session.hex()[:8], cfg.channels, cfg.page_size, len(layout.blocks),
            sum(blocks.sizes),
        )

    @staticmethod
    def _refuse(main: MainConnection, what: str, e: MultifdError) -> None:
        """Tell a would-be source why (best effort: it may be garbage), and drop it."""
        log.warning("%s: %s", what, e)
        main.abort(e.exit_code, f"destination: {e}")
        main.close()

    def _check_config(self, cfg: P.Config) -> None:
        """What this recv refuses in a well-formed CONFIG (an unknown codec fails
        here, not mid-copy)."""
        P.check_config(cfg, max_channels=self.cfg.max_channels)
        if cfg.compression != P.COMPRESSION_AUTO:
            by_wire_id(cfg.compression, cfg.level)

    def _accept_channels(self, deadline: float) -> dict[int, socket.socket]:
        assert self.config is not None
        socks: dict[int, socket.socket] = {}
        while len(socks) < self.config.channels:
            conn, hello, conv = self.listener.accept(deadline, watch=self.main)
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
        assert self.config is not None and self.blocks is not None and self.main is not None
        args = RecvChannelArgs(
            self.config, self.dest.fds, tuple(self.blocks.tables), self.cfg.timeout, self.hooks,
            new_file=self.dest.new_file, page_sizes=self.blocks.page_sizes,
            shadow_fd=self.dest.shadow_fd,
            tree_ids_fd=self.tree.ids_fd if self.tree is not None else -1,
        )
        n = self.config.channels
        lsock = self.listener.sock
        others = [self.main.sock] + ([lsock] if lsock else [])
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
        assert self.main is not None and self.config is not None and self.blocks is not None
        self.listener.early.extend(hash_old_copy(
            self.main, self.workers, self.blocks.tables[0], self.blocks.sizes[0],
            self.config.page_size, self.heartbeat,
        ))

    def _serve(self) -> None:
        """Run the epochs under the barrier, then complete."""
        assert self.main is not None and self.config is not None and self.blocks is not None
        barrier = barrier_for(self.config.channels, len(self.blocks),
                              enabled=not self.hooks.no_barrier)
        loop = EpochLoop(self.main, self.workers, barrier, self.blocks, self.tree or self.dest,
                         self.stats, self.events, self.progress, self.heartbeat, self.order)
        digest = loop.run(list(self.main.drain()) + self.listener.early)
        if self.tree is not None:
            self._complete_tree(digest, loop.written_bytes)
        else:
            self._complete(digest, loop.metadata, loop.written_bytes)

    # -- completion -------------------------------------------------------------------------
    def _complete(self, digest: P.Digest, metadata: dict[int, P.Metadata], written: int) -> None:
        assert self.main is not None and self.blocks is not None
        ours = self.blocks.digest()
        if ours != digest.digest:
            raise VerifyError(
                f"digest: got {digest.digest.hex()} from the source, "
                f"computed {ours.hex()} from what was written"
            )
        self.blobs = self.blocks.check_blobs(digest.epoch)
        self.dest.finalize(metadata)
        logsetup.hold_signals_from_now()  # DEST is complete and named: this run succeeded
        self.main.send(P.Complete(ours, written))
        workers.stop(self.workers)
        self.workers = []
        self.stats.digest = ours.hex()
        self.stats.finished = time.monotonic()
        log.info("verified and completed %s", self.dest.path)


    def _complete_tree(self, digest: P.Digest, written: int) -> None:
        """Verify the tree's shape, then its pages; then make it DEST."""
        assert self.main is not None and self.tree is not None and self.order is not None
        self.tree.verify(self.order.manifest)
        ours = tree_digest(self._channel_digests())
        if ours != digest.digest:
            raise VerifyError(
                f"digest: got {digest.digest.hex()} from the source, "
                f"computed {ours.hex()} from the tree's files as written"
            )
        self.tree.publish()
        logsetup.hold_signals_from_now()  # DEST is complete and named: this run succeeded
        self.main.send(P.Complete(ours, written))
        workers.stop(self.workers)
        self.workers = []
        self.tree.cleanup()
        self.stats.digest = ours.hex()
        self.stats.finished = time.monotonic()
        log.info("verified and completed the tree %s", self.dest.path)

    def _channel_digests(self) -> list[bytes]:
        """Each channel's digest of its files' page tables, in channel order."""
        assert self.main is not None
        for w in self.workers:
            w.send(M.TreeDigest())
        got: dict[int, bytes] = {}
        while len(got) < len(self.workers):
            reports, _ = workers.poll(self.workers, [], self.heartbeat)
            for w, r in reports:
                if isinstance(r, M.TreeDigested):
                    got[w.index] = r.digest
                elif not isinstance(r, M.Progress):
                    raise ProtocolError(f"channel report: got {type(r).__name__}")
            self.main.heartbeat_if_idle(self.heartbeat)
        return [got[i] for i in range(len(self.workers))]


def _is_tree(layout: P.Layout) -> bool:
    return any(b.kind == P.KIND_TREE for b in layout.blocks)


def run(cfg: RecvConfig, events: Events, hooks: TestHooks) -> dict[str, object]:
    """Serve one session into cfg.dest; return the completed counters."""
    try:
        return Receiver(cfg, events, hooks).run()
    except ConnectionResetError as e:
        raise ConnectionFailed(f"connection reset: {e}") from None
