#!/usr/bin/env bash
# The GPU checks and measurements for BENCHMARKS.md, as one script for a lent machine (device tool).
# Expects wheels for the packages that machine lacks in .whl/ (diffusers, pyzmq, importlib_metadata).
# QUICK=1 skips the raw-model and training figures. Writes JSON lines to $OUT/gpu.jsonl and the log to $OUT/gpu.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . || exit 1
export PYTHONPATH=/tmp/site
REPO=$(pwd)
cd /tmp  # so that the repository's own collafuse/ folder does not shadow the installed package
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
J="$OUT/gpu.jsonl"
B="python3 -m collafuse.tools.bench"
python3 "$REPO/tools/gpu_correctness.py" | tee -a "$J"
[ "${QUICK:-0}" = 1 ] || $B raw --model paper --size 128 --batch 1,64,256,512 --bf16 --seconds 4 | tee -a "$J"
$B sampler --model paper --size 128 --max-batch 64 --bf16 | tee -a "$J"
[ "${QUICK:-0}" = 1 ] || $B train --model paper --size 128 --batch 150 --bf16 | tee -a "$J"
$B system --model paper --size 128 --max-batch 64 --clients 64 --rows 2 --duration 15 --bf16 --ddim-steps 100 | tee -a "$J"
$B system --model paper --size 128 --max-batch 256 --clients 64 --rows 8 --duration 15 --bf16 --ddim-steps 100 --no-single | tee -a "$J"
echo done
