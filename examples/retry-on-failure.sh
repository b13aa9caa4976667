#!/usr/bin/env bash
# React to multifd's exit codes and JSON events: retry, fall back, or give up.
#
#   examples/retry-on-failure.sh                            # self-contained demo
#   examples/retry-on-failure.sh SOURCE DEST [SEND_OPTION...]
#
# Migrates SOURCE to DEST on this host (recv on tcp:127.0.0.1:PORT) and
#   exit 3 (connection failure or timeout): retries up to RETRIES times, waiting
#          BACKOFF seconds before the first retry and twice as long each time after;
#   exit 9 (did not converge): retries with a gentler setting: --auto-converge when
#          the writer can be throttled (--pause-pid or --pause-cgroup given), else
#          four times as many --max-passes;
#   any other failure: gives up with that exit code.
# Every failed attempt prints the `error` of send's final `failed` JSON event.
#
# recv serves one session and exits, so a new one is started whenever the last
# one is gone. RECV_DELAY delays the first one, like a destination that comes up
# late: send then starts first, finds nobody listening on the port, waits for it
# (--wait-for-recv, as long as SEND_TIMEOUT) and fails with exit 3. Without arguments the script
# creates a 16 MiB source in a temporary directory and uses RECV_DELAY=3, so the
# first attempt fails and the retry succeeds.
#
# Environment: RETRIES (4), BACKOFF (1), PORT (a free one), RECV_DELAY (0, demo 3),
# SEND_TIMEOUT (2), MULTIFD (multifd; may be several words), PYTHON (python3).
set -euo pipefail

read -r -a mfd <<<"${MULTIFD:-multifd}"
py=${PYTHON:-python3}
retries=${RETRIES:-4}
backoff=${BACKOFF:-1}
send_timeout=${SEND_TIMEOUT:-2}

work=$(mktemp -d "${TMPDIR:-/tmp}/retry-on-failure.XXXXXX")
recv_pid=
cleanup() {
    if [[ -n $recv_pid ]]; then
        kill "$recv_pid" 2>/dev/null || true
        wait "$recv_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $# -eq 0 ]]; then
    src=$work/source.img dest=$work/dest.img
    head -c $((16 << 20)) /dev/urandom >"$src"
    recv_delay=${RECV_DELAY:-3}
    echo "demo: $src -> $dest; recv starts ${recv_delay} s late"
elif [[ $# -ge 2 ]]; then
    src=$1 dest=$2
    shift 2
    recv_delay=${RECV_DELAY:-0}
else
    echo "usage: $0 [SOURCE DEST [SEND_OPTION...]]" >&2
    exit 2
fi
opts=("$@")
port=${PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
uri=tcp:127.0.0.1:$port

# last_field FILE EVENT KEY: KEY of the last EVENT in a file of JSON lines ("" if none).
last_field() {
    "$py" - "$@" <<'EOF'
import json, sys
path, event, key = sys.argv[1:]
value = ""
try:
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                ev = json.loads(line)
                if ev.get("event") == event:
                    value = ev.get(key, "")
except FileNotFoundError:
    pass
print("" if value is None else value)
EOF
}

# session_started FILE: true once recv printed anything after `listening`.
session_started() {
    [[ $(grep -c . "$1" 2>/dev/null || true) -gt 1 ]]
}

recv_n=0
start_recv() {
    recv_n=$((recv_n + 1))
    recv_json=$work/recv-$recv_n.json
    local delay=$1
    (
        sleep "$delay"
        exec "${mfd[@]}" recv --json --listen "$uri" "$dest"
    ) >"$recv_json" 2>"$work/recv-$recv_n.log" &
    recv_pid=$!
}

stop_recv_after_failure() {
    # A recv whose session failed exits by itself (give it 10 s); one still waiting
    # for a source (no session yet) is kept for the next attempt.
    [[ -n $recv_pid ]] || return 0
    if kill -0 "$recv_pid" 2>/dev/null && ! session_started "$recv_json"; then
        return 0
    fi
    for _ in $(seq 1 100); do
        kill -0 "$recv_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$recv_pid" 2>/dev/null || true
    local recv_rc=0
    wait "$recv_pid" 2>/dev/null || recv_rc=$?
    recv_pid=
    if [[ -z $(last_field "$recv_json" listening uri) ]]; then
        # recv failed on its own before listening (DEST exists, port taken, ...).
        echo "recv failed (exit $recv_rc): $(last_field "$recv_json" failed error)" >&2
        exit "$recv_rc"
    fi
}

# set_opt NAME VALUE: replace or add `NAME VALUE` in opts.
set_opt() {
    local i
    for ((i = 0; i < ${#opts[@]}; i++)); do
        if [[ ${opts[i]} == "$1" ]]; then
            opts[i + 1]=$2
            return
        fi
    done
    opts+=("$1" "$2")
}

# get_opt NAME DEFAULT
get_opt() {
    local i
    for ((i = 0; i < ${#opts[@]}; i++)); do
        [[ ${opts[i]} == "$1" ]] && { echo "${opts[i + 1]}"; return; }
    done
    echo "$2"
}

has_opt() {
    local o
    for o in "${opts[@]+"${opts[@]}"}"; do [[ $o == "$1" ]] && return 0; done
    return 1
}

start_recv "$recv_delay"
attempt=0
while true; do
    attempt=$((attempt + 1))
    send_json=$work/send-$attempt.json
    echo "attempt $attempt: multifd send $src --to $uri --timeout $send_timeout" \
        "--wait-for-recv $send_timeout ${opts[*]+${opts[*]}}"
    rc=0
    # recv was just (re)started in the background: give it the time to listen.
    "${mfd[@]}" send --json --timeout "$send_timeout" --wait-for-recv "$send_timeout" \
        "$src" --to "$uri" \
        "${opts[@]+"${opts[@]}"}" >"$send_json" 2>"$work/send-$attempt.log" || rc=$?
    if [[ $rc -eq 0 ]]; then
        wait "$recv_pid" || { echo "recv failed after send succeeded" >&2; exit 1; }
        recv_pid=
        down=$(last_field "$send_json" completed downtime_ms)  # empty when nothing was paused
        echo "attempt $attempt: completed: $(last_field "$send_json" completed passes) passes," \
            "downtime ${down:+$down ms}${down:-none}"
        if [[ -f $src ]]; then
            cmp "$src" "$dest" && echo "verify: $dest == $src"
        fi
        exit 0
    fi
    error=$(last_field "$send_json" failed error)
    echo "attempt $attempt: exit $rc: ${error:-(no failed event)}"
    stop_recv_after_failure
    if [[ $attempt -gt $retries ]]; then
        echo "giving up after $attempt attempts" >&2
        exit "$rc"
    fi
    case $rc in
        3)
            echo "connection failure: retrying in $backoff s"
            ;;
        9)
            if { has_opt --pause-pid || has_opt --pause-cgroup; } && ! has_opt --auto-converge; then
                opts+=(--auto-converge)
                echo "did not converge: retrying in $backoff s with --auto-converge"
            else
                passes=$(get_opt --max-passes 30)
                set_opt --max-passes $((passes * 4))
                echo "did not converge: retrying in $backoff s with --max-passes $((passes * 4))"
            fi
            ;;
        *)
            echo "exit $rc is not worth a retry; giving up" >&2
            exit "$rc"
            ;;
    esac
    sleep "$backoff"
    backoff=$(awk -v b="$backoff" 'BEGIN { print b * 2 }')
    if [[ -z $recv_pid ]]; then
        start_recv 0
    fi
done
