#!/usr/bin/env bash
# prefalign and TRL 1.16 on the same benchmark settings, one after the other (never at the same time: libtorch
# slows down several-fold when another process competes for the cores). One JSON object per run on stdout;
# tools/bench/table.py turns them into the table of docs/PERFORMANCE.md.
#
#   bash tools/bench/run.sh > bench.jsonl                        # CPU: SmolLM2-135M shape, 2 pairs x (128 + 128)
#   OBJECTIVES="sft kto" bash tools/bench/run.sh > bench.jsonl   # SFT sequences, KTO examples of the same lengths
#   DEVICE=cuda SHAPES="smollm2-135m smollm2-1.7b" PAIRS=8 PROMPT=256 COMPLETION=256 bash tools/bench/run.sh
#
# Needs `scripts/setup.sh --fixtures` (the TRL virtualenv) and a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-cpu}
SHAPES=${SHAPES:-smollm2-135m}
OBJECTIVES=${OBJECTIVES:-dpo orpo}
PAIRS=${PAIRS:-2}
PROMPT=${PROMPT:-128}
COMPLETION=${COMPLETION:-128}
STEPS=${STEPS:-5}
PYTHON=${PYTHON:-.venv-fixtures/bin/python}
PREFALIGN=${PREFALIGN:-target/release/prefalign}
common=(--pairs "$PAIRS" --prompt-tokens "$PROMPT" --completion-tokens "$COMPLETION" --steps "$STEPS" --device "$DEVICE")
for shape in $SHAPES; do
  for objective in $OBJECTIVES; do
    for precision in "" "--bf16"; do
      for checkpointing in "" "--gradient-checkpointing"; do
        flags=(--shape "$shape" --objective "$objective" "${common[@]}" $precision $checkpointing)
        "$PREFALIGN" bench --json "${flags[@]}"
        "$PYTHON" tools/bench/trl_bench.py "${flags[@]}" 2>/dev/null | tail -n 1
      done
    done
    # prefalign in TRL's layout, and with the reference log-probs computed once (DPO, KTO)
    "$PREFALIGN" bench --json --shape "$shape" --objective "$objective" "${common[@]}" --no-prefix-sharing --no-packing
    if [ "$objective" = dpo ] || [ "$objective" = kto ]; then
      "$PREFALIGN" bench --json --shape "$shape" --objective "$objective" "${common[@]}" --precompute-ref-log-probs
      "$PREFALIGN" bench --json --shape "$shape" --objective "$objective" "${common[@]}" --precompute-ref-log-probs --gradient-checkpointing
    fi
  done
done
