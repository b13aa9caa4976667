"""Directory sources: one compact snapshot per pass, the ordered delta between two,
and the files that a pass must read (see issue 12).

Not yet wired into the orchestrator: a later session frames TreeDelta per epoch.
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
