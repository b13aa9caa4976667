"""A SQLite writer that spends most of its time inside transactions, so that a pause
lands mid-transaction: with a hot journal in rollback-journal mode, with uncommitted
frames in WAL mode.

Each transaction: BEGIN IMMEDIATE, then several inserts and updates spread over many
pages (a tiny page cache makes SQLite spill them into the database file, or the WAL,
before the commit), with small sleeps between them, then COMMIT.

It says what it is doing in a status file outside the database's directory, with one
pwrite each time (so a SIGSTOP never leaves it half written):
'in-txn N S' from the first write of a transaction until just before its COMMIT (S
statements of it done), 'commit N' around the COMMIT, 'idle N' after it (N counts the
commits so far).

    sqlitewriter.py DB --status FILE --mode delete|wal [--seed N]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import time

ROWS = 2000
BLOB = 600


def say(fd: int, state: str, commits: int, step: int = 0) -> None:
    os.pwrite(fd, f"{state} {commits} {step}".ljust(40).encode(), 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--status", required=True)
    ap.add_argument("--mode", choices=["delete", "wal"], required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    fd = os.open(a.status, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    say(fd, "setup", 0)
    db = sqlite3.connect(a.db, isolation_level=None)
    db.execute(f"PRAGMA journal_mode={a.mode}")
    db.execute("PRAGMA cache_size=8")  # pages: a transaction spills before its commit
    db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, txn INTEGER, "
               "k INTEGER, v BLOB)")
    db.execute("CREATE TABLE IF NOT EXISTS ledger (txn INTEGER PRIMARY KEY, total INTEGER)")
    db.execute("BEGIN")
    for i in range(ROWS):
        db.execute("INSERT OR IGNORE INTO t VALUES (?, 0, 0, ?)", (i, rng.randbytes(BLOB)))
    db.execute("COMMIT")
    commits = 0
    say(fd, "idle", commits)
    txn = 0
    while True:
        txn += 1
        db.execute("BEGIN IMMEDIATE")
        total = 0
        for step in range(12):
            k = rng.randrange(1000)
            total += k
            if step % 3 == 0:
                db.execute("INSERT INTO t (txn, k, v) VALUES (?, ?, ?)",
                           (txn, k, rng.randbytes(BLOB)))
            else:
                lo = rng.randrange(ROWS)
                db.execute("UPDATE t SET txn = ?, k = k + ?, v = ? WHERE id BETWEEN ? AND ?",
                           (txn, k, rng.randbytes(BLOB), lo, lo + 20))
            say(fd, "in-txn", commits, step + 1)
            time.sleep(0.004)
        db.execute("INSERT INTO ledger VALUES (?, ?)", (txn, total))
        say(fd, "commit", commits)
        db.execute("COMMIT")
        commits += 1
        say(fd, "idle", commits)


if __name__ == "__main__":
    main()
