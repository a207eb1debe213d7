#!/usr/bin/env bash
# Prepares .device/ (ignored by git) for tools/device/run.sh on a lent GPU machine (the `device` tool; its image
# has python3 with torch 2.11.0+cu130 but no Rust, no TRL and no tcmalloc):
#   - prefalign built against the full CUDA torch wheel of .venv-fixtures, so that libtorch_cuda is linked and CUDA
#     registers (the lean build's torch has no CUDA libraries); on the GPU machine it loads that machine's torch
#   - the library's unit-test executable, built the same way
#   - gperftools' tcmalloc, which the binary links
#   - the wheels TRL 1.16 needs beyond the GPU machine's image (trl, datasets, dill, multiprocess)
# Needs `bash scripts/setup.sh --fixtures`. Then call the device tool with carry [".device"] and the command
# `bash tools/device/run.sh` (at most about 8 minutes; tools/device/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
torch=$(ls -d "$PWD"/.venv-fixtures/lib/python3*/site-packages/torch 2>/dev/null | head -n 1 || true)
if [ ! -f "$torch/lib/libtorch_cuda.so" ]; then
  echo "prepare: no CUDA torch in .venv-fixtures; run: bash scripts/setup.sh --fixtures" >&2
  exit 1
fi
export LIBTORCH="$torch" LIBTORCH_CXX11_ABI=1 PREFALIGN_CUDA=1 CARGO_TARGET_DIR=target/cuda
cargo build --release --locked --bin prefalign
# the library's unit tests, for the few that also run on CUDA when there is one (run.sh runs those first)
unit_tests=$(cargo test --release --locked --lib --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))$/\1/p')
[ -x "$unit_tests" ] || { echo "prepare: no unit-test executable found" >&2; exit 1; }
rm -rf .device && mkdir -p .device/lib .device/wheels
cp target/cuda/release/prefalign .device/prefalign
cp "$unit_tests" .device/unit-tests
strip .device/prefalign .device/unit-tests
if ldd .device/prefalign | grep -q tcmalloc; then
  cp -L "$(ldd .device/prefalign | awk '/tcmalloc/ {print $3}')" .device/lib/
fi
ldd .device/prefalign | grep -q libtorch_cuda || { echo "prepare: the binary does not link libtorch_cuda" >&2; exit 1; }
# the versions the CPU fixtures and benchmarks use here (.venv-fixtures); the image's own transformers, accelerate,
# pyarrow and the rest serve
versions=$(.venv-fixtures/bin/python -c 'import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ["trl", "datasets", "dill", "multiprocess"]))')
.venv-fixtures/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/wheels $versions
du -sh .device .device/*
