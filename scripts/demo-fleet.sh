#!/usr/bin/env bash
# certd as a fleet, on one machine (as root, Debian 12): three nodes on one PostgreSQL.
#   1. set up (apt packages incl. PostgreSQL 15, .venv, Pebble 2.10)  -> scripts/setup.sh
#   2. start a private PostgreSQL cluster on a free loopback port (never the system's), and
#      Pebble + pebble-challtestsrv on free ports                      -> pebble/run.sh
#   3. one KEK for the fleet (`certd kek init`); three nodes, each with its own nginx, deploy
#      files, state dir and control socket, the same certificate list and [cluster] with its
#      own node name; start `certd run` on each
#   4. the first certificate: one node orders it (the lease), every node deploys, reloads its
#      nginx and verifies by handshake; then a forced renewal from node2 reaches every node
#   5. show `certd status --fleet`, `certd nodes`, and what each nginx serves (openssl s_client)
#   6. stop everything it started, by PID (trap on exit)
#
# http-01 across the fleet: Pebble validates on one port (PEBBLE_HTTP_PORT), where node1's
# responder listens; nodes 2 and 3 listen on ports of their own. Whichever node orders, node1
# answers the CA from the database's shared answers (docs/FLEET.md, "http-01 across the fleet").
#
# Everything lives under DEMO_FLEET_DIR (default .cache/demo-fleet/); node N's config is
# $DEMO_FLEET_DIR/nodeN/certd.toml. DEMO_ROLLOUT: lines for [certificate.rollout] (canary
# releases, issue 17; empty until releases exist), e.g. DEMO_ROLLOUT='canaries = 1'.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO="${DEMO_FLEET_DIR:-$ROOT/.cache/demo-fleet}"
ROLLOUT="${DEMO_ROLLOUT:-}"
PGBIN=/usr/lib/postgresql/15/bin
NODES=(node1 node2 node3)
DAEMON_PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { "$ROOT/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_pg() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
certd() { local node="$1"; shift; "$ROOT/.venv/bin/certd" --config "$DEMO/$node/certd.toml" "$@"; }

cleanup() {
    local pid
    for pid in "${DAEMON_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${DAEMON_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for node in "${NODES[@]}"; do
        if [[ -f "$DEMO/$node/nginx/nginx.pid" ]]; then kill "$(cat "$DEMO/$node/nginx/nginx.pid")" 2>/dev/null || true; fi
    done
    bash "$ROOT/pebble/stop.sh" "$DEMO/pebble" >/dev/null 2>&1 || true
    if [[ -f "$DEMO/pg/data/postmaster.pid" ]]; then  # fast shutdown of our postmaster, by its PID
        pid="$(head -1 "$DEMO/pg/data/postmaster.pid")"
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

if [[ "${DEMO_SKIP_SETUP:-}" != 1 ]]; then
    say "Setting up (apt packages, virtualenv, Pebble 2.10)"
    bash scripts/setup.sh
fi
[[ -x "$PGBIN/initdb" ]] || { echo "demo-fleet: $PGBIN/initdb missing: run bash scripts/setup.sh" >&2; exit 1; }

rm -rf "$DEMO"
mkdir -p "$DEMO"
trap cleanup EXIT
PG_PORT="$(free_port)"
export PEBBLE_PORT="$(free_port)" PEBBLE_MGMT_PORT="$(free_port)" PEBBLE_HTTP_PORT="$(free_port)"
export PEBBLE_TLS_PORT="$(free_port)" CHALLTESTSRV_DNS_PORT="$(free_port)" CHALLTESTSRV_MGMT_PORT="$(free_port)"

say "Starting a private PostgreSQL 15 on 127.0.0.1:$PG_PORT (data in $DEMO/pg)"
mkdir -m 700 "$DEMO/pg"
[[ $EUID -eq 0 ]] && chown postgres: "$DEMO/pg"
as_pg "$PGBIN/initdb" -D "$DEMO/pg/data" -A trust -U postgres --no-sync -E UTF8 --locale C >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$DEMO/pg/data" -l "$DEMO/pg/log" -w -t 60 \
    -o "-p $PG_PORT -k $DEMO/pg -c listen_addresses=127.0.0.1" start >/dev/null
as_pg "$PGBIN/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE DATABASE certd"
DSN="postgresql://postgres@127.0.0.1:$PG_PORT/certd"

say "Starting Pebble and pebble-challtestsrv on 127.0.0.1"
bash pebble/run.sh "$DEMO/pebble"
"$ROOT/.venv/bin/python" - "$DEMO/pebble/tls/ca.pem" "https://127.0.0.1:$PEBBLE_MGMT_PORT/roots/0" "$DEMO/pebble-root.pem" <<'EOF'
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
with urllib.request.urlopen(sys.argv[2], context=ctx, timeout=10) as r:
    open(sys.argv[3], "wb").write(r.read())
EOF

write_node() {  # $1: node name, $2: its nginx port, $3: its http-01 responder's port
    local node="$1" dir="$DEMO/$1"
    mkdir -p "$dir/nginx/tmp" "$dir/tls"
    # nginx needs something to serve before the fleet's first certificate: a throwaway self-signed one
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=placeholder \
        -keyout "$dir/tls/privkey.pem" -out "$dir/tls/fullchain.pem" 2>/dev/null
    chmod 600 "$dir/tls/privkey.pem"
    cat > "$dir/nginx/nginx.conf" <<EOF
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/tmp;
    proxy_temp_path $dir/nginx/tmp;
    fastcgi_temp_path $dir/nginx/tmp;
    uwsgi_temp_path $dir/nginx/tmp;
    scgi_temp_path $dir/nginx/tmp;
    server {
        listen 127.0.0.1:$2 ssl;
        server_name www.example.test;
        ssl_certificate $dir/tls/fullchain.pem;
        ssl_certificate_key $dir/tls/privkey.pem;
        location / { return 200 "hello from $node\n"; }
    }
}
EOF
    nginx -e "$dir/nginx/error.log" -c "$dir/nginx/nginx.conf"
    cat > "$dir/certd.toml" <<EOF
[daemon]
state_dir = "$dir/state"
control_socket = "$dir/control.sock"

[acme]
directory = "https://127.0.0.1:$PEBBLE_PORT/dir"
email = "ops@example.test"
agree_tos = true
ca_bundle = "$DEMO/pebble/tls/ca.pem"

[keys]
kek_file = "$DEMO/kek"

[cluster]
database = "$DSN"
node = "$node"
reconcile_interval = "10s"

[[certificate]]
name = "www"
domains = ["www.example.test", "example.test"]
key_type = "ecdsa-p256"
challenge = "http-01"
http01_listen = "127.0.0.1:$3"
EOF
    if [[ -n "$ROLLOUT" ]]; then printf '\n[certificate.rollout]\n%s\n' "$ROLLOUT" >> "$dir/certd.toml"; fi
    cat >> "$dir/certd.toml" <<EOF

[[certificate.deploy.files]]
path = "$dir/tls/fullchain.pem"
content = "fullchain"

[[certificate.deploy.files]]
path = "$dir/tls/privkey.pem"
content = "privkey"

[[certificate.reload]]
hook = "nginx"
config = "$dir/nginx/nginx.conf"

[[certificate.verify]]
endpoint = "127.0.0.1:$2"
sni = "www.example.test"
ca_bundle = "$DEMO/pebble-root.pem"
EOF
}

say "Three nodes, each with its own nginx; node1 answers Pebble's http-01 port"
declare -A NGINX_PORT
for node in "${NODES[@]}"; do
    NGINX_PORT[$node]="$(free_port)"
    if [[ "$node" == node1 ]]; then http="$PEBBLE_HTTP_PORT"; else http="$(free_port)"; fi
    write_node "$node" "${NGINX_PORT[$node]}" "$http"
    echo "$node: nginx on 127.0.0.1:${NGINX_PORT[$node]}, http-01 responder on 127.0.0.1:$http$([[ $node == node1 ]] && echo " (Pebble validates here)"), config $DEMO/$node/certd.toml"
done

say "One KEK for the fleet: every node seals and opens the keys in the database with it"
certd node1 kek init     # [keys] kek_file; on real hosts, copy it to every node (docs/FLEET.md)
certd node1 check-config

# Until 127.0.0.1:$1 accepts a connection (a deadline of 30 s).
wait_port() {
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        (( SECONDS < deadline )) || { echo "demo-fleet: nothing listens on 127.0.0.1:$1 after 30 s" >&2; exit 1; }
        sleep 0.2
    done
}

say "Starting certd run on every node (node1 first: Pebble's validations reach only its responder)"
for node in "${NODES[@]}"; do
    "$ROOT/.venv/bin/certd" --config "$DEMO/$node/certd.toml" run >>"$DEMO/$node/daemon.log" 2>&1 &
    DAEMON_PIDS+=("$!")
    # A failed validation holds a name for 20 minutes (docs/DAEMON.md): no order before the
    # responder Pebble connects to is up. Behind a real load balancer any live node answers.
    if [[ "$node" == node1 ]]; then wait_port "$PEBBLE_HTTP_PORT"; fi
done

# Until every node reports the desired version of www as applied (or the deadline passes).
converged() {  # $1: the desired version to wait for ("" = any)
    "$ROOT/.venv/bin/python" - "$DEMO/node1/certd.toml" "${1:-}" <<'EOF'
import json, subprocess, sys, time
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    r = subprocess.run([sys.executable, "-m", "certd.cli", "--config", sys.argv[1], "status", "--fleet", "--json"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        (cert,) = json.loads(r.stdout)["certificates"]
        want = cert["desired_version"]
        rows = cert["nodes"]
        if want is not None and (not sys.argv[2] or want == int(sys.argv[2])) and len(rows) == 3 \
                and all(n["applied_version"] == want and n["verified_at"] for n in rows):
            print(f"every node applied and verified version {want}")
            sys.exit(0)
    time.sleep(0.5)
sys.exit(f"demo-fleet: the nodes did not converge within 120 s:\n{r.stdout}{r.stderr}")
EOF
}

say "The first certificate: one node orders it, every node deploys, reloads nginx and verifies"
converged ""

say "A forced renewal from node2: still one order; every node follows within moments"
certd node2 renew www --force --wait --reason "demo: fleet rotation"
converged 2

say "certd status --fleet (run on node3: these commands read the database)"
certd node3 status --fleet

say "certd nodes"
certd node1 nodes

say "What each node's nginx serves (openssl s_client, verified against Pebble's root)"
for node in "${NODES[@]}"; do
    printf '%s: ' "$node"
    openssl s_client -connect "127.0.0.1:${NGINX_PORT[$node]}" -servername www.example.test \
        -CAfile "$DEMO/pebble-root.pem" -verify_return_error </dev/null 2>/dev/null \
        | openssl x509 -noout -serial -enddate | tr '\n' ' '
    echo
done

say "Done. Configs, logs and state are in $DEMO (every process this script started is stopped on exit)"
