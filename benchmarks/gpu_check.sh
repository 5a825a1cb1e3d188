#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): run from the repository root on a machine with a GPU.
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--throughput-size 1.3b] ...
# If diffusers is not importable there (a bare GPU image), the wheels carried in .whl/ are installed into a
# temporary folder first (made on the CPU machine with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata peft==0.21.2 )
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: diffusers is not installed and no wheels were carried in .whl/" >&2
    exit 2
  fi
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec python3 benchmarks/gpu_check.py --device cuda "$@"
