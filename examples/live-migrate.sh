#!/usr/bin/env bash
# Live-migrate a file that another process keeps writing, on this host.
#
#   examples/live-migrate.sh
#
# Creates a 64 MiB file of random data in a temporary directory, starts
# examples/writer.py on it (random 4 KiB pages at 16 MiB/s), and migrates it
# with `multifd send --pause-pid WRITER`. send pauses the writer (SIGSTOP) for the
# final pass and, by default (--after-success keep-paused), leaves it paused, so
# the source can be compared with the copy byte for byte. Then the old writer is
# continued and killed, as one would once the workload runs on the destination.
#
# Environment: SIZE_MIB (64), RATE (16M), HOT_SET (16M), MULTIFD (multifd; may be
# several words), PYTHON (python3), and the MULTIFD_* settings multifd reads.
set -euo pipefail

read -r -a mfd <<<"${MULTIFD:-multifd}"
py=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
size_mib=${SIZE_MIB:-64}

work=$(mktemp -d "${TMPDIR:-/tmp}/live-migrate.XXXXXX")
writer_pid=''
recv_pid=''
cleanup() {
    if [[ -n $writer_pid ]]; then
        kill -CONT "$writer_pid" 2>/dev/null || true
        kill "$writer_pid" 2>/dev/null || true
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

src=$work/source.img dest=$work/dest.img

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

echo "creating $size_mib MiB of random data in $src"
head -c $((size_mib << 20)) /dev/urandom >"$src"

"$py" "$here/writer.py" "$src" --rate "${RATE:-16M}" --hot-set "${HOT_SET:-16M}" &
writer_pid=$!
before=$(stat -c %Y.%y "$src")
for _ in $(seq 1 100); do
    [[ $(stat -c %Y.%y "$src") == "$before" ]] || break
    sleep 0.05
done
echo "writer $writer_pid is writing $src at ${RATE:-16M}/s"

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

# The passes, as send reported them.
"$py" - "$work/send.json" <<'EOF'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
print("pass  dirty MiB  sent MiB      ms  expected downtime ms")
for e in events:
    if e["event"] == "pass":
        exp = "-" if e["expected_downtime_ms"] is None else f"{e['expected_downtime_ms']:.0f}"
        note = "   <- final pass, writer paused" if e["final"] else ""
        print(f"{e['pass']:4d} {e['dirty_bytes'] / 2**20:10.1f} {e['sent_bytes'] / 2**20:9.1f} "
              f"{e['duration_ms']:7.0f} {exp:>21}{note}")
done = events[-1]
print(f"total {done['total_time_ms']:.0f} ms, downtime {done['downtime_ms']:.0f} ms, "
      f"{done['passes']} passes, paused: {done['paused']}")
EOF

# keep-paused: the writer is still stopped, so the source cannot have moved on.
st=$(state "$writer_pid")
if [[ $st != T && $st != t ]]; then
    echo "the writer is not paused after the migration (state ${st:-gone})" >&2
    exit 1
fi
if cmp -s "$src" "$dest"; then
    echo "verify: source (writer paused) and copy are identical"
else
    echo "verify: the copy differs from the paused source" >&2
    exit 6
fi

# The workload would now start on the destination; the old writer goes away.
kill -CONT "$writer_pid"
kill "$writer_pid"
wait "$writer_pid" 2>/dev/null || true
writer_pid=
echo "old writer continued and stopped; done"
