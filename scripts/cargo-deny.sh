#!/usr/bin/env bash
# Checks Cargo.lock with cargo deny (scripts/deny.toml): advisories against the vendored
# RustSec database snapshot (scripts/advisory-db/, refreshed by
# scripts/refresh-advisory-db.sh) without any network, and licences.
#
# cargo deny reads an advisory database only from a git checkout, and dates it by its
# HEAD commit; so the snapshot is laid out as one under target/advisory-dbs/, committed
# with the upstream commit's date, and a snapshot older than maximum-db-staleness fails
# the check instead of passing on stale data.
#
#   scripts/cargo-deny.sh                 # advisories and licenses
#   scripts/cargo-deny.sh bans sources    # other checks
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
snapshot="scripts/advisory-db"
{ read -r commit; read -r date; } < "$snapshot/SNAPSHOT"
# cargo deny names the checkout of a database URL "<last path segment>-<hash of the URL>";
# this is the one of the default URL, which scripts/deny.toml keeps.
db="target/advisory-dbs/advisory-db-3157b0e258782691"
rm -rf "$db"
mkdir -p "$db"
cp -R "$snapshot/crates" "$snapshot/LICENSE.txt" "$db/"
git -C "$db" init --quiet
git -C "$db" add --all
GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" git -C "$db" \
  -c user.name=sluice -c user.email=sluice@localhost -c commit.gpgsign=false \
  commit --quiet --message "advisory-db $commit"
touch -d "$date" "$db/.git/HEAD"
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(advisories licenses)
# --offline is what makes cargo deny read the database without fetching it (and check its
# age); it also keeps cargo from the network, so the crates of every platform in
# Cargo.lock are fetched first (from crates.io, which is reachable).
cargo fetch --locked --manifest-path Cargo.toml --quiet
cargo deny --offline --locked --manifest-path Cargo.toml --config scripts/deny.toml \
  check "${checks[@]}"
