#!/usr/bin/env bash
# The device check, in one call of at most ~8 minutes, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv-gpu ]; then
    python3 -m venv .venv-gpu
    . .venv-gpu/bin/activate
    pip install -q -e ".[test]"  # an unpinned torch: the CUDA build
else
    . .venv-gpu/bin/activate
fi
timeout 480 python benchmarks/gpu_check.py --device cuda --report
