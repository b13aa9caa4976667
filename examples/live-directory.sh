#!/usr/bin/env bash
# Live-migrate the data directory of a running SQLite application, on this host.
#
#   examples/live-directory.sh
#
# The application directory holds a SQLite database in rollback-journal mode and an
# exports/ directory where the application keeps saving small files atomically
# (write a temporary file, rename it over the old one) and deleting old ones. The
# writer spends most of its time inside transactions, so the pause usually lands
# mid-transaction, with a hot journal (app.db-journal) next to the database. A
# migration of app.db alone would then copy a half-written transaction with nothing
# to undo it; migrating the directory copies the journal as well, and SQLite rolls
# the transaction back when the copy is opened, exactly as it does on the source.
#
# `multifd send DIR --pause-pid WRITER` follows the tree in every pass (new files,
# renames, deletions) and leaves the writer paused after success, so the script can
# check that the copy equals the paused source file by file. It then kills the
# paused writer (a crash at the pause), opens both databases, and checks that they
# pass `PRAGMA integrity_check` and hold the same rows.
#
# Exit 77 (skipped) when Python has no sqlite3 module.
# Environment: ROWS (20000), MULTIFD (multifd; may be several words), PYTHON
# (python3), and the MULTIFD_* settings multifd reads.
set -euo pipefail

read -r -a mfd <<<"${MULTIFD:-multifd}"
py=${PYTHON:-python3}
rows=${ROWS:-20000}

if ! "$py" -c 'import sqlite3' 2>/dev/null; then
    echo "skipped: $py has no sqlite3 module"
    exit 77
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/live-directory.XXXXXX")
writer_pid=''
recv_pid=''
cleanup() {
    if [[ -n $writer_pid ]]; then
        kill -CONT "$writer_pid" 2>/dev/null || true
        kill -KILL "$writer_pid" 2>/dev/null || true
        wait "$writer_pid" 2>/dev/null || true
    fi
    if [[ -n $recv_pid ]]; then
        kill "$recv_pid" 2>/dev/null || true
        wait "$recv_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

src=$work/app dest=$work/copy
mkdir -p "$src/exports"

# field FILE EVENT KEY: KEY of the last complete EVENT line in FILE ("" if none).
field() {
    "$py" - "$@" <<'EOF'
import json, sys
path, event, key = sys.argv[1:]
value = ""
with open(path) as f:
    for line in f:
        if not line.endswith("\n"):
            break
        ev = json.loads(line)
        if ev.get("event") == event:
            value = ev.get(key, "")
print(value)
EOF
}

# state PID: the state letter of a process (R, S, T, ...), "" if it is gone.
state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    echo "${stat%% *}"
}

cat >"$work/app.py" <<'EOF'
"""The application: transactions on app.db, atomic saves and deletions in exports/."""
import os, random, sqlite3, sys, time
root, rows = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(os.path.join(root, "app.db"), isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, amount INTEGER, note BLOB)")
db.execute("CREATE TABLE IF NOT EXISTS totals (n INTEGER, s INTEGER)")
db.execute("BEGIN")
db.execute("INSERT INTO totals VALUES (0, 0)")
for _ in range(rows):
    db.execute("INSERT INTO ledger (amount, note) VALUES (?, ?)", (1, os.urandom(400)))
db.execute("UPDATE totals SET n = ?, s = ?", (rows, rows))
db.execute("COMMIT")
print("ready", flush=True)
rnd, k = random.Random(1), 0
while True:
    k += 1
    amount = rnd.randint(1, 100)
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO ledger (amount, note) VALUES (?, ?)", (amount, os.urandom(400)))
    db.execute("UPDATE ledger SET note = ? WHERE id = ?", (os.urandom(400), rnd.randint(1, rows)))
    db.execute("UPDATE totals SET n = n + 1, s = s + ?", (amount,))
    time.sleep(0.02)  # inside the transaction: the journal is hot most of the time
    db.execute("COMMIT")
    name = os.path.join(root, "exports", f"report-{k % 50}.txt")
    with open(name + ".tmp", "w") as f:
        f.write(f"{k} {amount}\n" * rnd.randint(1, 200))
    os.rename(name + ".tmp", name)  # an atomic save: a new inode under the old name
    if k % 7 == 0:
        old = os.path.join(root, "exports", f"report-{rnd.randint(0, 49)}.txt")
        if os.path.exists(old):
            os.unlink(old)
EOF

"$py" "$work/app.py" "$src" "$rows" >"$work/app.out" 2>"$work/app.err" &
writer_pid=$!
for _ in $(seq 1 300); do
    grep -qs ready "$work/app.out" && break
    kill -0 "$writer_pid" 2>/dev/null || break
    sleep 0.1
done
if ! grep -qs ready "$work/app.out"; then
    echo "the application did not start: $(cat "$work/app.err")" >&2
    exit 1
fi
sleep 1
echo "application $writer_pid is writing $src (SQLite, rollback journal; exports/)"

"${mfd[@]}" recv --json "$dest" >"$work/recv.json" 2>"$work/recv.log" &
recv_pid=$!
uri=
for _ in $(seq 1 300); do
    uri=$(field "$work/recv.json" listening uri)
    [[ -n $uri ]] && break
    kill -0 "$recv_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $uri ]]; then
    echo "recv did not start: $(field "$work/recv.json" failed error)" >&2
    cat "$work/recv.log" >&2
    exit 3
fi

send_rc=0
"${mfd[@]}" send --json "$src" --to "$uri" --pause-pid "$writer_pid" \
    >"$work/send.json" 2>"$work/send.log" || send_rc=$?
recv_rc=0
if [[ $send_rc -ne 0 ]]; then
    sleep 2
    kill "$recv_pid" 2>/dev/null || true  # it may still wait for a source
fi
wait "$recv_pid" || recv_rc=$?
recv_pid=
if [[ $send_rc -ne 0 || $recv_rc -ne 0 ]]; then
    echo "migration failed: send exit $send_rc ($(field "$work/send.json" failed error)), " \
        "recv exit $recv_rc ($(field "$work/recv.json" failed error))" >&2
    exit $((send_rc ? send_rc : recv_rc))
fi

# The passes, as send reported them: tree entries walked, tree changes sent, files read.
"$py" - "$work/send.json" <<'EOF'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
print("pass  entries  tree ops  files read  sent KiB     ms")
for e in events:
    if e["event"] == "pass":
        note = "   <- final pass, application paused" if e["final"] else ""
        print(f"{e['pass']:4d} {e.get('entries', 0):8d} {e.get('tree_ops', 0):9d} "
              f"{e.get('files_read', 0):11d} {e['sent_bytes'] / 1024:9.0f} "
              f"{e['duration_ms']:6.0f}{note}")
done = events[-1]
print(f"total {done['total_time_ms']:.0f} ms, downtime {done['downtime_ms']:.0f} ms, "
      f"{done['passes']} passes, paused: {done['paused']}")
EOF

# keep-paused: the application is still stopped, so its directory cannot have moved on.
st=$(state "$writer_pid")
if [[ $st != T && $st != t ]]; then
    echo "the application is not paused after the migration (state ${st:-gone})" >&2
    exit 1
fi
if [[ -s $src/app.db-journal ]]; then
    echo "the pause landed mid-transaction: app.db-journal is hot at the source"
    [[ -s $dest/app.db-journal ]] || { echo "the copy lacks the hot journal" >&2; exit 6; }
else
    echo "the pause landed between transactions: no journal at the source"
fi
if diff -r --no-dereference "$src" "$dest" >"$work/diff.out"; then
    echo "verify: the paused directory and the copy are identical, file by file"
else
    echo "verify: the copy differs from the paused directory:" >&2
    head -5 "$work/diff.out" >&2
    exit 6
fi

# A crash at the pause: kill the stopped application, then let SQLite recover both.
kill -KILL "$writer_pid"
{ wait "$writer_pid"; } 2>/dev/null || true  # no "Killed" notice from bash
writer_pid=
"$py" - "$src/app.db" "$dest/app.db" <<'EOF'
import sqlite3, sys
seen = []
for path in sys.argv[1:]:
    db = sqlite3.connect(path)
    check = db.execute("PRAGMA integrity_check").fetchone()[0]
    rows, total = db.execute("SELECT count(*), sum(amount) FROM ledger").fetchone()
    n, s = db.execute("SELECT n, s FROM totals").fetchone()
    db.close()
    if check != "ok" or (n, s) != (rows, total):
        sys.exit(f"{path}: integrity_check {check!r}, ledger {rows}/{total}, totals {n}/{s}")
    seen.append((rows, total))
if seen[0] != seen[1]:
    sys.exit(f"after recovery the source has {seen[0]} and the copy {seen[1]} (rows, sum)")
print(f"recovered: source and copy pass integrity_check and agree: {seen[0][0]} rows, "
      f"sum {seen[0][1]}")
EOF
echo "done"
