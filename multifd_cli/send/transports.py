"""Where the pages go: a recv over tcp/unix, a recv started over ssh, or a file: image.

`open_transport()` picks one from the parsed --to, once. The orchestrator then
talks to the Transport interface alone, in this order:

    start()  setup()  [begin_epoch() end_epoch()]*  complete()  confirm_success()
    and on any failure abort(); leaving the `with` block always closes it.

Only the peer transports have a main connection; the image transport writes
fixed offsets and has nobody to tell about epochs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from abc import ABC, abstractmethod
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from multifd_cli import wire as P
from multifd_cli.common.tables import SharedTable, pages_of
from multifd_cli.config import SendConfig
from multifd_cli.errors import (
    InternalError,
    IOFailure,
    PeerAborted,
    ProtocolError,
    UsageError,
    VerifyError,
    exit_code_of,
)
from multifd_cli.net import handshake
from multifd_cli.net.address import ImagePath, SshTarget
from multifd_cli.net.connection import MainConnection
from multifd_cli.net.transport import Uri, connect
from multifd_cli.send.pool import Watch
from multifd_cli.send.sources import Blob, Source, read_metadata
from multifd_cli.send.tree.source import TreeSource, op_batches
from multifd_cli.wire.treeops import TreeOp

if TYPE_CHECKING:  # imported where used: most sessions need neither
    from multifd_cli.image.layout import ImageLayout
    from multifd_cli.net.ssh import RemoteRecv

log = logging.getLogger("multifd")

#: What a channel is given to reach the destination: a URI, or the image's
#: hidden path, layout and per-page "present" tables.
ImageTarget = tuple[str, "ImageLayout", tuple[SharedTable, ...]]


class Transport(ABC):
    """One destination of a migration, from set-up to completion."""

    #: The destination holds an old copy: pass 1 compares against its hashes.
    resume = False
    #: The destination keeps owners and device nodes (ACCEPT_OWNERS): a tree's
    #: manifest covers them.
    owners = False

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Anything that must run before the writer's watchdog is armed."""
        return None  # nothing to do unless a subclass says so

    @abstractmethod
    def setup(self, sources: Sequence[Source], blobs: Sequence[Blob], session: bytes,
              tree: TreeSource | None = None) -> P.Config:
        """Connect and agree on the session, or create the image; return the CONFIG."""

    @abstractmethod
    def channel_target(self) -> tuple[Uri | None, ImageTarget | None]:
        """Where each channel connects, or which image it writes."""

    def watched(self) -> list[Watch]:
        """What main waits on besides its channels (the main connection)."""
        return []

    def tick(self, heartbeat: float) -> None:
        """Called after every wait: keep the main connection alive, and check the peer's."""
        return None  # nothing to do unless a subclass says so

    def begin_epoch(self, epoch: int, sizes: Sequence[int]) -> None:
        """Announce the epoch (EPOCH_START), or check that it fits the image."""
        return None  # nothing to do unless a subclass says so

    def end_epoch(self, epoch: int, counts: P.Counts) -> None:
        """Close the epoch on the main connection, after every channel's SYNC."""
        return None  # nothing to do unless a subclass says so

    @abstractmethod
    def complete(self, epoch: int, sources: Sequence[Source], sizes: Sequence[int],
                 digest: bytes) -> None:
        """Finish the copy and verify the digest, or raise."""

    def send_tree(self, epoch: int, ops: Iterable[TreeOp]) -> int:
        """Send a directory source's operations for EPOCH; return how many."""
        raise InternalError("a directory source needs a recv at the other end")

    def send_manifest(self, manifest: P.Manifest) -> None:
        """A directory source's manifest, before DIGEST."""
        raise InternalError("a directory source needs a recv at the other end")

    def raise_pending_abort(self) -> None:
        """A channel lost its connection: raise the peer's reason if it sent one."""
        return None  # nothing to do unless a subclass says so

    def abort(self, error: BaseException) -> None:
        """Tell the peer why we stop, if there is one. Never raises."""
        return None  # nothing to do unless a subclass says so

    def confirm_success(self) -> None:
        """After COMPLETE: anything the far side still has to say about failure."""
        return None  # nothing to do unless a subclass says so

    @abstractmethod
    def close(self) -> None:
        """Release everything, whether or not the migration succeeded."""


class PeerTransport(Transport):
    """A recv that listens at a tcp: or unix: URI."""

    def __init__(self, cfg: SendConfig, uri: Uri | None,
                 on_message: Callable[[P.Message], None]) -> None:
        self.cfg = cfg
        self.uri = uri
        self.on_message = on_message  # what recv streams mid-migration (RESUME_HASHES)
        self.main: MainConnection | None = None

    def setup(self, sources: Sequence[Source], blobs: Sequence[Blob], session: bytes,
              tree: TreeSource | None = None) -> P.Config:
        cfg = self.cfg
        assert self.uri is not None
        uri = self.uri

        def waiting() -> None:
            if cfg.wait_for_recv > 0:  # a warning, so it shows at a terminal's quiet level
                log.warning("waiting up to %g s for recv to listen at %s (--wait-for-recv)",
                            cfg.wait_for_recv, uri)

        sock = connect(uri, cfg.timeout, wait_for=cfg.wait_for_recv, on_refused=waiting)
        sock, conv = handshake.client(sock, P.ROLE_MAIN, session, cfg.timeout, cfg.security)
        self.main = main = MainConnection(sock, conv, cfg.timeout)
        spec = cfg.compression
        xattrs = tree is not None and cfg.preserve  # a file's travel in METADATA instead
        config = P.Config(cfg.channels, spec.wire_id, spec.effective_level, cfg.page_size,
                          cfg.packet_size, P.CONFIG_XATTRS if xattrs else 0)
        if tree is not None:
            size = tree.total_bytes()
            main.send(config, P.Layout((P.BlockInfo("", size, size, P.KIND_TREE),)),
                      tree.identity())
        else:
            main.send(config, P.Layout(
                tuple(P.BlockInfo(s.name, s.size, s.allocated) for s in sources)
                + tuple(P.BlockInfo(b.name, 0, 0, P.KIND_BLOB) for b in blobs)
            ))
        reply = main.receive(time.monotonic() + cfg.timeout)
        if not isinstance(reply, P.Accept):
            raise ProtocolError(f"setup: got {type(reply).__name__}, expected ACCEPT")
        self.resume = reply.resume
        self.owners = reply.owners
        if tree is not None and xattrs:  # root recv: trusted.* and security.* travel too
            tree.tracker.carry_xattrs(tree.root, privileged=self.owners)
        if self.resume:
            log.info("the destination holds an old copy: pass 1 sends only what differs")
        for msg in main.drain():
            self.on_message(msg)
        return config

    def channel_target(self) -> tuple[Uri | None, ImageTarget | None]:
        return self.uri, None

    def watched(self) -> list[Watch]:
        return [(self.main, self._read_main)] if self.main is not None else []

    def _read_main(self) -> None:
        """The main connection is readable: hand on what recv sent."""
        assert self.main is not None
        for msg in self.main.read_available():
            self.on_message(msg)

    def tick(self, heartbeat: float) -> None:
        if self.main is not None:
            self.main.heartbeat_if_idle(heartbeat)
            self.main.check_silence()

    def begin_epoch(self, epoch: int, sizes: Sequence[int]) -> None:
        assert self.main is not None
        self.main.send(P.EpochStart(epoch, tuple(sizes)))

    def end_epoch(self, epoch: int, counts: P.Counts) -> None:
        assert self.main is not None
        self.main.send(P.EpochEnd(epoch, counts))

    def send_tree(self, epoch: int, ops: Iterable[TreeOp]) -> int:
        assert self.main is not None
        count = 0
        for batch in op_batches(ops):
            self.main.send(P.Tree(epoch, tuple(batch)))
            count += len(batch)
        return count

    def send_manifest(self, manifest: P.Manifest) -> None:
        assert self.main is not None
        self.main.send(manifest)

    def complete(self, epoch: int, sources: Sequence[Source], sizes: Sequence[int],
                 digest: bytes) -> None:
        main = self.main
        assert main is not None
        if self.cfg.preserve:
            for i, src in enumerate(sources):
                main.send(read_metadata(i, src))
        main.send(P.Digest(epoch, digest))
        deadline = time.monotonic() + self.cfg.timeout
        msg = main.receive(deadline)
        while isinstance(msg, P.EpochAck):  # the final epoch's, sent as it closed
            self.on_message(msg)
            msg = main.receive(deadline)
        if not isinstance(msg, P.Complete):
            raise ProtocolError(f"completion: got {type(msg).__name__}, expected COMPLETE")
        if msg.digest != digest:
            raise VerifyError(f"digest: destination reported {msg.digest.hex()}, expected {digest.hex()}")

    def raise_pending_abort(self) -> None:
        if self.main is not None:
            self.main.raise_pending_abort(0.5)

    def abort(self, error: BaseException) -> None:
        if self.main is not None and not isinstance(error, PeerAborted):
            self.main.abort(exit_code_of(error), f"source: {error}")

    def close(self) -> None:
        if self.main is not None:
            self.main.close()


class SshTransport(PeerTransport):
    """recv started on the far side over ssh, then reached directly (rsync -e ssh)."""

    def __init__(self, cfg: SendConfig, target: SshTarget,
                 on_message: Callable[[P.Message], None]) -> None:
        super().__init__(cfg, None, on_message)
        self.target = target
        self.remote: RemoteRecv | None = None

    def start(self) -> None:
        from multifd_cli.net.ssh import RemoteRecv

        cfg = self.cfg
        launch = cfg.ssh
        recv_args = ["--timeout", f"{cfg.timeout:g}", *launch.remote_recv_args]
        ssh_words = shlex.split(launch.command) if launch.command else ["ssh"]
        self.remote = RemoteRecv.start(
            self.target, remote_command=launch.remote_command or None, recv_args=recv_args,
            timeout=cfg.timeout, ssh=ssh_words[0], ssh_options=ssh_words[1:],
        )
        self.uri = self.remote.uri
        log.info("recv started on %s over ssh, listening at %s", self.target.host, self.uri)

    def confirm_success(self) -> None:
        if self.remote is not None:
            self.remote.relay_failure(self.cfg.timeout)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.terminate()
        super().close()


class ImageTransport(Transport):
    """file:IMAGE: every page at a fixed offset of an image, no peer at all."""

    def __init__(self, cfg: SendConfig, path: str) -> None:
        self.cfg = cfg
        self.path = path
        self.layout: ImageLayout | None = None
        self.fd = -1
        self.tmp = ""  # the hidden name the image is written under until complete
        self.present: list[SharedTable] = []  # u8 per page: written at least once

    def setup(self, sources: Sequence[Source], blobs: Sequence[Blob], session: bytes,
              tree: TreeSource | None = None) -> P.Config:
        from multifd_cli.image.layout import ImageLayout
        from multifd_cli.image.writer import create_image

        cfg = self.cfg
        if blobs:
            raise UsageError("--state-cmd/--state-file cannot go into a file: image")
        if cfg.preserve:
            raise UsageError("--preserve is not kept in file: images")
        for src in sources:
            with contextlib.suppress(OSError):
                if os.path.samefile(self.path, src.path):
                    raise UsageError(f"the image {self.path} is the source {src.path}")
        self.layout = ImageLayout.plan(
            cfg.page_size, [(s.name, s.size, P.KIND_PAGES) for s in sources]
        )
        self.fd, self.tmp = create_image(self.path, self.layout)
        self.present = [
            SharedTable(f"present{i}", "B", pages_of(s.size, cfg.page_size))
            for i, s in enumerate(sources)
        ]
        return P.Config(cfg.channels, 0, 0, cfg.page_size, cfg.packet_size)

    def channel_target(self) -> tuple[Uri | None, ImageTarget | None]:
        assert self.layout is not None
        return None, (self.tmp, self.layout, tuple(self.present))

    def begin_epoch(self, epoch: int, sizes: Sequence[int]) -> None:
        assert self.layout is not None
        for b, new in zip(self.layout.blocks, sizes):
            if new > b.capacity * self.cfg.page_size:
                raise IOFailure(
                    f"{b.name} grew past its size at the start ({new} bytes); "
                    "a file: image has a fixed layout"
                )

    def complete(self, epoch: int, sources: Sequence[Source], sizes: Sequence[int],
                 digest: bytes) -> None:
        from multifd_cli.image.writer import complete_image

        assert self.layout is not None
        complete_image(self.fd, self.tmp, self.path, self.layout, list(sizes), self.present,
                       digest)
        self.tmp = ""  # renamed to the image: nothing to discard

    def close(self) -> None:
        for p in self.present:
            p.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp:
            from multifd_cli.image.writer import discard_image

            discard_image(self.tmp)
            self.tmp = ""


def open_transport(cfg: SendConfig, on_message: Callable[[P.Message], None]) -> Transport:
    """The one place that looks at the kind of --to."""
    if isinstance(cfg.to, ImagePath):
        return ImageTransport(cfg, cfg.to.path)
    if isinstance(cfg.to, SshTarget):
        return SshTransport(cfg, cfg.to, on_message)
    return PeerTransport(cfg, cfg.to, on_message)
