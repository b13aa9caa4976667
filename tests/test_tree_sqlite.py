"""A live SQLite database migrated as a directory, with its writer paused
mid-transaction (issue 12).

A database is more than its main file: in rollback-journal mode the hot journal undoes a
transaction that was open at the crash, in WAL mode the -wal holds frames that are not
committed yet. The writer (helpers/sqlitewriter.py) spends most of its time inside
transactions that spill into the database file, so the pause lands mid-transaction; each
run asserts that it did. Then the copy must pass `PRAGMA integrity_check`, and hold the
rows the source holds once the paused writer is killed and the source reopened (which
recovers it).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers.mfdkit import Kit, assert_within
from helpers.treekit import SqliteWriter, compare_trees

from multifd_cli.writer.pause import is_stopped

RUNS = 3
ATTEMPTS = 3  # a pause that lands between transactions (~4% of the time) is retried


@pytest.fixture
def sqlite_writers() -> Iterator[list[SqliteWriter]]:
    started: list[SqliteWriter] = []
    yield started
    for w in started:
        w.kill()


def recovered(db: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Open DB read-write (a hot journal is rolled back, a WAL recovered), check its
    integrity, and return its rows."""
    con = sqlite3.connect(db, isolation_level=None)
    try:
        check = con.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)], f"{db}: {check}"
        rows = con.execute("SELECT id, txn, k, v FROM t ORDER BY id").fetchall()
        ledger = con.execute("SELECT txn, total FROM ledger ORDER BY txn").fetchall()
    finally:
        con.close()
    return rows, ledger


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


def how_they_differ(truth: Rows, copy: Rows) -> str:
    """A short account of two row sets that differ (the rows hold blobs: the plain
    assertion diff would be unreadable)."""
    (rows_a, ledger_a), (rows_b, ledger_b) = truth, copy
    a, b = dict((r[0], r) for r in rows_a), dict((r[0], r) for r in rows_b)
    changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    return (f"source {len(rows_a)} rows, ledger up to txn {ledger_a[-1:]}; copy {len(rows_b)} "
            f"rows, ledger up to txn {ledger_b[-1:]}; only in source {sorted(a.keys() - b.keys())[:10]}, "
            f"only in copy {sorted(b.keys() - a.keys())[:10]}, differing {changed[:10]} "
            f"(txn {[(a[k][1], b[k][1]) for k in changed[:5]]})")


def hot_journal(src: Path) -> int:
    """The size of the rollback journal beside the database (0 if there is none): in
    rollback-journal mode it exists only while a transaction is open, and one that
    exists when the writer dies is hot."""
    try:
        return (src / "app.db-journal").stat().st_size
    except FileNotFoundError:
        return 0


def start_writer(sqlite_writers: list[SqliteWriter], work: Path, mode: str,
                 seed: int) -> tuple[Path, SqliteWriter]:
    src = work / "src"
    src.mkdir(parents=True)
    w = SqliteWriter(src / "app.db", work / "status", mode, seed)
    sqlite_writers.append(w)
    return src, w


def stop_at_late_step(w: SqliteWriter, min_step: int) -> None:
    """SIGSTOP the writer once it is at least MIN_STEP statements into a transaction
    (retrying when the stop lands elsewhere)."""
    for _ in range(200):
        os.kill(w.pid, signal.SIGSTOP)
        assert_within(lambda: is_stopped(w.pid), 5, "the writer to stop")
        state, _, step = w.state()
        if state == "in-txn" and step >= min_step:
            return
        os.kill(w.pid, signal.SIGCONT)
        assert_within(lambda: w.state()[0] == "in-txn" and w.state()[2] >= min_step, 10,
                      "a late statement of a transaction", step=0.001)
    raise AssertionError("the writer was never stopped late in a transaction")


# -- the referee, checked without multifd ----------------------------------------------------------


def test_the_row_oracle_needs_the_hot_journal(tmp_path: Path,
                                              sqlite_writers: list[SqliteWriter]) -> None:
    """The check below can fail: a copy of the database file taken without its hot
    journal, with the writer stopped late in a transaction that spilled into the file,
    holds rows the recovered source does not; the same copy with the journal equals it."""
    src, w = start_writer(sqlite_writers, tmp_path, "delete", seed=7)
    stop_at_late_step(w, 8)
    assert hot_journal(src) > 0, "no hot journal while stopped mid-transaction"
    whole, alone = tmp_path / "whole", tmp_path / "alone"
    subprocess.run(["cp", "-a", str(src), str(whole)], check=True)
    alone.mkdir()
    shutil.copy2(src / "app.db", alone / "app.db")
    assert compare_trees(src, whole, owners=True) == []
    w.crash()
    truth = recovered(src / "app.db")
    assert recovered(whole / "app.db") == truth
    partial = sqlite3.connect(alone / "app.db").execute(
        "SELECT count(*) FROM t WHERE txn > (SELECT max(txn) FROM ledger)").fetchone()[0]
    assert partial > 0, "the file alone should hold writes of the unfinished transaction"


# -- migrations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_live_sqlite_directory(tmp_path: Path, kit: Kit, sqlite_writers: list[SqliteWriter],
                               mode: str, run: int) -> None:
    for attempt in range(ATTEMPTS):
        work = tmp_path / f"try{attempt}"
        src, w = start_writer(sqlite_writers, work, mode, seed=100 * run + attempt)
        dest = work / "dest"
        r, uri = kit.recv(dest)
        s = kit.send(src, uri, "--pause-pid", str(w.pid), timeout=30)
        done = s.wait(120)
        done.ok()
        r.wait(30).ok()
        assert is_stopped(w.pid), "keep-paused is the default: the writer must still be stopped"
        state, commits, step = w.state()
        if state == "in-txn":
            break
        w.crash()
    else:
        raise AssertionError(f"{ATTEMPTS} pauses all landed between transactions")
    # In WAL mode the open transaction is the writer's own word (its -wal outlives
    # commits, so the file proves nothing); in rollback mode the journal must be there.
    if mode == "delete":
        assert hot_journal(src) > 0, f"in a transaction (statement {step}) but no journal"
    assert commits > 0
    # At the pause the copy is the source, byte for byte, side files included.
    diffs = compare_trees(src, dest, owners=True)
    assert diffs == [], f"state {state} {commits} {step}: {diffs}"
    w.crash()
    truth = recovered(src / "app.db")
    copy = recovered(dest / "app.db")
    assert copy == truth, how_they_differ(truth, copy)
    assert len(truth[1]) == commits, "exactly the commits before the pause are in the ledger"
