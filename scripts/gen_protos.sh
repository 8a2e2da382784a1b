#!/usr/bin/env bash
# Regenerates qtrace/api/ from protos/ (the one command; tests/test_protos.py checks that
# what is committed is what this produces). Usage: scripts/gen_protos.sh [OUT_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root}" && cd "${1:-$root}" && pwd)
py=${PYTHON:-$root/.venv/bin/python}
cd "$root/protos"
mapfile -t protos < <(find qtrace -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" "${protos[@]}"
