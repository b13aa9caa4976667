"""A live PostgreSQL data directory migrated under pgbench load (issue 12).

The server's processes are in a cgroup v2 of their own and send freezes it with
--pause-cgroup. During the migration WAL segments are created, recycled by rename and
removed (pg_switch_wal and CHECKPOINT in a loop, a small max_wal_size), and the test
asserts that they were: a run in which the WAL did not move proves nothing. Then the
frozen source is killed (a crash at the pause) and restarted, PostgreSQL is started on
the copy as it is (no chmod, no chown), and both must recover to the same committed
state: the pgbench_history count, the balance sums, and TPC-B's invariant
sum(abalance) = sum(tbalance) = sum(bbalance) = sum(history.delta).
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers.mfdkit import Kit
from helpers.pgkit import (
    PG_USER,
    Cgroup,
    Cluster,
    WalChurn,
    move_tree,
    owned_dir,
    remove_tree,
    why_not,
)

SETTINGS = {
    "max_wal_size": "'32MB'",
    "min_wal_size": "'32MB'",
    "wal_keep_size": "0",
    "shared_buffers": "'16MB'",
    "log_checkpoints": "on",
    "checkpoint_timeout": "'30s'",
}
BANDWIDTH = "20M"
_names = itertools.count()


@dataclass
class PgEnv:
    """Everything one test started, for the cleanup."""

    base: Path
    cgroup: Cgroup
    clusters: list[Cluster] = field(default_factory=list)


@pytest.fixture
def pg() -> Iterator[PgEnv]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    base = owned_dir("mfd-pg-")
    env = PgEnv(base, Cgroup(f"mfd-pg-{os.getpid()}-{next(_names)}"))
    try:
        yield env
    finally:
        env.cgroup.remove()  # thaws and kills what is left in it
        for c in env.clusters:
            c.stop()
        remove_tree(base)


def checkpoint_counts(log: str) -> dict[str, int]:
    """WAL files added, removed and recycled, summed over the 'checkpoint complete'
    lines of a server log (log_checkpoints = on)."""
    total = {"added": 0, "removed": 0, "recycled": 0}
    for m in re.finditer(r"(\d+) WAL file\(s\) added, (\d+) removed, (\d+) recycled", log):
        for k, v in zip(total, m.groups()):
            total[k] += int(v)
    return total


def tpcb_ok(f: dict[str, int]) -> bool:
    return f["abalance"] == f["tbalance"] == f["bbalance"] == f["delta"]


Copier = Callable[[Path, Path, Cgroup], None]


def migrate_frozen(kit: Kit) -> Copier:
    """The copier under test: multifd send DATADIR --pause-cgroup, keep-paused."""
    def copy(datadir: Path, dest: Path, cg: Cgroup) -> None:
        r, uri = kit.recv(dest, timeout=60)
        # A bandwidth cap stretches the passes over several seconds, so checkpoints
        # recycle and remove segments while the copy is in flight.
        s = kit.send(datadir, uri, "--pause-cgroup", str(cg.path), "--max-bandwidth", BANDWIDTH,
                     timeout=60)
        s.wait(180).ok()
        r.wait(60).ok()
        assert cg.frozen(), "keep-paused is the default: the cluster must still be frozen"
    return copy


def live_cluster_case(pg: PgEnv, copy: Copier) -> None:
    """The whole scenario, with COPY taking the live data directory to its destination
    and leaving the cgroup frozen."""
    src = Cluster(pg.base / "data", pg.base)
    pg.clusters.append(src)
    src.initdb(SETTINGS)
    src.start()
    move_tree(src.postmaster(), pg.cgroup)
    init = src.pgbench("-i", "-s", "2", "-q")
    assert init.returncode == 0, init.stderr
    load = src.pgbench_load(clients=4, seconds=300)
    churn = WalChurn(src)
    try:
        time.sleep(2)
        assert src.log is not None
        log_at = len(src.log.read_text())
        history_before = int(src.sql("SELECT count(*) FROM pgbench_history"))
        before = churn.mark()
        dest = pg.base / "copy"
        copy(src.datadir, dest, pg.cgroup)
        after = churn.mark()
    finally:
        churn.stop()
        load.kill()
        load.wait(10)
    moved = churn.churn(before, after)
    logged = checkpoint_counts(src.log.read_text()[log_at:])
    assert moved["created"] and moved["removed"], f"pg_wal did not move: {moved}"
    assert logged["recycled"] > 0 and logged["removed"] > 0, \
        f"no segment recycled and removed during the migration: {logged}, {moved}"

    # A usable copy as it is: owned by postgres and 0700, as PostgreSQL demands.
    st = dest.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam(PG_USER).pw_uid, 0o700)

    pg.cgroup.kill_all()  # a crash at the pause
    src.start()
    replica = Cluster(dest, pg.base)
    pg.clusters.append(replica)
    replica.start()
    a, b = src.figures(), replica.figures()
    assert a == b, f"source {a} != copy {b}\n{replica.log_text()}"
    assert tpcb_ok(a), a
    assert a["history"] > history_before, "pgbench committed nothing during the migration"


def test_live_postgres_data_directory(pg: PgEnv, kit: Kit) -> None:
    live_cluster_case(pg, migrate_frozen(kit))
