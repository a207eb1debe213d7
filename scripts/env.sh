# Environment for building prefalign against the torch wheel in .venv (sourced by setup.sh and .ci/run).
_prefalign_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LIBTORCH="$(ls -d "$_prefalign_root"/.venv/lib/python3*/site-packages/torch | head -n 1)"
export LIBTORCH_CXX11_ABI=1
unset _prefalign_root
