#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py): installs what is missing, then runs it; ~8 minutes on one GPU.
#
#   bash launch/gpu_check.sh [OUT [FLAGS]]   OUT: the report folder (default: docs/results/gpu/<today>);
#                                            FLAGS go to launch/gpu_check.py (--runs-dir, --budget-s, ...)
#
# On a machine that cannot reach a package registry, bring pyzmq as a wheel in .wheels/ (ignored by git),
# fetched where one can, for that machine's Python, e.g.:
#   pip download pyzmq --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .wheels
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/gpu/$(date -u +%Y-%m-%d)}
PY=${PYTHON:-python3}
have() { "$PY" -c "import $1" 2>/dev/null; }
install() {  # from .wheels/ if it is there, else from the registry
  if [ -d .wheels ]; then "$PY" -m pip install -q --no-index --find-links .wheels "$@" || "$PY" -m pip install -q "$@"
  else "$PY" -m pip install -q "$@"; fi
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
have zmq || install "pyzmq>=25"
have msgpack || install "msgpack>=1.0"
have tqdm || install "tqdm>=4.60"
have pytest || install pytest
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package from this checkout, no install needed
exec "$PY" launch/gpu_check.py --out "$OUT" "${@:2}"
