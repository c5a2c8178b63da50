#!/usr/bin/env bash
# Install Pebble 2.10 (the ACME test server) and pebble-challtestsrv into <repo>/.cache/pebble/bin.
#
# Why not `apt-get install pebble`: Debian 12 ships Pebble 2.4, which has no ACME Renewal
# Information (ARI). Debian sid/forky ship 2.10 (profiles, `alreadyReplaced`, domainBlocklist),
# a static Go binary that runs on Debian 12. We fetch that package from Debian's mirror with a
# PRIVATE apt configuration (own sources list, lists, caches and state under
# .cache/pebble/apt), verified by apt against debian-archive-keyring, check the .deb against a
# pinned sha256, and unpack it with dpkg-deb: the system's apt sources, package lists and
# installed packages are never touched.
#
# sid and forky are moving suites: the pinned version is tried in each suite in turn (first
# that carries it wins); when none does, the script fails with one line saying so.
#
# Idempotent: does nothing when both binaries exist, run, serve ARI and are the pinned version
# (a different recorded version, e.g. an older 2.6 install, is replaced).
# Usage: bash pebble/install.sh [--force]          Needs: apt-get, dpkg-deb, debian-archive-keyring
# Environment: CERTD_PEBBLE_MIRROR (default http://deb.debian.org/debian),
#              CERTD_PEBBLE_SUITE (default "sid forky": suites tried in order),
#              CERTD_PEBBLE_VERSION / CERTD_PEBBLE_SHA256 (the pin; override both together).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/pebble"
BIN="$DEST/bin"
WORK="$DEST/apt"
MIRROR="${CERTD_PEBBLE_MIRROR:-http://deb.debian.org/debian}"
SUITES="${CERTD_PEBBLE_SUITE:-sid forky}"
VERSION="${CERTD_PEBBLE_VERSION:-2.10.0+ds1-2}"
SHA256="${CERTD_PEBBLE_SHA256:-b9a3a3920143f1a6fc568dfa88247be22cafa96c845fe62938c08982a15df315}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

say() { printf 'pebble/install.sh: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Pebble >= 2.6 serves ARI at this path; 2.4 does not contain the string at all. (`pebble
# -version` prints "dev" for Debian's build, so it cannot tell the versions apart.)
ARI_MARKER="draft-ietf-acme-ari"

binaries_ok() {
    [[ -x "$BIN/pebble" && -x "$BIN/pebble-challtestsrv" ]] || return 1
    "$BIN/pebble" -version >/dev/null 2>&1 || return 1
    "$BIN/pebble-challtestsrv" -h >/dev/null 2>&1 || return 1
    grep -q "$ARI_MARKER" "$BIN/pebble" || return 1
}
version_ok() { [[ "$(cat "$BIN/VERSION" 2>/dev/null)" == "$VERSION" ]]; }

if [[ "${1:-}" != "--force" ]] && binaries_ok && version_ok; then
    say "ok: $BIN/pebble ($(cat "$BIN/VERSION" 2>/dev/null || echo 'version unrecorded'))"
    exit 0
fi
if [[ -e "$BIN/VERSION" ]] && ! version_ok; then
    say "installed Pebble $(cat "$BIN/VERSION") is not the pinned $VERSION: fetching $VERSION"
fi

command -v apt-get >/dev/null || die "apt-get not found (this script needs Debian)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
[[ -r "$KEYRING" ]] || die "$KEYRING missing: apt-get install debian-archive-keyring"

# fetch_from SUITE: download pebble=$VERSION from SUITE into $WORK/download; false if the
# suite does not carry that version (or the mirror is unreachable).
fetch_from() {
    local suite="$1"
    say "looking for pebble $VERSION in $MIRROR $suite (private apt state in $WORK)"
    rm -rf "$WORK"
    mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/state" "$WORK/download"
    echo "deb [signed-by=$KEYRING] $MIRROR $suite main" >"$WORK/sources.list"
    # APT_CONFIG is read before /etc/apt/apt.conf.d (kept: proxies and mirror settings live
    # there); Dir::Etc::main is read after it, so that file can drop the system's update hooks
    # (appstream, packagekit), which have no business running for our private lists.
    cat >"$WORK/apt.conf" <<EOF
Dir::Etc::main "$WORK/apt-main.conf";
Dir::Etc::SourceList "$WORK/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::State "$WORK/state";
Dir::State::Lists "$WORK/lists";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$WORK/cache";
EOF
    cat >"$WORK/apt-main.conf" <<'EOF'
#clear APT::Update::Post-Invoke-Success;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Invoke;
EOF

    # apt downloads as the unprivileged _apt user when it exists: give it the partial dirs.
    if id _apt >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        chown _apt "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/download"
    fi
    local rc=0
    APT_CONFIG="$WORK/apt.conf" apt-get -q update >&2 || rc=1
    if ((rc == 0)); then
        (cd "$WORK/download" && APT_CONFIG="$WORK/apt.conf" apt-get -q download "pebble=$VERSION" >&2) || rc=1
    fi
    return $rc
}

found=""
for suite in $SUITES; do
    if fetch_from "$suite"; then found="$suite"; break; fi
done
[[ -n "$found" ]] || die "pebble $VERSION is in none of the suites '$SUITES' on $MIRROR (set CERTD_PEBBLE_VERSION and CERTD_PEBBLE_SHA256 to a version a suite carries)"

shopt -s nullglob
debs=("$WORK"/download/pebble_*.deb)
[[ ${#debs[@]} -eq 1 ]] || die "expected one pebble_*.deb in $WORK/download, found ${#debs[@]}"
deb="${debs[0]}"
got="$(sha256sum "$deb" | cut -d' ' -f1)"
[[ "$got" == "$SHA256" ]] || die "$(basename "$deb") from $found has sha256 $got, expected $SHA256 (pinned): refusing it"
version="$(dpkg-deb -f "$deb" Version)"
[[ "$version" == "$VERSION" ]] || die "$(basename "$deb") is version $version, expected $VERSION"
say "unpacking $(basename "$deb") ($version, sha256 checked, from $found)"
dpkg-deb -x "$deb" "$WORK/root"

mkdir -p "$BIN"
for name in pebble pebble-challtestsrv; do
    src="$WORK/root/usr/bin/$name"
    [[ -x "$src" ]] || die "$name not found in $(basename "$deb")"
    # Copy then rename, so a concurrent reader never runs a half-written binary.
    install -m 0755 "$src" "$BIN/.$name.new"
    mv -f "$BIN/.$name.new" "$BIN/$name"
done
echo "$version" >"$BIN/VERSION"

binaries_ok || die "installed binaries do not run or lack ARI ($ARI_MARKER): $BIN"
rm -rf "$WORK"
say "installed Pebble $version: $BIN/pebble, $BIN/pebble-challtestsrv"
