#!/usr/bin/env bash
# Start Pebble 2.10 + pebble-challtestsrv on 127.0.0.1 in the background, for a developer or
# the demo, and print the ACME directory URL and the CA bundle that signs Pebble's HTTPS.
# (Tests do not use this: tests/support/pebble_fixtures.py starts private instances.)
#
# Usage: bash pebble/run.sh [RUN_DIR]      RUN_DIR default: <repo>/.cache/pebble/run
#        bash pebble/stop.sh [RUN_DIR]     stops exactly the PIDs this script recorded
#
# RUN_DIR gets: tls/ (ca.pem = the CA bundle; cert/key for Pebble's listeners),
# pebble-config.json, pebble.pid, challtestsrv.pid, pebble.log, challtestsrv.log, env.
#
# Ports (all on 127.0.0.1), overridable by environment:
#   PEBBLE_PORT=14000            ACME directory: https://127.0.0.1:$PEBBLE_PORT/dir
#   PEBBLE_MGMT_PORT=15000       management API: /roots/0, /intermediates/0, /cert-status-by-serial/<hex>
#   PEBBLE_HTTP_PORT=5002        where Pebble connects for http-01 validation
#   PEBBLE_TLS_PORT=5001         where Pebble connects for tls-alpn-01 validation
#   CHALLTESTSRV_DNS_PORT=8053   mock DNS (A 127.0.0.1 for every name), Pebble's resolver
#   CHALLTESTSRV_MGMT_PORT=8055  challtestsrv API: POST /set-txt {"host": "name.", "value": ...}
# Other settings: PEBBLE_VALIDITY (certificate lifetime, seconds), PEBBLE_START_TIMEOUT (15 s).
# Pebble runs deterministically: PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0
# (set any of them in the environment to override).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.cache/pebble/bin"
RUN_DIR="$(mkdir -p "${1:-$ROOT/.cache/pebble/run}" && cd "${1:-$ROOT/.cache/pebble/run}" && pwd)"

PEBBLE_PORT="${PEBBLE_PORT:-14000}"
PEBBLE_MGMT_PORT="${PEBBLE_MGMT_PORT:-15000}"
PEBBLE_HTTP_PORT="${PEBBLE_HTTP_PORT:-5002}"
PEBBLE_TLS_PORT="${PEBBLE_TLS_PORT:-5001}"
CHALLTESTSRV_DNS_PORT="${CHALLTESTSRV_DNS_PORT:-8053}"
CHALLTESTSRV_MGMT_PORT="${CHALLTESTSRV_MGMT_PORT:-8055}"
PEBBLE_VALIDITY="${PEBBLE_VALIDITY:-}"
PEBBLE_START_TIMEOUT="${PEBBLE_START_TIMEOUT:-15}"
export PEBBLE_VA_NOSLEEP="${PEBBLE_VA_NOSLEEP:-1}"
export PEBBLE_WFE_NONCEREJECT="${PEBBLE_WFE_NONCEREJECT:-0}"
export PEBBLE_AUTHZREUSE="${PEBBLE_AUTHZREUSE:-0}"

say() { printf 'pebble/run.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Python with `cryptography` (the repo's venv, made by scripts/setup.sh) for the TLS files,
# the config and the readiness probe.
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3 || true)"
[[ -n "$PY" ]] && "$PY" -c 'import cryptography' 2>/dev/null \
    || die "need a python3 with 'cryptography': run bash scripts/setup.sh"
for name in pebble pebble-challtestsrv; do
    [[ -x "$BIN/$name" ]] || die "$BIN/$name missing: run bash pebble/install.sh"
done

DIRECTORY_URL="https://127.0.0.1:$PEBBLE_PORT/dir"
CA_BUNDLE="$RUN_DIR/tls/ca.pem"

# running NAME: true if NAME.pid names a live process of that binary (not a reused PID).
running() {
    local pid
    pid="$(cat "$RUN_DIR/$1.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$(readlink -f "$2")" ]]
}

if running pebble "$BIN/pebble" || running challtestsrv "$BIN/pebble-challtestsrv"; then
    if running pebble "$BIN/pebble" && running challtestsrv "$BIN/pebble-challtestsrv"; then
        say "already running (pebble pid $(cat "$RUN_DIR/pebble.pid")); stop with: bash pebble/stop.sh $RUN_DIR"
        # shellcheck disable=SC1091
        source "$RUN_DIR/env"
        echo "PEBBLE_DIRECTORY_URL=$PEBBLE_DIRECTORY_URL"
        echo "PEBBLE_CA_BUNDLE=$PEBBLE_CA_BUNDLE"
        exit 0
    fi
    die "only half of the environment runs in $RUN_DIR: bash pebble/stop.sh $RUN_DIR first"
fi

[[ -s "$CA_BUNDLE" ]] || "$PY" "$ROOT/pebble/gen_certs.py" "$RUN_DIR/tls" >/dev/null

# The config: the documented template with our ports and paths ('_' keys are notes).
"$PY" - "$ROOT/pebble/pebble-config.json" "$RUN_DIR/pebble-config.json" <<EOF
import json, sys
section = {k: v for k, v in json.load(open(sys.argv[1]))["pebble"].items() if not k.startswith("_")}
section.update(
    listenAddress="127.0.0.1:$PEBBLE_PORT",
    managementListenAddress="127.0.0.1:$PEBBLE_MGMT_PORT",
    certificate="$RUN_DIR/tls/cert.pem",
    privateKey="$RUN_DIR/tls/key.pem",
    httpPort=int("$PEBBLE_HTTP_PORT"),
    tlsPort=int("$PEBBLE_TLS_PORT"),
)
if "$PEBBLE_VALIDITY":
    # Pebble 2.10 takes lifetimes from profiles only (certificateValidityPeriod is ignored).
    section.setdefault("profiles", {}).setdefault("default", {"description": "run.sh"})["validityPeriod"] = int("$PEBBLE_VALIDITY")
with open(sys.argv[2], "w") as f:
    json.dump({"pebble": section}, f, indent=2)
EOF

# Each in its own session (setsid) so a closed terminal does not take it down; the PID
# recorded is the server's own (setsid execs it when not a group leader, as here).
say "starting pebble-challtestsrv (DNS 127.0.0.1:$CHALLTESTSRV_DNS_PORT, API 127.0.0.1:$CHALLTESTSRV_MGMT_PORT)"
setsid "$BIN/pebble-challtestsrv" \
    -management "127.0.0.1:$CHALLTESTSRV_MGMT_PORT" \
    -dnsserver "127.0.0.1:$CHALLTESTSRV_DNS_PORT" \
    -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
    -http01 "" -https01 "" -tlsalpn01 "" -doh "" \
    </dev/null >>"$RUN_DIR/challtestsrv.log" 2>&1 &
echo $! >"$RUN_DIR/challtestsrv.pid"

say "starting pebble (ACME 127.0.0.1:$PEBBLE_PORT, management 127.0.0.1:$PEBBLE_MGMT_PORT)"
(cd "$RUN_DIR" && exec setsid "$BIN/pebble" -config "$RUN_DIR/pebble-config.json" \
    -dnsserver "127.0.0.1:$CHALLTESTSRV_DNS_PORT" </dev/null >>"$RUN_DIR/pebble.log" 2>&1) &
echo $! >"$RUN_DIR/pebble.pid"

# Poll until both answer, failing early if either process exits.
if ! "$PY" - <<EOF
import os, ssl, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + float("$PEBBLE_START_TIMEOUT")
ctx = ssl.create_default_context(cafile="$CA_BUNDLE")
checks = [
    ("pebble-challtestsrv", "$RUN_DIR/challtestsrv.pid", "http://127.0.0.1:$CHALLTESTSRV_MGMT_PORT/", None),
    ("pebble", "$RUN_DIR/pebble.pid", "$DIRECTORY_URL", ctx),
]
for name, pidfile, url, context in checks:
    pid = int(open(pidfile).read())
    while True:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            sys.exit(f"{name} (pid {pid}) exited during start")
        try:
            urllib.request.urlopen(url, timeout=1, context=context).close()
            break
        except urllib.error.HTTPError:
            break  # it answered: up
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{name} did not answer at {url} within $PEBBLE_START_TIMEOUT s")
        time.sleep(0.02)
EOF
then
    say "start failed; last lines of the logs:"
    tail -n 20 "$RUN_DIR/challtestsrv.log" "$RUN_DIR/pebble.log" >&2 || true
    bash "$ROOT/pebble/stop.sh" "$RUN_DIR" || true
    exit 1
fi

cat >"$RUN_DIR/env" <<EOF
PEBBLE_DIRECTORY_URL=$DIRECTORY_URL
PEBBLE_CA_BUNDLE=$CA_BUNDLE
PEBBLE_MGMT_URL=https://127.0.0.1:$PEBBLE_MGMT_PORT
PEBBLE_HTTP_PORT=$PEBBLE_HTTP_PORT
PEBBLE_TLS_PORT=$PEBBLE_TLS_PORT
CHALLTESTSRV_DNS_PORT=$CHALLTESTSRV_DNS_PORT
CHALLTESTSRV_URL=http://127.0.0.1:$CHALLTESTSRV_MGMT_PORT
EOF
say "ready (pebble pid $(cat "$RUN_DIR/pebble.pid"), challtestsrv pid $(cat "$RUN_DIR/challtestsrv.pid")); logs in $RUN_DIR"
echo "PEBBLE_DIRECTORY_URL=$DIRECTORY_URL"
echo "PEBBLE_CA_BUNDLE=$CA_BUNDLE"
