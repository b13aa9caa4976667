#!/usr/bin/env bash
# Migrate a block device: a loop device over a temporary file.
#
#   examples/block-device.sh
#
# Creates a 32 MiB image (random data, a run of zeros, random data), attaches it
# with `losetup -f --show` and migrates the block device twice:
#   1. into a regular DEST file (`multifd recv dest.img`), compared with cmp;
#   2. into another loop device (`multifd recv --force /dev/loopM`), whose backing
#      file starts out full of random bytes, so the run of zeros must really be
#      written there; the two devices are compared with cmp.
# Every loop device it attached is detached at the end.
#
# Loop devices need root and /dev/loop*: when losetup is missing or fails, the
# script prints "skipped: REASON" and exits 77 (the automake/ctest "skipped" code).
#
# Environment: SIZE_MIB (32), LOSETUP (losetup; may be several words), MULTIFD
# (multifd; may be several words), PYTHON (python3), and the MULTIFD_* settings
# multifd reads.
set -euo pipefail

read -r -a mfd <<<"${MULTIFD:-multifd}"
read -r -a losetup <<<"${LOSETUP:-losetup}"
py=${PYTHON:-python3}
size_mib=${SIZE_MIB:-32}

skip() {
    echo "skipped: $*"
    exit 77
}

work=$(mktemp -d "${TMPDIR:-/tmp}/block-device.XXXXXX")
devices=()
recv_pid=''
cleanup() {
    local d
    if [[ -n $recv_pid ]]; then
        kill "$recv_pid" 2>/dev/null || true
        wait "$recv_pid" 2>/dev/null || true
    fi
    for d in "${devices[@]+"${devices[@]}"}"; do
        "${losetup[@]}" -d "$d" 2>/dev/null || echo "warning: could not detach $d" >&2
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v "${losetup[0]}" >/dev/null 2>&1 || skip "${losetup[0]} not found (util-linux)"

# attach FILE: attach a loop device backed by FILE, set $attached to its name, and
# remember it for the cleanup; skip the whole script if that is impossible.
attached=''
attach() {
    if ! attached=$("${losetup[@]}" -f --show "$1" 2>"$work/losetup.err"); then
        skip "cannot attach a loop device (needs root and /dev/loop*):" \
            "$(tr '\n' ' ' <"$work/losetup.err")"
    fi
    [[ -n $attached ]] || skip "losetup printed no device name"
    devices+=("$attached")
    [[ -b $attached ]] || skip "$attached is not a block device node in this environment"
}

# migrate SOURCE DEST [RECV_OPTION...]: recv in the background, send, wait for both.
migrate() {
    local from=$1 to=$2 uri='' send_rc=0 recv_rc=0
    shift 2
    "${mfd[@]}" recv --json "$@" "$to" >"$work/recv.json" 2>"$work/recv.log" &
    recv_pid=$!
    for _ in $(seq 1 300); do
        uri=$("$py" -c '
import json, sys
with open(sys.argv[1]) as f:
    line = f.readline()
print(json.loads(line).get("uri", "") if line.endswith("\n") else "")
' "$work/recv.json")
        [[ -n $uri ]] && break
        kill -0 "$recv_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $uri ]]; then
        echo "recv did not start:" >&2
        cat "$work/recv.json" "$work/recv.log" >&2
        exit 3
    fi
    "${mfd[@]}" send --json "$from" --to "$uri" >"$work/send.json" 2>"$work/send.log" \
        || send_rc=$?
    if [[ $send_rc -ne 0 ]]; then
        echo "send failed (exit $send_rc):" >&2
        tail -n 1 "$work/send.json" >&2
        exit "$send_rc"
    fi
    wait "$recv_pid" || recv_rc=$?
    recv_pid=''
    if [[ $recv_rc -ne 0 ]]; then
        echo "recv failed (exit $recv_rc):" >&2
        tail -n 1 "$work/recv.json" >&2
        exit "$recv_rc"
    fi
    "$py" -c '
import json, sys
done = [json.loads(line) for line in open(sys.argv[1])][-1]
print("   completed: {passes} passes, {normal_pages} pages sent, {zero_pages} zero pages "
      "described, {transferred_bytes} bytes on the wire, {total_time_ms:.0f} ms".format(**done))
' "$work/send.json"
}

img=$work/source.img
third=$((size_mib / 3))
{
    head -c $((third << 20)) /dev/urandom
    head -c $((third << 20)) /dev/zero
    head -c $(((size_mib - 2 * third) << 20)) /dev/urandom
} >"$img"
attach "$img"
dev=$attached
echo "source: $dev ($size_mib MiB: random, zeros, random; backed by $img)"

# 1. The device into a regular file.
dest=$work/dest.img
echo "1. $dev -> $dest (a regular file)"
migrate "$dev" "$dest"
cmp "$dev" "$dest"
echo "   verify: cmp $dev $dest: identical"

# 2. The device into another device, whose old content is random garbage.
target_img=$work/target.img
head -c $((size_mib << 20)) /dev/urandom >"$target_img"
attach "$target_img"
target=$attached
echo "2. $dev -> $target (a block device, recv --force)"
migrate "$dev" "$target" --force
cmp "$dev" "$target"
echo "   verify: cmp $dev $target: identical"
