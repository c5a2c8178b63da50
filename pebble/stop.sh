#!/usr/bin/env bash
# Stop what pebble/run.sh started: only the PIDs it recorded in RUN_DIR, and only if each PID
# still belongs to the binary it was started from (a reused PID is left alone).
# SIGTERM, then SIGKILL after a deadline (PEBBLE_STOP_TIMEOUT, default 5 s).
#
# Usage: bash pebble/stop.sh [RUN_DIR]      RUN_DIR default: <repo>/.cache/pebble/run
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.cache/pebble/bin"
RUN_DIR="${1:-$ROOT/.cache/pebble/run}"
TIMEOUT="${PEBBLE_STOP_TIMEOUT:-5}"

say() { printf 'pebble/stop.sh: %s\n' "$*" >&2; }

# gone PID: true once PID no longer exists (or is a zombie, i.e. dead but unreaped by its
# parent, which is not us).
gone() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 0
    [[ -z "$state" || "$state" == Z ]]
}

# /proc/PID/exe is the resolved path: compare with the resolved binary (.cache may be a symlink,
# as in a git worktree sharing the download), else a running Pebble is taken for a reused PID.
stop_one() {
    local name="$1" exe="$2" pidfile="$RUN_DIR/$1.pid" pid deadline
    [[ -f "$pidfile" ]] || { say "$name: not running (no $pidfile)"; return 0; }
    pid="$(cat "$pidfile")"
    if ! [[ "$pid" =~ ^[0-9]+$ ]] || [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != "$(readlink -f "$exe")" ]]; then
        say "$name: pid '$pid' is not $exe any more; nothing to stop"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(( $(date +%s%N) + TIMEOUT * 1000000000 ))
    while ! gone "$pid"; do
        if (( $(date +%s%N) > deadline )); then
            say "$name: pid $pid ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.02  # polling interval, bounded by the deadline above
    done
    rm -f "$pidfile"
    say "$name: stopped pid $pid"
}

# Pebble first: it is challtestsrv's DNS client, not the other way round.
stop_one pebble "$BIN/pebble"
stop_one challtestsrv "$BIN/pebble-challtestsrv"
rm -f "$RUN_DIR/env"
