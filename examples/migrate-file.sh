#!/usr/bin/env bash
# Migrate SRC to DEST on this host: recv in the background, send, verify.
#
#   examples/migrate-file.sh SRC DEST [SEND_OPTION...]
#
# Starts `multifd recv --json DEST` in the background, reads the address it
# listens on from its first JSON event, runs `multifd send SRC --to URI`, waits
# for both, and compares DEST with SRC (cmp). Prints the counters of send's
# `completed` event, or the `error` of the `failed` event (exiting with its code).
#
# Environment: MULTIFD (default: multifd; may be several words, e.g.
# "python3 -m multifd_cli"), PYTHON (default: python3), and every MULTIFD_*
# setting multifd itself reads (MULTIFD_TIMEOUT, MULTIFD_CHANNELS, ...).
set -euo pipefail

usage() { echo "usage: $0 SRC DEST [SEND_OPTION...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
src=$1 dest=$2
shift 2
read -r -a mfd <<<"${MULTIFD:-multifd}"
py=${PYTHON:-python3}

[[ -f $src || -b $src ]] || { echo "$0: $src: no such file or block device" >&2; exit 2; }
[[ ! -e $dest ]] || { echo "$0: $dest exists; remove it first" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/migrate-file.XXXXXX")
recv_pid=
cleanup() {
    if [[ -n $recv_pid ]] && kill -0 "$recv_pid" 2>/dev/null; then
        kill "$recv_pid" 2>/dev/null || true
        wait "$recv_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# field FILE EVENT KEY: KEY of the last EVENT in a file of JSON lines ("" if none).
field() {
    "$py" - "$@" <<'EOF'
import json, sys
path, event, key = sys.argv[1:]
value = ""
with open(path) as f:
    for line in f:
        if not line.endswith("\n"):
            break  # still being written
        ev = json.loads(line)
        if ev.get("event") == event:
            value = ev.get(key, "")
print(value)
EOF
}

# 1. recv, in the background; its first event says where it listens.
"${mfd[@]}" recv --json "$dest" >"$work/recv.json" 2>"$work/recv.log" &
recv_pid=$!
uri=
for _ in $(seq 1 300); do  # up to 30 s
    uri=$(field "$work/recv.json" listening uri)
    [[ -z $uri ]] || break
    if ! kill -0 "$recv_pid" 2>/dev/null; then
        rc=0
        wait "$recv_pid" || rc=$?
        recv_pid=
        echo "recv failed (exit $rc): $(field "$work/recv.json" failed error)" >&2
        exit "$rc"
    fi
    sleep 0.1
done
[[ -n $uri ]] || { echo "recv did not start listening within 30 s" >&2; cat "$work/recv.log" >&2; exit 3; }
echo "recv listening on $uri"

# 2. send.
send_rc=0
"${mfd[@]}" send --json "$src" --to "$uri" "$@" >"$work/send.json" 2>"$work/send.log" || send_rc=$?

# 3. recv ends with the same session. If send failed before it reached recv,
#    recv would wait for a source until its --timeout: give it 10 s, then stop it.
if [[ $send_rc -ne 0 ]]; then
    for _ in $(seq 1 100); do
        kill -0 "$recv_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$recv_pid" 2>/dev/null || true
fi
recv_rc=0
wait "$recv_pid" || recv_rc=$?
recv_pid=

if [[ $send_rc -ne 0 || $recv_rc -ne 0 ]]; then
    echo "migration failed: send exit $send_rc, recv exit $recv_rc" >&2
    echo "  send: $(field "$work/send.json" failed error)" >&2
    echo "  recv: $(field "$work/recv.json" failed error)" >&2
    exit $((send_rc ? send_rc : recv_rc))
fi

# 4. verify and report.
if ! cmp -s "$src" "$dest"; then
    echo "verify: $dest differs from $src (was $src written during the migration?)" >&2
    exit 6
fi
"$py" - "$work/send.json" <<'EOF'
import json, sys
done = [json.loads(line) for line in open(sys.argv[1])][-1]
# downtime_ms is null when nothing was paused (no --pause-* option).
down = "none" if done["downtime_ms"] is None else "{:.0f} ms".format(done["downtime_ms"])
print("completed: {passes} passes, {transferred_bytes} bytes on the wire in {total_time_ms:.0f} ms "
      "({mbps:.0f} Mbit/s), downtime {down}, {channels} channels, "
      "compression {compression}".format(down=down, **done))
print("digest", done["digest"])
EOF
echo "verify: cmp $src $dest: identical"
