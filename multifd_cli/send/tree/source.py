"""send main's side of a directory source: one walk per pass, the delta since the
last, and the channels' share of the files to read.

A pass walks the tree (lstat only), turns the difference from the last walk into
tree operations, which go to recv before the epoch's pages, and hands each file
that may have changed to the channel that owns its file id. A file whose size,
mtime, ctime and inode are as the last walk saw them is not read: an unchanged
tree costs one walk, under the pause too. Files that a process maps shared and
writable are read every pass anyway, because stores through a mapping do not move
mtime (procmaps.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from array import array
from collections.abc import Collection, Iterable, Iterator
from typing import Callable

from multifd_cli import wire as P
from multifd_cli.common.manifest import ManifestOptions
from multifd_cli.config import SendConfig
from multifd_cli.errors import IOFailure, UsageError
from multifd_cli.net.address import ImagePath
from multifd_cli.send.sources import check_still_named
from multifd_cli.send.tree.diff import ScanItem, TreeDelta, TreeTracker, diff_snapshots, dir_finish
from multifd_cli.send.tree.procmaps import shared_writable_mapped
from multifd_cli.send.tree.scan import (
    DIR,
    FILE,
    Selection,
    Snapshot,
    scan_tree,
    selection,
    snapshot_manifest,
)
from multifd_cli.wire.treeops import TreeOp, skipped_warning

log = logging.getLogger("multifd")

BATCH_FILES = 256  # files in one TreeWork
BATCH_BYTES = 8 << 20  # or this many bytes of them, whichever comes first
OPS_BYTES = 1 << 18  # a TREE message holds about this much: its ops and copies are pass 1's peak
QUEUED = 4  # ready batches a busy channel may have waiting


class TreeSource:
    """One directory source, pass after pass."""

    def __init__(self, root: str, *, one_file_system: bool = False,
                 stale_final: bool = False, only: Selection | None = None,
                 named: dict[str, tuple[int, int]] | None = None) -> None:
        self.root = os.fsencode(root)
        self.one_file_system = one_file_system
        self.only = only  # several SOURCEs: what of their common directory is walked
        # Several SOURCEs: the ones that are not directories, with their (dev, ino). A
        # file named on the command line keeps a lone file's rule: replaced or deleted
        # during the migration is exit 7, where a file found by the walk is followed.
        self.named = named or {}
        self.stale_final = stale_final  # test-only: the final pass does not walk again
        self.tracker = TreeTracker()
        t0 = time.monotonic()
        self._next: Snapshot | None = self._scan()
        self.walk_seconds = time.monotonic() - t0
        self.entries = len(self._next)
        self._warned_sockets = False

    # -- per pass ---------------------------------------------------------------------------
    def advance(self, final: bool, unread: Iterable[tuple[int, int]] = (),
                vouched: Collection[int] = ()) -> TreeDelta:
        """Walk the tree and return what changed since the last pass. UNREAD are the
        (dev, ino) of files the last pass could not read at their path: they are read
        this pass whatever their stat says. VOUCHED are filesystems (st_dev) whose
        files the kernel tracker's window accounts for: a mapping's stores there
        dirty folios, which it reports, so being mapped is no reason to read them."""
        t0 = time.monotonic()
        for path, identity in self.named.items():
            check_still_named(path, identity, follow=False)
        snap = self._next
        self._next = None
        if snap is None:
            if final and self.stale_final and self.tracker.snapshot is not None:
                snap = self.tracker.snapshot  # the negative control: nothing new is seen
            else:
                snap = self._scan()
        mapped = shared_writable_mapped() if os.geteuid() == 0 else set()
        if vouched:
            mapped = {k for k in mapped if k[0] not in vouched}
        mapped.update(unread)
        if snap is self.tracker.snapshot:
            delta, _ = diff_snapshots(snap, snap, self.tracker.next_fid)
        else:
            delta = self.tracker.advance(snap, mapped)
        if self.tracker.next_fid > P.MAX_FILE_ID:
            raise IOFailure(f"the tree used more than {P.MAX_FILE_ID} file ids in this migration")
        self.walk_seconds = time.monotonic() - t0
        self.entries = len(snap)
        if snap.sockets and not self._warned_sockets:
            self._warned_sockets = True
            log.warning("%s", skipped_warning("sockets (they cannot be copied)", snap.sockets))
        return delta

    def _scan(self) -> Snapshot:
        return scan_tree(self.root, one_file_system=self.one_file_system, only=self.only)

    @property
    def snapshot(self) -> Snapshot:
        snap = self.tracker.snapshot
        assert snap is not None, "no pass has walked the tree yet"
        return snap

    def filesystems(self) -> dict[int, bytes]:
        """st_dev -> the path of a directory (or a file) on it, for every filesystem the
        latest walk found files or directories on."""
        snap = self._next if self._next is not None else self.snapshot
        found: dict[int, bytes] = {}
        kind, dev = snap.kind, snap.dev
        for i in range(len(snap)):
            if kind[i] in (DIR, FILE) and dev[i] not in found:
                found[dev[i]] = os.path.join(self.root, snap.path(i)) if i else self.root
        return found

    def total_bytes(self) -> int:
        """Bytes of regular files in the latest walk: the tree's size for progress."""
        snap = self._next if self._next is not None else self.snapshot
        kind, size = snap.kind, snap.size
        return sum(size[i] for i in range(len(snap)) if kind[i] == FILE)

    # -- completion -------------------------------------------------------------------------
    def files_by_channel(self, channels: int) -> list[tuple[array[int], array[int]]]:
        """(file ids, sizes) of every file of the final walk, per owning channel, in
        file id order: what the channels' digests must cover. Arrays, not tuples: a
        million files cost 16 MB here, not a dict's hundreds."""
        snap = self.snapshot
        sizes = array("q", bytes(8 * self.tracker.next_fid))
        present = bytearray(self.tracker.next_fid)
        kind, fid, size = snap.kind, snap.fid, snap.size
        for i in range(len(snap)):
            if kind[i] == FILE:
                present[fid[i]] = 1
                sizes[fid[i]] = size[i]
        out = [(array("q"), array("q")) for _ in range(channels)]
        for f in (f for f, here in enumerate(present) if here):
            ids, lens = out[f % channels]
            ids.append(f)
            lens.append(sizes[f])
        return out

    def finish_ops(self) -> list[TreeOp]:
        """DIRMETA for every directory, deepest first, after the final TIMES."""
        return dir_finish(self.snapshot)

    def manifest(self, owners: bool) -> P.Manifest:
        """What recv's walk of its copy must match (owners and devices only where recv
        keeps them)."""
        builder = snapshot_manifest(self.snapshot, ManifestOptions(True, owners, owners),
                                    xattrs=self.tracker.xattr_digests)
        return P.Manifest(builder.count, builder.digest())

    def identity(self) -> P.TreeRoot:
        """Boot id and the (dev, ino) of the root and every directory above it."""
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = bytes.fromhex(f.read().strip().replace("-", ""))
        except (OSError, ValueError):
            boot = bytes(16)
        ids = []
        path = os.path.realpath(self.root)
        while True:
            try:
                st = os.stat(path)
            except OSError as e:
                raise UsageError(f"{os.fsdecode(path)}: {e.strerror}") from None
            ids.append((st.st_dev, st.st_ino))
            parent = os.path.dirname(path)
            if parent == path or len(ids) >= P.MAX_TREE_DEPTH:
                break
            path = parent
        return P.TreeRoot(boot, tuple(ids))


def op_batches(ops: Iterable[TreeOp]) -> Iterator[list[TreeOp]]:
    """TREE-sized groups of OPS, in order."""
    batch: list[TreeOp] = []
    size = 0
    for op in ops:
        batch.append(op)
        size += P.TREE_OP.size + len(op.path) + len(op.target)
        if len(batch) >= P.MAX_TREE_OPS or size >= OPS_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Batcher:
    """Groups a pass's files into TreeWork-sized batches per owning channel, lazily:
    pull() takes files from the delta only until some channel has a full batch."""

    def __init__(self, items: Iterator[ScanItem], channels: int) -> None:
        self.items = items
        self.channels = channels
        self.open: list[list[ScanItem]] = [[] for _ in range(channels)]
        self.bytes = [0] * channels
        self.full: list[list[tuple[ScanItem, ...]]] = [[] for _ in range(channels)]
        self.exhausted = False

    def pull(self, wanted: Callable[[int], bool]) -> None:
        """Fill batches until a channel for which wanted(c) holds has one ready, or a
        busy channel has QUEUED (memory stays bounded whatever the delta holds), or
        the delta is exhausted (then every partial batch is ready)."""
        if self.exhausted:
            return
        n = self.channels
        for item in self.items:
            c = item.fid % n
            batch = self.open[c]
            batch.append(item)
            self.bytes[c] += item.size if item.ranges is None else sum(
                e - s for s, e in item.ranges)
            if len(batch) >= BATCH_FILES or self.bytes[c] >= BATCH_BYTES:
                self.full[c].append(tuple(batch))
                self.open[c] = []
                self.bytes[c] = 0
                if wanted(c) or len(self.full[c]) >= QUEUED:
                    return
        self.exhausted = True
        for c in range(n):
            if self.open[c]:
                self.full[c].append(tuple(self.open[c]))
                self.open[c] = []

    def take(self, c: int) -> tuple[ScanItem, ...] | None:
        return self.full[c].pop(0) if self.full[c] else None

    def done(self) -> bool:
        return self.exhausted and not any(self.full)


def open_tree(cfg: SendConfig, stale_final: bool = False) -> TreeSource | None:
    """The directory source of CFG, walked once, or None when every source is a file.

    One directory is the tree itself, as `rsync -a DIR/ DEST/`. Several sources of
    which one is a directory become one tree rooted at their common directory that
    holds just them, each under its path relative to it, as file sources are named.
    What a tree cannot do yet is refused here, before anything connects or pauses.
    """
    dirs = []
    for arg in cfg.sources:
        try:
            st = os.stat(arg)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"source {arg}: a symlink loop") from None
            continue  # a file source's own checks say what is wrong with it
        if stat.S_ISDIR(st.st_mode):
            dirs.append(arg)
    if not dirs:
        return None
    first = dirs[0]
    if isinstance(cfg.to, ImagePath):
        raise UsageError(f"source {first} is a directory: file: images hold files, not trees")
    if cfg.state.wanted:
        raise UsageError(f"source {first} is a directory: --state-cmd/--state-file need file "
                         "sources")
    if len(cfg.sources) == 1:
        return TreeSource(first, one_file_system=cfg.reading.one_file_system,
                          stale_final=stale_final)
    paths, named = [], {}
    for arg in cfg.sources:
        try:
            st = os.lstat(arg)
        except OSError:
            raise UsageError(f"source {arg} does not exist") from None
        paths.append(os.path.abspath(arg))
        if not stat.S_ISDIR(st.st_mode) and arg not in dirs:
            named[paths[-1]] = (st.st_dev, st.st_ino)
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    rel = [os.fsencode(os.path.relpath(p, root)) for p in paths]
    return TreeSource(root, one_file_system=cfg.reading.one_file_system,
                      stale_final=stale_final, only=selection(rel), named=named)
