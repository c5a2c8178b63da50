#!/usr/bin/env bash
# certd's main job against a local Pebble, from a fresh Debian 12 machine (as root):
#   1. set up (apt packages, .venv, Pebble 2.10)            -> scripts/setup.sh
#   2. start Pebble + pebble-challtestsrv on 127.0.0.1      -> pebble/run.sh
#   3. issue example certificates: "www" (http-01, two names) and "wild" (dns-01 wildcard)
#   4. start nginx on the issued certificate, then rotate "www" behind it: issue, deploy,
#      reload nginx, verify the live handshake, commit
#   5. show `certd status`, `certd verify`, and check every chain with `openssl verify`
#      against the root Pebble's management API serves
#   6. stop what it started (by PID)
#
# Everything lives under .cache/demo/ (config: .cache/demo/certd.toml). Ports can be moved with
# the variables pebble/run.sh documents (PEBBLE_PORT, PEBBLE_HTTP_PORT, ...) and DEMO_NGINX_PORT.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEMO="$ROOT/.cache/demo"
RUN="$DEMO/pebble"
export PEBBLE_PORT="${PEBBLE_PORT:-14000}" PEBBLE_MGMT_PORT="${PEBBLE_MGMT_PORT:-15000}"
export PEBBLE_HTTP_PORT="${PEBBLE_HTTP_PORT:-5002}" CHALLTESTSRV_MGMT_PORT="${CHALLTESTSRV_MGMT_PORT:-8055}"
NGINX_PORT="${DEMO_NGINX_PORT:-8443}"
CERTD=("$ROOT/.venv/bin/certd" --config "$DEMO/certd.toml")

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    if [[ -f "$DEMO/nginx/nginx.pid" ]]; then
        kill "$(cat "$DEMO/nginx/nginx.pid")" 2>/dev/null || true
    fi
    bash "$ROOT/pebble/stop.sh" "$RUN" >/dev/null 2>&1 || true
}

say "Setting up (apt packages, virtualenv, Pebble 2.10)"
bash scripts/setup.sh

rm -rf "$DEMO"
mkdir -p "$DEMO/nginx" "$DEMO/live" "$DEMO/haproxy"
trap cleanup EXIT

say "Starting Pebble and pebble-challtestsrv on 127.0.0.1"
bash pebble/run.sh "$RUN"
"$ROOT/.venv/bin/python" - "$RUN/tls/ca.pem" "https://127.0.0.1:$PEBBLE_MGMT_PORT/roots/0" "$DEMO/pebble-root.pem" <<'EOF'
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
with urllib.request.urlopen(sys.argv[2], context=ctx, timeout=10) as r:
    open(sys.argv[3], "wb").write(r.read())
EOF

write_config() {  # $1: "rotate" adds nginx's reload hook and the live verification
    cat > "$DEMO/certd.toml" <<EOF
[daemon]
state_dir = "state"
control_socket = "control.sock"

[acme]
directory = "https://127.0.0.1:$PEBBLE_PORT/dir"
email = "ops@example.test"
agree_tos = true
ca_bundle = "$RUN/tls/ca.pem"

[[certificate]]
name = "www"
domains = ["www.example.test", "example.test"]
key_type = "ecdsa-p256"
challenge = "http-01"
http01_listen = "127.0.0.1:$PEBBLE_HTTP_PORT"

[certificate.deploy]
live_dir = "live/www"
EOF
    if [[ "${1:-}" == rotate ]]; then
        cat >> "$DEMO/certd.toml" <<EOF

[[certificate.reload]]
hook = "nginx"
config = "nginx/nginx.conf"

[[certificate.verify]]
endpoint = "127.0.0.1:$NGINX_PORT"
sni = "www.example.test"
ca_bundle = "pebble-root.pem"
EOF
    fi
    cat >> "$DEMO/certd.toml" <<EOF

[[certificate]]
name = "wild"
domains = ["*.demo.example.test", "demo.example.test"]
key_type = "rsa-2048"
challenge = "dns-01"
dns01_hook = ["$ROOT/hooks/dns-challtestsrv", "http://127.0.0.1:$CHALLTESTSRV_MGMT_PORT"]

[certificate.deploy]
live_dir = "live/wild"
combined = "haproxy/wild.pem"
EOF
}

say "Issuing the example certificates (certd renew --all)"
write_config
"${CERTD[@]}" check-config
"${CERTD[@]}" renew --all --wait

say "Starting nginx on 127.0.0.1:$NGINX_PORT with the issued certificate"
cat > "$DEMO/nginx/nginx.conf" <<EOF
pid $DEMO/nginx/nginx.pid;
error_log $DEMO/nginx/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $DEMO/nginx/tmp;
    proxy_temp_path $DEMO/nginx/tmp;
    fastcgi_temp_path $DEMO/nginx/tmp;
    uwsgi_temp_path $DEMO/nginx/tmp;
    scgi_temp_path $DEMO/nginx/tmp;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl;
        server_name www.example.test;
        ssl_certificate $DEMO/live/www/fullchain.pem;
        ssl_certificate_key $DEMO/live/www/privkey.pem;
        location / { return 200 "hello from certd's demo\n"; }
    }
}
EOF
nginx -e "$DEMO/nginx/error.log" -c "$DEMO/nginx/nginx.conf"

say "Rotating www behind nginx: issue, deploy beside, reload, verify the live handshake, commit"
write_config rotate
"${CERTD[@]}" renew www --force --wait --reason "demo: rotate behind nginx"

say "certd status"
"${CERTD[@]}" status

say "certd verify (what nginx serves, by handshake)"
"${CERTD[@]}" verify www

say "openssl verify: every stored chain against Pebble's root"
for name in www wild; do
    openssl verify -CAfile "$DEMO/pebble-root.pem" -untrusted "$DEMO/live/$name/chain.pem" "$DEMO/live/$name/cert.pem"
done

say "Done. The state, live files and config are in $DEMO; try:"
echo "  .venv/bin/certd --config $DEMO/certd.toml status --json"
echo "(Pebble and nginx were stopped; Pebble keeps no state, so start over with: bash scripts/demo.sh)"
