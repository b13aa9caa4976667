"""What recv knows about each block of a session: its size now, its page size,
and the shared tables of what was written and verified there.

Main keeps these in step with the source's EPOCH_START sizes and reads them at
completion to compute the digest; the channels write the tables.
"""

from __future__ import annotations

import logging

from multifd_cli import wire as P
from multifd_cli.common.tables import pages_of, table_digest
from multifd_cli.errors import VerifyError
from multifd_cli.recv.sink import HOLE_BIT, Destination, DestTables

log = logging.getLogger("multifd")


class Blocks:
    """The session's blocks, as LAYOUT declared them and EPOCH_START resized them."""

    def __init__(self, layout: P.Layout, config: P.Config) -> None:
        self.layout = layout
        self.sizes = tuple(b.size for b in layout.blocks)
        # A blob's "pages" are packet-size chunks; everything else is paged.
        self.page_sizes = tuple(
            config.packet_size if b.kind == P.KIND_BLOB else config.page_size
            for b in layout.blocks
        )
        self.tables: list[DestTables] = []

    def __len__(self) -> int:
        return len(self.sizes)

    def create_tables(self) -> None:
        """The shared tables, created before the channels fork so they inherit them."""
        self.tables = [
            DestTables.create(f"recv{i}", b.size, ps)
            for i, (b, ps) in enumerate(zip(self.layout.blocks, self.page_sizes))
        ]

    def resize(self, sizes: tuple[int, ...], dest: Destination) -> None:
        """Follow the sizes an EPOCH_START gave, in DEST and in the tables."""
        for i, (old, new) in enumerate(zip(self.sizes, sizes)):
            if old == new:
                continue
            if self.layout.blocks[i].kind == P.KIND_PAGES:
                log.info("%s changed size: %d -> %d bytes", self.layout.blocks[i].name, old, new)
            dest.resize(i, new)
            self.tables[i].resize(old, new, self.page_sizes[i])
        self.sizes = sizes

    def digest(self) -> bytes:
        """The digest of what was written and verified, to compare with DIGEST."""
        return table_digest(zip(self.sizes, (t.page_hash for t in self.tables), self.page_sizes))

    def check_blobs(self, final: int) -> list[dict[str, object]]:
        """Every blob must have arrived whole in the final epoch, after the pause;
        return the summary's entry for each."""
        blobs: list[dict[str, object]] = []
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
            blobs.append({"name": b.name, "bytes": self.sizes[i], "epoch": final})
        return blobs

    def close(self) -> None:
        for t in self.tables:
            t.close()
