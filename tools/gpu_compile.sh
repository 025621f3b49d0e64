#!/usr/bin/env bash
# Issue 13 on a lent GPU machine (device tool), in order of value, each step with its own time limit:
# a compiled worker's cold and warm start (which also fills the compile cache the later steps reuse),
# the compiled forward against the graphed eager one (dynamic batch, then one graph per batch size), the CUDA tests, the system at max batch 256
# (4-row jobs, then 1-row DDIM-10 jobs), the compiled training step, and 1,000 clients of mixed load
# on a compiled trainer. The limits add up to more than one 10-minute call: on an H200 the first
# four steps took 7 minutes and a system step 2.3 minutes (BENCHMARKS.md), so give the rest a
# second call (SKIP=N skips the first N steps, on a machine whose cache is still warm).
# Writes $OUT/gpu.jsonl (the figures, one JSON line each), $OUT/gpu_compile.log, and the workers'
# logs in $OUT/logs.tgz.
LOG=gpu_compile.log
source "$(dirname "$0")/gpu_env.sh"
export TORCHINDUCTOR_CACHE_DIR=/tmp/collafuse-compile-cache
J="$OUT/gpu.jsonl"
B="python3 -m collafuse.tools.bench"
C="python3 -m collafuse.cli"
N=0
step() {
  N=$((N + 1)); [ "$N" -le "${SKIP:-0}" ] && return
  local limit=$1; shift; echo "== $(date +%T) step $N ($limit s) $*"
  # SIGINT, so that a bench stopped at its limit still stops the broker and workers it started
  timeout -s INT -k 40 "$limit" "$@" | tee >(grep '^{' >> "$J"); echo "== $(date +%T) exit ${PIPESTATUS[0]}"
}
P="--model paper --size 128 --bf16"
step 200 $B start $P --max-batch 256 --no-train --cache "$TORCHINDUCTOR_CACHE_DIR"
step 100 $B raw $P --batch 1,8,64,256 --cuda-graphs --compile --seconds 2
step 200 $B raw $P --batch 64,256 --cuda-graphs --compile --static --seconds 2  # one graph per batch size: the issue's 2.5x method
step 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py "tests/test_data_parallel.py::test_ranks_step_as_one_trainer_with_the_union_of_their_rows"
step 60 python3 tools/gpu_correctness.py
step 180 $B system $P --max-batch 256 --clients 256 --rows 4 --duration 8 --ddim-steps 100 --no-single --cuda-graphs --compile
step 180 $B system $P --max-batch 256 --clients 256 --rows 1 --duration 8 --ddim-steps 10 --no-single --cuda-graphs --compile
step 180 $B train $P --batch 150 --steps 10 --compile
# 1,000 clients, mixed load, on a compiled trainer (its defaults on CUDA: graphs and compile on)
$C -v broker --insecure --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556 > /tmp/collafuse-bench-mixed-broker.log 2>&1 &
BROKER=$!
$C -v worker --insecure --broker tcp://127.0.0.1:5556 --device cuda --model paper --image-size 128 --bf16 --max-batch 256 --queue-rows 256 \
  --sync-every 5 > /tmp/collafuse-bench-mixed-worker.log 2>&1 &
WORKER=$!
for _ in $(seq 240); do $C status --insecure --broker tcp://127.0.0.1:5555 2>/dev/null | grep -q "workers (1)" && break; sleep 1; done
step 80 $C loadtest --insecure --broker tcp://127.0.0.1:5555 --image-size 128 --mode mixed --clients 1000 --rows 1 --duration 15 --ddim-steps 10 \
  --json "$OUT/mixed1000.json"
kill -INT $WORKER; wait $WORKER; kill -INT $BROKER; wait $BROKER
tar czf "$OUT/logs.tgz" /tmp/collafuse-bench* 2>/dev/null
echo done
