#!/usr/bin/env bash
# The certd benchmark (issue 6), in one command: bash bench/run.sh [--quick] [--help for more].
# Needs the dev virtualenv (.venv, from scripts/setup.sh) and Pebble (bash pebble/install.sh);
# installs certbot from PyPI into .cache/bench/certbot-venv on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -x "$ROOT/.venv/bin/python" ]] || { echo "bench/run.sh: no .venv; run bash scripts/setup.sh first" >&2; exit 2; }
# --only fleetstore: the PostgreSQL store against the file store per rotation (no CA needed)
if [[ "${1:-}" == "--only" && "${2:-}" == "fleetstore" ]]; then shift 2; exec "$ROOT/.venv/bin/python" "$ROOT/bench/fleet_store.py" "$@"; fi
# --only fleetfeed: what idle nodes' change feeds read from the database (no CA needed)
if [[ "${1:-}" == "--only" && "${2:-}" == "fleetfeed" ]]; then shift 2; exec "$ROOT/.venv/bin/python" "$ROOT/bench/fleet_feed.py" "$@"; fi
[[ -x "$ROOT/.cache/pebble/bin/pebble" ]] || bash "$ROOT/pebble/install.sh"
# --only fleet: 3 certd nodes with nginx on one PostgreSQL and Pebble; commit -> every node serving, orders per renewal
if [[ "${1:-}" == "--only" && "${2:-}" == "fleet" ]]; then shift 2; exec "$ROOT/.venv/bin/python" "$ROOT/bench/fleet.py" "$@"; fi
exec "$ROOT/.venv/bin/python" "$ROOT/bench/bench.py" "$@"
