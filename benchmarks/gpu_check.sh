#!/usr/bin/env bash
# The device check, in one call of at most ~8 minutes, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh
# Uses the machine's own python3 and its torch/transformers (a GPU box usually has them and may
# have no network); xpuserve runs from this checkout's src/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, safetensors, tokenizers, jinja2, tqdm" || {
    echo "gpu_check needs torch (CUDA build), transformers, safetensors, tokenizers, jinja2, tqdm: pip install -e '.[test]'" >&2
    exit 2
}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
timeout 480 python3 benchmarks/gpu_check.py --device cuda --report
# On a borrowed machine only $OUT comes back: bring the updated report with it.
if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
