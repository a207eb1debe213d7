#!/usr/bin/env bash
# One process with 2 threads (batch 4) against `prefalign launch` of 2 ranks with 1 thread each (batch 2 each, the
# same global batch), and the 2 ranks again with the optimizer state sharded (ZeRO-1): 8 DPO steps of SmolLM2-135M-Instruct (the GGUF, trained in f32) on the HH-RLHF pairs, a
# reference copy. Prints each run's summary; rank 0 also prints the gradient bytes all-reduced per step and the
# time it waited for them after the backward pass. Needs a release build and a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${PREFALIGN:-target/release/prefalign}
OUT=${OUT:-/tmp/prefalign-ddp-bench}
common=(--model models/SmolLM2-135M-Instruct.Q4_1.gguf --dataset data/hh-rlhf/harmless-base-test.jsonl.gz
  --dataset-format hh-rlhf --skip-invalid-rows --max-length 256 --max-steps "${STEPS:-8}" --logging-steps 1
  --save-strategy no --train-sampling-strategy sequential --learning-rate 1e-6)
rm -rf "$OUT" && mkdir -p "$OUT"
OMP_NUM_THREADS=2 "$B" dpo "${common[@]}" --per-device-train-batch-size 4 --output-dir "$OUT/one" 2> "$OUT/one.log"
"$B" launch --nproc-per-node 2 --master-port "${PORT:-29571}" -- dpo "${common[@]}" \
  --per-device-train-batch-size 2 --output-dir "$OUT/two" 2> "$OUT/two.log"
"$B" launch --nproc-per-node 2 --master-port "${PORT:-29571}" -- dpo "${common[@]}" \
  --per-device-train-batch-size 2 --shard-optimizer-state --output-dir "$OUT/two-sharded" 2> "$OUT/two-sharded.log"
for run in one two two-sharded; do
  echo "$run: $(grep -h 'ranks:' "$OUT/$run.log" || true)"
  cat "$OUT/$run/train_summary.json"; echo
done
