#!/usr/bin/env bash
# The 128×128 cut-ratio sweep's training and generation on a lent GPU machine (device tool).
# STEPS sets the training steps per cut ratio; each finished cut ratio is packed into $OUT at once,
# so a run stopped at its time limit still returns the ones done. Evaluate here afterwards:
#   python -m collafuse.tools.gpu_sweep unpack PACKS --out runs/sweep-gpu128
#   collafuse sweep --in-process --image-size 128 --client-model paper --server-model paper --batch-size 32 --steps $STEPS --out runs/sweep-gpu128
LOG=sweep.log
source "$(dirname "$0")/gpu_env.sh"
python3 -m collafuse.tools.gpu_sweep generate --out /tmp/sweep --pack "$OUT" --steps "${STEPS:-600}" --batch-size 32 --image-size 128
echo done
