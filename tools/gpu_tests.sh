#!/usr/bin/env bash
# On a lent GPU machine (device tool): the tests that skip without CUDA, then a networked mixed load
# (training and denoising at once) against a trainer worker on the GPU with its default settings
# (CUDA graphs and a compiled forward; it compiles before it registers, minutes with a cold cache). Writes $OUT/gpu_tests.log, $OUT/mixed.json and the broker's and worker's logs.
LOG=gpu_tests.log
source "$(dirname "$0")/gpu_env.sh"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py "tests/test_data_parallel.py::test_ranks_step_as_one_trainer_with_the_union_of_their_rows"
C="python3 -m collafuse.cli -v"
$C broker --insecure --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556 > "$OUT/broker.log" 2>&1 &
BROKER=$!
$C worker --insecure --broker tcp://127.0.0.1:5556 --device cuda --model paper --image-size 128 --bf16 --sync-every 5 > "$OUT/worker.log" 2>&1 &
WORKER=$!
for _ in $(seq 300); do $C status --insecure --broker tcp://127.0.0.1:5555 | grep -q "workers (1)" && break; sleep 1; done
python3 -m collafuse.cli loadtest --insecure --broker tcp://127.0.0.1:5555 --image-size 128 --mode mixed --clients 64 --rows 4 \
  --duration 20 --ddim-steps 100 --json "$OUT/mixed.json"
python3 -m collafuse.cli status --insecure --broker tcp://127.0.0.1:5555
kill -INT $WORKER; wait $WORKER; kill -INT $BROKER; wait $BROKER
grep -h "denoising \|compil\|stopped after\|ERROR\|Traceback" "$OUT/worker.log"
echo done
