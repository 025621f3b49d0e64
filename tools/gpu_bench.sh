#!/usr/bin/env bash
# The GPU checks and measurements for BENCHMARKS.md, as one script for a lent machine (device tool).
# QUICK=1 skips the raw-model sweep over batch sizes, the batch-150 training step and the batch-256 system run.
# Writes JSON lines to $OUT/gpu.jsonl and the log to $OUT/gpu.log.
LOG=gpu.log
source "$(dirname "$0")/gpu_env.sh"
J="$OUT/gpu.jsonl"
B="python3 -m collafuse.tools.bench"
python3 tools/gpu_correctness.py | tee -a "$J"
[ "${QUICK:-0}" = 1 ] || $B raw --model paper --size 128 --batch 1,64,256,512 --bf16 --seconds 4 | tee -a "$J"
$B sampler --model paper --size 128 --max-batch 64 --bf16 | tee -a "$J"
$B sampler --model paper --size 128 --max-batch 64 --bf16 --cuda-graphs | tee -a "$J"
# what one sweep step costs (fp32, as `simulate` trains): a client's batch and the server's merged batch
$B train --model paper --size 128 --batch 32 --steps 20 | tee -a "$J"
$B train --model paper --size 128 --batch 96 --steps 20 | tee -a "$J"
[ "${QUICK:-0}" = 1 ] || $B train --model paper --size 128 --batch 150 --bf16 | tee -a "$J"
$B system --model paper --size 128 --max-batch 64 --clients 64 --rows 4 --duration 15 --bf16 --ddim-steps 100 | tee -a "$J"
$B system --model paper --size 128 --max-batch 64 --clients 64 --rows 4 --duration 15 --bf16 --ddim-steps 100 --cuda-graphs | tee -a "$J"
[ "${QUICK:-0}" = 1 ] || $B system --model paper --size 128 --max-batch 256 --clients 64 --rows 8 --duration 15 --bf16 --ddim-steps 100 --no-single | tee -a "$J"
echo done
