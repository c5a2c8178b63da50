#!/usr/bin/env bash
# One-shot, idempotent setup of a development/CI machine (Debian 12, as root):
#
#   1. Debian packages: nginx, haproxy (real servers for the integration tests), softhsm2 (a
#      real PKCS#11 token for the HSM-held KEK's tests), postgresql (private clusters for the
#      PostgreSQL store's tests, tests/support/postgres.py), openssl, ca-certificates,
#      debian-archive-keyring (verifies the Pebble download), and python3 + python3-venv when
#      the python3 on PATH is older than 3.11 or cannot make a venv. apt runs only when
#      something is missing. Services the packages start are stopped and disabled again:
#      tests run their own nginx/haproxy/PostgreSQL on high loopback ports.
#   2. .venv in the repo with `pip install -e '.[test,lint,hsm,keys,cluster]'` (skipped while
#      pyproject.toml and the extras are unchanged since the last successful install and the
#      imports and the linters' entry points work).
#   3. Pebble 2.10 + pebble-challtestsrv via pebble/install.sh.
#
# Fast (well under a second) when everything is already there. Safe to run concurrently:
# a lock serialises runs. Usage: bash scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.certd-setup-stamp"
MIN_PYTHON="3.11"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
trap 'say "FAILED at line $LINENO: $BASH_COMMAND"' ERR

mkdir -p "$ROOT/.cache"
exec 9>"$ROOT/.cache/setup.lock"
flock 9

# --- 1. Debian packages ---------------------------------------------------------------

python_ok() {  # python_ok PYTHON: new enough and able to create a venv with pip
    "$1" -c "import sys, venv, ensurepip; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
        >/dev/null 2>&1
}

PYTHON="$(command -v python3 || true)"
missing=()
for cmd_pkg in nginx:nginx haproxy:haproxy openssl:openssl dpkg-deb:dpkg flock:util-linux; do
    cmd="${cmd_pkg%%:*}"
    if ! command -v "$cmd" >/dev/null 2>&1 && ! [[ -x "/usr/sbin/$cmd" ]]; then
        missing+=("${cmd_pkg#*:}")
    fi
done
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
# tests/support/softhsm.py runs softhsm2-util and loads the module from this path
[[ -x /usr/bin/softhsm2-util && -r /usr/lib/softhsm/libsofthsm2.so ]] || missing+=(softhsm2)
[[ -r /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
# tests/support/postgres.py runs initdb and pg_ctl from here (Debian 12: PostgreSQL 15)
[[ -x /usr/lib/postgresql/15/bin/initdb && -x /usr/lib/postgresql/15/bin/pg_ctl ]] || missing+=(postgresql)
if [[ -z "$PYTHON" ]] || ! python_ok "$PYTHON"; then
    say "python3 on PATH (${PYTHON:-none}) is missing, older than $MIN_PYTHON or lacks venv/ensurepip: using Debian's"
    PYTHON=/usr/bin/python3
    python_ok "$PYTHON" || missing+=(python3 python3-venv)
fi

# disable_service NAME: stop a service that a package install just started, and keep it
# from starting at boot (systemd when it is PID 1, else sysv-rc).
disable_service() {
    local name="$1"
    if [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]; then
        systemctl disable --now "$name" >/dev/null 2>&1 || true
    else
        # Only if the package's daemon runs (its init script stops by pidfile, nothing else).
        if [[ -s "/run/$name.pid" && -x "/etc/init.d/$name" ]]; then
            "/etc/init.d/$name" stop >/dev/null 2>&1 || true
        fi
        command -v update-rc.d >/dev/null && update-rc.d "$name" disable >/dev/null 2>&1 || true
    fi
}

if ((${#missing[@]})); then
    [[ "$(id -u)" == 0 ]] || die "need root to install: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found: this setup expects Debian 12"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' init scripts from starting services during the install (the
    # standard Debian policy-rc.d mechanism), unless a policy is already in place.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# written by certd scripts/setup.sh during apt-get install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    say "apt-get update"
    apt-get -q update >&2 || { ((own_policy)) && rm -f "$policy"; die "apt-get update failed"; }
    say "apt-get install ${missing[*]}"
    apt-get -q install -y --no-install-recommends "${missing[@]}" >&2 \
        || { ((own_policy)) && rm -f "$policy"; die "apt-get install failed"; }
    ((own_policy)) && rm -f "$policy"
    for name in nginx haproxy postgresql; do
        if [[ " ${missing[*]} " == *" $name "* ]]; then
            say "disabling the $name system service (tests run their own, on loopback)"
            disable_service "$name"
        fi
    done
    if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_ctlcluster >/dev/null; then
        # Without systemd (or with policy-rc.d in place) the package may still have created and
        # started its main cluster: stop it, and keep it from starting at boot.
        for conf in /etc/postgresql/*/main/start.conf; do
            [[ -e "$conf" ]] || continue
            ver="$(basename "$(dirname "$(dirname "$conf")")")"
            pg_ctlcluster "$ver" main stop >/dev/null 2>&1 || true
            echo manual >"$conf"
        done
    fi
fi
python_ok "$PYTHON" || die "$PYTHON cannot create a venv or is older than $MIN_PYTHON"
say "ok: nginx, haproxy, softhsm2, postgresql, openssl, $("$PYTHON" --version 2>&1) ($PYTHON)"

# --- 2. the virtualenv --------------------------------------------------------------------

if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "creating $VENV with $PYTHON"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
# pyproject.toml's optional groups: pytest's, the linters scripts/test.sh runs, and the key
# custody extras the tests exercise (hsm: python-pkcs11 for SoftHSM; keys: pyrage for backups),
# and cluster (psycopg, psycopg-pool) for the PostgreSQL store's contract tests
EXTRAS="test,lint,hsm,keys,cluster"
# The stamp covers the extras too, so adding a group here reinstalls even with pyproject.toml as it was.
want="$( (cat "$ROOT/pyproject.toml"; echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1)"
venv_ok() {  # the imports and the linters' entry points work
    "$VENV/bin/python" -c 'import certd, pytest, acme, cryptography, pkcs11, pyrage, psycopg, psycopg_pool' >/dev/null 2>&1 \
        && [[ -x "$VENV/bin/ruff" && -x "$VENV/bin/mypy" && -x "$VENV/bin/lint-imports" ]]
}
if [[ "$(cat "$STAMP" 2>/dev/null)" == "$want" ]] && venv_ok; then
    say "ok: $VENV (pyproject.toml unchanged)"
else
    say "pip install -e '.[$EXTRAS]' into $VENV"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[$EXTRAS]" >&2
    venv_ok || die "the venv lacks certd, its test or custody dependencies or the linters after pip install"
    echo "$want" >"$STAMP"
fi

# --- 3. Pebble --------------------------------------------------------------------------------

bash "$ROOT/pebble/install.sh"
say "done"
