#!/usr/bin/env bash
# Create (or reuse) ./.venv and install grl_kernels into it, editable, with the test extras.
# - reuses a torch that is already importable (e.g. the CUDA torch of a GPU machine) via
#   --system-site-packages; otherwise installs the pinned CPU wheel torch==2.13.0;
# - builds the compiled extension in place (--no-build-isolation lets setup.py see torch), for
#   this machine only (GRL_KERNELS_NATIVE=1: -march=native; wheels are portable).
# Source it (". scripts/setup_env.sh") to get the venv activated in the calling shell.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)" >&2
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q setuptools wheel ninja >/dev/null
echo "[setup] installing grl_kernels (editable, builds the extension; a few minutes the first time)" >&2
GRL_KERNELS_NATIVE=1 python -m pip install -q --no-build-isolation -e ".[test]"
# spandrel's copy of the published GRL code, for tests/test_patching_spandrel.py. --no-deps: it
# would pull torchvision, which has no build matching the CPU torch 2.13 here (the test stubs it).
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('spandrel') is None)"; then
  python -m pip install -q --no-deps "spandrel==0.4.2" "safetensors" \
    || echo "[setup] could not install spandrel: its patching tests will be skipped" >&2
fi
python -c "import torch, grl_kernels; print(f'[setup] torch {torch.__version__}, grl_kernels {grl_kernels.__version__}, backends: {grl_kernels.available_backends()}')" >&2
