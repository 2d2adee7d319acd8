#!/usr/bin/env bash
# Refreshes the vendored RustSec advisory database (scripts/advisory-db/) that
# scripts/cargo-deny.sh checks Cargo.lock against, from a clone of
# github.com/rustsec/advisory-db (a bare clone or mirror works too):
#
#   git clone --depth 1 https://github.com/rustsec/advisory-db /tmp/advisory-db
#   scripts/refresh-advisory-db.sh /tmp/advisory-db
#
# It replaces crates/ (one directory per crate, one RUSTSEC-*.md per advisory) and the
# database's licence, and records the upstream commit and its date in SNAPSHOT: that date
# is what cargo deny's maximum-db-staleness (scripts/deny.toml) measures. Commit the result.
set -euo pipefail
src="${1:?usage: scripts/refresh-advisory-db.sh <advisory-db clone>}"
dest="$(cd "$(dirname "$0")" && pwd)/advisory-db"
commit="$(git -C "$src" rev-parse HEAD)"
date="$(git -C "$src" log -1 --format=%cI HEAD)"
rm -rf "$dest/crates"
mkdir -p "$dest"
git -C "$src" archive HEAD crates LICENSE.txt | tar -x -C "$dest"
printf '%s\n%s\n' "$commit" "$date" > "$dest/SNAPSHOT"
echo "advisory-db $commit ($date): $(find "$dest/crates" -name 'RUSTSEC-*.md' | wc -l) advisories"
