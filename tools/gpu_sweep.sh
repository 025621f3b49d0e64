#!/usr/bin/env bash
# The 128×128 cut-ratio sweep's training and generation on a lent GPU machine (device tool).
# STEPS sets the training steps per cut ratio; each finished cut ratio is packed into $OUT at once,
# so a run stopped at its time limit still returns the ones done. Evaluate here afterwards:
#   python -m collafuse.tools.runpack PACKS --out runs/sweep-gpu128
#   the same `collafuse sweep` line as below, without --pack, with --out runs/sweep-gpu128
LOG=sweep.log
source "$(dirname "$0")/gpu_env.sh"
python3 -m collafuse.cli sweep --in-process --cut-ratios 1,0,0.6,0.2,0.4,0.8 --image-size 128 --client-model paper \
  --server-model paper --batch-size 32 --steps "${STEPS:-600}" --device cuda --out /tmp/sweep --pack "$OUT"
echo done
