#!/usr/bin/env bash
# Issue 14 on a lent GPU machine (device tool), about 5 minutes: the trainer group's equality test on
# CUDA, then its training throughput with 1 and 2 ranks on the one card (gloo on CUDA tensors: NCCL
# does not run two ranks on one device), the `paper` model at 128×128 in bf16 with up to 150 rows
# per rank and step (the batch of the single-trainer figure in BENCHMARKS.md), and the time from a
# rank's death to the group's next step. Writes $OUT/gpu.jsonl and $OUT/gpu_group.log.
LOG=gpu_group.log
source "$(dirname "$0")/gpu_env.sh"
J="$OUT/gpu.jsonl"
timeout -k 20 120 python3 -m pytest -q -p no:cacheprovider -rs "tests/test_data_parallel.py::test_ranks_step_as_one_trainer_with_the_union_of_their_rows"
# SIGINT at the limit, so that the bench still stops the broker and workers it started
timeout -s INT -k 40 240 python3 -m collafuse.tools.bench group --device cuda --model paper --size 128 --bf16 --ranks 1,2 \
  --clients 64 --rows 16 --max-train-rows 150 --duration 20 | tee >(grep '^{' >> "$J")
tar czf "$OUT/logs.tgz" /tmp/collafuse-bench-group 2>/dev/null
echo done
