#!/usr/bin/env bash
# Install Pebble 2.6 (the ACME test server) and pebble-challtestsrv into <repo>/.cache/pebble/bin.
#
# Why not `apt-get install pebble`: Debian 12 ships Pebble 2.4, which has no ACME Renewal
# Information (ARI). Debian 13 (trixie) ships 2.6, a static Go binary that runs on Debian 12.
# We fetch trixie's package from Debian's mirror with a PRIVATE apt configuration (own sources
# list, lists, caches and state under .cache/pebble/apt), verified by apt against
# debian-archive-keyring, and unpack it with dpkg-deb: the system's apt sources, package lists
# and installed packages are never touched.
#
# Idempotent: does nothing when both binaries exist, run, and Pebble serves ARI.
# Usage: bash pebble/install.sh [--force]          Needs: apt-get, dpkg-deb, debian-archive-keyring
# Environment: CERTD_PEBBLE_MIRROR (default http://deb.debian.org/debian),
#              CERTD_PEBBLE_SUITE (default trixie).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/pebble"
BIN="$DEST/bin"
WORK="$DEST/apt"
MIRROR="${CERTD_PEBBLE_MIRROR:-http://deb.debian.org/debian}"
SUITE="${CERTD_PEBBLE_SUITE:-trixie}"
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

if [[ "${1:-}" != "--force" ]] && binaries_ok; then
    say "ok: $BIN/pebble ($(cat "$BIN/VERSION" 2>/dev/null || echo 'version unrecorded'))"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (this script needs Debian)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
[[ -r "$KEYRING" ]] || die "$KEYRING missing: apt-get install debian-archive-keyring"

say "fetching pebble from $MIRROR $SUITE (private apt state in $WORK)"
rm -rf "$WORK"
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/state" "$WORK/download"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$WORK/sources.list"

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

export APT_CONFIG="$WORK/apt.conf"
apt-get -q update >&2 || die "apt-get update of $SUITE failed (mirror reachable? keyring current?)"
(cd "$WORK/download" && apt-get -q download pebble >&2) || die "apt-get download pebble failed"
unset APT_CONFIG

shopt -s nullglob
debs=("$WORK"/download/pebble_*.deb)
[[ ${#debs[@]} -eq 1 ]] || die "expected one pebble_*.deb in $WORK/download, found ${#debs[@]}"
deb="${debs[0]}"
version="$(dpkg-deb -f "$deb" Version)"
say "unpacking $(basename "$deb") ($version)"
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
