#!/usr/bin/env bash
# The CUDA measurements of issue #6, as one command on a lent GPU machine (after tools/device/prepare.sh here):
#   device tool: run, carry [".device"], command "bash tools/device/run.sh", timeout_s 600
# Results come back in $OUT: bench-cuda.jsonl (one JSON row per run, for tools/bench/table.py) and log.txt.
# Runs the most important first and skips the rest once the time budget (BUDGET_S, default 480 s) is spent, so
# a slow start still brings rows back.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/prefalign-device}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
budget=${BUDGET_S:-480}
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
prefalign=.device/prefalign
[ -x "$prefalign" ] || { echo "no $prefalign: run tools/device/prepare.sh here and carry .device" >&2; exit 1; }
rows="$out/bench-cuda.jsonl"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("python torch", torch.__version__, torch.cuda.get_device_name(0))'
ldd "$prefalign" | grep -E "torch|tcmalloc|not found"

# run LIMIT_S CMD...: runs CMD (killed after LIMIT_S) unless the budget is spent; its own notes go to stderr so that
# stdout holds only the rows
run() {
  local limit=$1; shift
  if (( SECONDS + limit / 2 > budget )); then echo "skipped (budget): $*" >&2; return; fi
  echo "== $(date -u +%T) $*" >&2
  timeout -k 5 "$limit" "$@"
  echo "== exit $? after ${SECONDS}s" >&2
}

# 0. the unit tests that also run on CUDA when a GPU is there: torch's fused RMSNorm kernel against the CPU, and
#    precomputed reference log-probs (kept on the CPU) batched onto the GPU
run 60 .device/unit-tests --test-threads 1 torch_rms_norm batch_selects_pairs_onto_the_policys_device

# 1. CUDA against CPU on the same seed and so the same weights (bench draws them with the CPU's generator on every
#    device): the losses of these steps on this project's CPU (2026-12-03, f32) were
#    0.6931 (warm-up), 0.4562, 0.2898, 0.1799; CUDA's should agree but for rounding
run 60 "$prefalign" bench --shape smollm2-135m --objective dpo --pairs 2 --prompt-tokens 128 --completion-tokens 128 \
  --steps 3 --device cuda

# 1b. the training commands end to end on CUDA (a tiny model from the test fixtures; 2 steps, then evaluation, then
#     a saved folder): DPO with its reference model, DPO with precomputed reference log-probs in bf16, ORPO with
#     checkpointing. On this project's CPU (2026-12-03) their metrics.jsonl read: loss 0.6931, 0.6945, eval_loss
#     0.6123 (DPO); 0.6931, 0.6947, 0.6123 (precomputed, bf16); 12.9906, 12.9614, 12.8211 (ORPO)
train_dir=/tmp/prefalign-train
rm -rf "$train_dir" && mkdir -p "$train_dir/tiny_policy"
cp tests/fixtures/eval/tiny_policy/* tests/fixtures/trl_data/tokenizer/* "$train_dir/tiny_policy/"
fixture_pairs=tests/fixtures/trl_data/standard.jsonl
train=(--model "$train_dir/tiny_policy" --dataset "$fixture_pairs" --eval-dataset "$fixture_pairs" --max-length 64
  --allow-empty-completions --per-device-train-batch-size 4 --max-steps 2 --logging-steps 1 --eval-steps 2
  --learning-rate 1e-3 --device cuda)
export PREFALIGN_CACHE="$train_dir/cache"
run 60 "$prefalign" dpo "${train[@]}" --output-dir "$train_dir/dpo"
run 60 "$prefalign" dpo "${train[@]}" --precompute-ref-log-probs --bf16 --output-dir "$train_dir/dpo-precomputed"
run 60 "$prefalign" orpo "${train[@]}" --gradient-checkpointing --output-dir "$train_dir/orpo"
# QLoRA (src/model/quantized.cpp on CUDA): NF4 with double quantization, and a Q4_K GGUF's blocks
lora=(--use-peft --lora-target-modules all-linear)
run 60 "$prefalign" dpo "${train[@]}" "${lora[@]}" --load-in-4bit --use-bnb-nested-quant --output-dir "$train_dir/qlora"
run 60 "$prefalign" dpo "${train[@]/$train_dir\/tiny_policy/tests/fixtures/quantized/tiny_q4_k.gguf}" "${lora[@]}" \
  --output-dir "$train_dir/lora-q4_k"
for run_dir in dpo dpo-precomputed orpo qlora lora-q4_k; do
  echo "== $run_dir:"
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print({key: row[key] for key in ("step", "loss", "grad_norm", "eval_loss", "eval_rewards/accuracies") if key in row})' \
    "$train_dir/$run_dir/metrics.jsonl"
done

# 2. the issue's targets: bf16, 8 pairs x (256 + 256), prefalign then TRL on each shape
targets=(--pairs 8 --prompt-tokens 256 --completion-tokens 256 --steps 10 --device cuda --bf16)
dpo=(--objective dpo "${targets[@]}")
run 90 "$prefalign" bench --json --shape smollm2-135m "${dpo[@]}" | tee -a "$rows"
run 150 "$prefalign" bench --json --shape smollm2-1.7b "${dpo[@]}" | tee -a "$rows"
echo "== installing TRL's wheels over the image's:"
python3 -m pip list 2>/dev/null | grep -iE "^(transformers|accelerate|pyarrow|fsspec|huggingface.hub|pandas) "
run 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device/wheels/*.whl
# (trl_bench.py itself runs offline, without TRL's telemetry)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
run 60 python3 -c 'import trl, transformers, accelerate, datasets, pyarrow, fsspec
print("trl", trl.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "datasets", datasets.__version__, "pyarrow", pyarrow.__version__, "fsspec", fsspec.__version__)'
run 150 python3 tools/bench/trl_bench.py --shape smollm2-135m "${dpo[@]}" | tail -n 1 | tee -a "$rows"
run 180 python3 tools/bench/trl_bench.py --shape smollm2-1.7b "${dpo[@]}" | tail -n 1 | tee -a "$rows"

# 3. host work per step, both tools: the 135M shape's depth at a size too small to compute anything; if the 135M
#    step is bound by kernel launches, this is its floor (docs/PERFORMANCE.md, CUDA)
tiny=(--shape tools/bench/host_overhead_shape.json --objective dpo --pairs 8 --prompt-tokens 4 --completion-tokens 4 \
  --steps 10 --device cuda --bf16)
run 60 "$prefalign" bench --json "${tiny[@]}" | tee -a "$rows"
run 90 python3 tools/bench/trl_bench.py "${tiny[@]}" | tail -n 1 | tee -a "$rows"

# 4. as time allows: prefalign's variants on the 1.7B shape, and ORPO
run 150 "$prefalign" bench --json --shape smollm2-1.7b "${dpo[@]}" --precompute-ref-log-probs | tee -a "$rows"
run 150 "$prefalign" bench --json --shape smollm2-1.7b "${dpo[@]}" --gradient-checkpointing | tee -a "$rows"
# the caching allocator with segments that grow instead of one per size class: less reserved beyond what is in use
run 150 env PYTORCH_ALLOC_CONF=expandable_segments:True "$prefalign" bench --json --shape smollm2-1.7b "${dpo[@]}" \
  | tee -a "$rows"
run 150 "$prefalign" bench --json --shape smollm2-1.7b "${dpo[@]}" --use-peft --lora-target-modules all-linear \
  --load-in-4bit --use-bnb-nested-quant | tee -a "$rows"
orpo=(--objective orpo "${targets[@]}")
run 90 "$prefalign" bench --json --shape smollm2-135m "${orpo[@]}" | tee -a "$rows"
run 150 python3 tools/bench/trl_bench.py --shape smollm2-135m "${orpo[@]}" | tail -n 1 | tee -a "$rows"
echo "== done after ${SECONDS}s"
