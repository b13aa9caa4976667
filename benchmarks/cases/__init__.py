"""The benchmark cases, one module each, in the order a full run takes them.

A case is a function that takes the run's `Ctx` and fills in its `CaseResult`: the
setup it measured, its tables and its summary rows. To add one, write a module here
and add a line below; `bench.py --only NAME` then runs it.
"""

from __future__ import annotations

from typing import Callable

from harness.report import CaseResult, Ctx

from cases import (
    auto,
    channels,
    compression,
    live,
    packets,
    peers,
    qemu,
    resume,
    scale,
    scan,
    startup,
    static_disk,
    static_tmpfs,
    tree_live,
    tree_pg,
    tree_static,
)

CASES: dict[str, Callable[[Ctx, CaseResult], None]] = {
    "static-disk": static_disk.case_static_disk,
    "static-tmpfs": static_tmpfs.case_static_tmpfs,
    "scan": scan.case_scan,
    "startup": startup.case_startup,
    "channels": channels.case_channels,
    "live-256M": live.case_live_256m,
    "live-1G": live.case_live_1g,
    "compression": compression.case_compression,
    "peers": peers.case_peers,
    "qemu": qemu.case_qemu,
    "packets": packets.case_packets,
    "resume": resume.case_resume,
    "auto": auto.case_auto,
    "scale": scale.case_scale,
    "tree-static": tree_static.case_tree_static,
    "tree-scan": tree_static.case_tree_scan,
    "tree-live": tree_live.case_tree_live,
    "tree-tracker": tree_live.case_tree_tracker,
    "tree-pg": tree_pg.case_tree_pg,
}
