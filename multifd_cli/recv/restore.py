"""`multifd recv --from file:IMAGE DEST`: restore a `file:` image with parallel
channels, verifying the digest the image was completed with.

The same Destination as a network recv (unnamed files, linked only once the
digest matches), the same tables; each channel reads its ranges' bitmap and
pages from the image and writes them at their offsets.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from multifd_cli.common.tables import page_hash, pages_of, table_digest
from multifd_cli.config import RecvConfig
from multifd_cli.errors import IOFailure, VerifyError
from multifd_cli.events import Events, Stats
from multifd_cli.image.layout import ImageLayout, check_complete, read_layout
from multifd_cli.proc import workers
from multifd_cli.proc.messages import Quit
from multifd_cli.proc.workers import next_order
from multifd_cli.recv import messages as M
from multifd_cli.recv.sink import Destination, DestTables

log = logging.getLogger("multifd")
RANGE_PAGES = 2048  # a multiple of 8, so a range owns whole bitmap bytes


def _restore_channel(index: int, pipe: Connection, image: str, layout: ImageLayout,
                     fds: tuple[int, ...], tables: tuple[DestTables, ...]) -> None:
    ps = layout.page_size
    try:
        src = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"cannot open image {image}: {e.strerror}") from None
    try:
        while True:
            cmd = next_order(pipe)
            if isinstance(cmd, Quit):
                return
            assert isinstance(cmd, M.RestoreRange), cmd
            bi, start, end = cmd
            b = layout.blocks[bi]
            size = b.size
            bitmap = _pread_exact(src, -(-(end - start) // 8), b.bitmap_offset + start // 8, b.name)
            view = tables[bi].page_hash.view
            written = normal = 0
            for p in range(start, end):
                if not bitmap[(p - start) >> 3] >> ((p - start) & 7) & 1:
                    continue  # absent: a zero page, a hole in the new file
                normal += 1
                n = min(ps, size - p * ps)
                data = _pread_exact(src, n, b.data_offset + p * ps, b.name)
                view[p] = page_hash(data)
                _pwrite_all(fds[bi], memoryview(data), p * ps)
                written += n
            pipe.send(M.Restored(bi, start, end, written, normal))
    finally:
        os.close(src)


def _pread_exact(fd: int, n: int, offset: int, block: str) -> bytes:
    """n bytes of the image; a short read means a truncated image, not a bug."""
    try:
        data = os.pread(fd, n, offset)
    except OSError as e:
        raise IOFailure(f"reading the image at offset {offset}: {e.strerror}") from None
    if len(data) != n:
        raise IOFailure(f"image is shorter than its header says (block {block})")
    return data


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of data: pwrite may write less (a full disk, a signal)."""
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as e:
            raise IOFailure(f"writing the destination at offset {offset}: {e.strerror}") from None
        data, offset = data[n:], offset + n


def run(cfg: RecvConfig, events: Events, image: str) -> dict[str, Any]:
    layout = read_layout(image)
    check_complete(layout, image)
    stats = Stats()
    dest = Destination(cfg.dest, force=cfg.force, keep_partial=cfg.keep_partial)
    tables: list[DestTables] = []
    pool: list[workers.Worker] = []
    try:
        dest.check()
        dest.lock()
        dest.plan([(b.name, b.size, b.size, b.kind) for b in layout.blocks])
        dest.create()
        ps = layout.page_size
        tables = [DestTables.create(f"restore{i}", b.size, ps) for i, b in enumerate(layout.blocks)]
        n = max(1, cfg.restore_channels)
        pool = workers.start(
            n, "restore", _restore_channel,
            args_for=lambda i: (image, layout, dest.fds, tuple(tables)),
        )
        stats.channels = n
        stats.setup_done = time.monotonic()
        ranges = deque(
            (bi, s, min(pages_of(b.size, ps), s + RANGE_PAGES))
            for bi, b in enumerate(layout.blocks)
            for s in range(0, pages_of(b.size, ps), RANGE_PAGES)
        )
        outstanding = [0] * n
        while ranges or any(outstanding):
            for w in pool:
                while ranges and outstanding[w.index] < 2:
                    w.send(M.RestoreRange(*ranges.popleft()))
                    outstanding[w.index] += 1
            reports, _ = workers.poll(pool, [], 0.5)
            for w, r in reports:
                assert isinstance(r, M.Restored)
                outstanding[w.index] -= 1
                stats.transferred_bytes += r.written_bytes
                stats.payload_bytes += r.written_bytes
                stats.normal_pages += r.normal
                stats.zero_pages += (r.end - r.start) - r.normal
        ours = table_digest(
            (b.size, t.page_hash, ps) for b, t in zip(layout.blocks, tables)
        )
        if ours != layout.digest:
            raise VerifyError(
                f"digest: image says {layout.digest.hex()}, restored pages give {ours.hex()}"
            )
        dest.finalize()
        workers.stop(pool)
        pool = []
        stats.passes = 1
        stats.digest = ours.hex()
        stats.finished = time.monotonic()
        summary = stats.summary()
        del summary["paused"]
        return summary
    except BaseException:
        if pool:
            workers.terminate(pool)
        dest.discard()
        raise
    finally:
        for t in tables:
            t.close()
        dest.close()

