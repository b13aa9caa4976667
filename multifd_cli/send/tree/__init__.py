"""Directory sources (issue 12): one compact snapshot per pass, the ordered delta
between two, and the files a pass must read.

Per pass, send does::

    snap = scan_tree(SOURCE, one_file_system=...)       # lstat walk, ~90 B/entry
    delta = tracker.advance(snap, shared_writable_mapped())
    delta.ops()     # TreeOps in phase order: frame them at the start of the epoch
    delta.scan()    # ScanItems: what the channels read (open_scanned checks the inode)
    delta.times()   # TIMES ops: frame them after the epoch's pages
    delta.dropped   # file ids whose page tables can go

and at completion ``dir_finish(tracker.snapshot)`` (DIRMETA, deepest first) and the
manifest digest ``snapshot_manifest(tracker.snapshot, options).digest()``.

Not yet wired into the orchestrator: the codec for TreeOp and its place in the
epoch's legal order belong to wire/, and are a later session's work.
"""

from __future__ import annotations

from multifd_cli.send.tree.diff import (
    ScanItem,
    TreeDelta,
    TreeTracker,
    diff_snapshots,
    dir_finish,
)
from multifd_cli.send.tree.procmaps import parse_maps, shared_writable_mapped
from multifd_cli.send.tree.scan import Snapshot, open_scanned, scan_tree, snapshot_manifest

__all__ = [
    "ScanItem",
    "Snapshot",
    "TreeDelta",
    "TreeTracker",
    "diff_snapshots",
    "dir_finish",
    "open_scanned",
    "parse_maps",
    "scan_tree",
    "shared_writable_mapped",
    "snapshot_manifest",
]
