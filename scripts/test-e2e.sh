#!/usr/bin/env bash
# Runs the end-to-end tests: the example system as separate processes (broker, todo_app,
# email_worker, notification_worker) against a real SMTP server and a webhook receiver,
# the generated Python client, and grpcurl through reflection. Everything listens on
# free loopback ports; every process is killed at the end, even on failure.
#
#   scripts/test-e2e.sh            # all e2e tests
#   scripts/test-e2e.sh -k grpcurl # extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/install-test-deps.sh
cargo build --examples --bins
# The tests themselves take about 15 s; the bound only guards against a hang.
timeout 300 python3 -m pytest tests/e2e -v -p no:cacheprovider "$@"
