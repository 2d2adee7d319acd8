#!/usr/bin/env bash
# Generates the Python gRPC stubs of proto/ into examples/python/sluice_pb/ (gitignored).
# Needs grpcio-tools (scripts/install-test-deps.sh installs it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/sluice_pb"
mkdir -p "$out"
python3 -m grpc_tools.protoc \
  -I "$root/proto" \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  "$root/proto/sluice/v1/sluice.proto"
echo "generated $out/sluice/v1/"
