#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need
# (idempotently), checks formatting, lints, that the client builds without the server's
# crates, and the dependencies (cargo deny: advisories, licences), then runs the Rust unit, integration and doc tests (the fuzz corpus replay,
# tests/fuzz_corpus.rs, among them), then the end-to-end tests of the example system and
# the Python and grpcurl clients.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
echo "== installing test dependencies"
bash scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings

echo "== client-only build (default-features = false, features = [\"client\"])"
cargo clippy --lib --no-default-features --features client -- -D warnings
# A client-only dependency must not pull in the server's HTTP, CLI or metrics crates.
server_deps=$(cargo tree -e normal --no-default-features --features client --prefix none |
  grep -oE '^(axum|clap|prometheus-client) v[^ ]+' | sort -u || true)
if [ -n "$server_deps" ]; then
  echo "error: the client-only build depends on server crates:" >&2
  echo "$server_deps" >&2
  echo "make them optional and enable them only in the 'server' feature (Cargo.toml)" >&2
  exit 1
fi

echo "== cargo deny (advisories, licenses)"
bash scripts/cargo-deny.sh advisories licenses

echo "== Rust unit and integration tests"
cargo nextest run --lib --bins --tests --no-fail-fast

echo "== the integration tests again, served by the Redis engine (a redis-server per broker)"
# The same tests, one parameter: SLUICE_TEST_ENGINE=redis (tests/common/mod.rs). The files
# left out build an in-process Broker themselves (data directories, crash and storage
# hooks, metrics internals); the Redis engine's own crash and failover tests are in
# tests/redis_cluster.rs, run above.
SLUICE_TEST_ENGINE=redis cargo nextest run --no-fail-fast \
  --test queues --test topics --test consume --test worker --test errors \
  --test lifecycle --test producer_streams --test balance --test queue_typos \
  --test ops_console --test tracing --test schedules --test schemas

echo "== Rust doc tests"
cargo test --doc --quiet

echo "== end-to-end tests (example system, Python, grpcurl and TypeScript clients, the console in Chromium)"
cargo build --examples --bins
timeout 1200 python3 -m pytest tests/e2e -p no:cacheprovider -q
