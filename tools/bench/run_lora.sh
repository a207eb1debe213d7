#!/usr/bin/env bash
# LoRA beside TRL 1.16 + PEFT 0.21.2 (CPU): DPO with LoRA r 16 on every linear layer of the SmolLM2-1.7B shape
# (bf16, 2 pairs x (128 + 128), 3 timed steps), and on the SmolLM2-135M shape beside full fine-tuning (f32 and
# bf16, 5 timed steps). One JSON object per run; tools/bench/table.py makes the table of docs/PERFORMANCE.md.
#
#   bash tools/bench/run_lora.sh > bench-lora.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv-fixtures/bin/python}
PREFALIGN=${PREFALIGN:-target/release/prefalign}
lora=(--use-peft --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear)
tokens=(--pairs 2 --prompt-tokens 128 --completion-tokens 128)
both() {
  "$PREFALIGN" bench --json "$@"
  "$PYTHON" tools/bench/trl_bench.py "$@" 2>/dev/null | tail -n 1
}
both --shape smollm2-1.7b --objective dpo "${tokens[@]}" --steps 3 --bf16 "${lora[@]}"
for precision in "" "--bf16"; do
  both --shape smollm2-135m --objective dpo "${tokens[@]}" --steps 5 $precision "${lora[@]}"
  "$PREFALIGN" bench --json --shape smollm2-135m --objective dpo "${tokens[@]}" --steps 5 $precision
done
# the base in 4 bits (prefalign alone): NF4 with double quantization, without and with gradient checkpointing
for checkpointing in "" "--gradient-checkpointing"; do
  "$PREFALIGN" bench --json --shape smollm2-1.7b --objective dpo "${tokens[@]}" --steps 3 --bf16 "${lora[@]}" \
    --load-in-4bit --use-bnb-nested-quant $checkpointing
done
