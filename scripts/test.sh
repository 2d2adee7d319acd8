#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need
# (idempotently), then the Rust unit, integration and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings

echo "== Rust unit and integration tests"
cargo nextest run --lib --bins --tests --no-fail-fast

echo "== Rust doc tests"
cargo test --doc --quiet
