#!/usr/bin/env bash
# Install grl_kernels the ways users do, each into a FRESH venv, and check that the fused cpu
# backend runs there and matches the reference (run by .ci/run after the tests):
#   1. pip install <checkout>                (pip's default build isolation: no torch while building,
#                                             so the kernels are built just in time on first use)
#   2. pip install <sdist>                   (same; reuses the matching build of 1 from the cache)
#   3. pip wheel --no-build-isolation <checkout>, then pip install <wheel> into a venv that never
#      sees the sources (the compiled, portable extension is inside the wheel: no build at all)
# Each fresh venv sees torch through a .pth file pointing at ONE base venv that has only torch
# (installed once from the local torch==2.13.0 CPU wheel), so no path downloads torch again.
# Usage: bash scripts/check_install_paths.sh [WORKDIR]   (default: a temporary folder, removed)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${1:-$(mktemp -d)}"
[ -n "${1:-}" ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
export GRL_KERNELS_CACHE="$WORK/jit-cache"  # a cache of its own: the first path must really build
export PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
step() { echo "[install-paths] $(( $(date +%s) - t0 ))s: $*" >&2; }

step "base venv with torch==2.13.0 only (CPU wheel from the local disk)"
"$PY" -m venv "$WORK/base"
"$WORK/base/bin/python" -m pip install -q "torch==2.13.0" ninja filelock numpy pillow setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
BASE_SITE="$("$WORK/base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

fresh_venv() {  # fresh_venv NAME -> a venv that imports torch from the base venv, nothing else
  "$PY" -m venv "$WORK/$1"
  local site
  site="$("$WORK/$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$BASE_SITE" > "$site/_base_torch.pth"
}

check() {  # check NAME EXPECT_BUILD(yes|no): cpu backend available and equal to the reference
  local name="$1" expect="$2" log="$WORK/$1.check.log"
  (cd "$WORK" && "$WORK/$name/bin/python" - "$expect" 2> "$log") <<'EOF'
import sys, time, torch
t = time.time()
import grl_kernels as G
from grl_kernels.backends import extension
assert G.__file__.startswith(sys.prefix), f"imported {G.__file__}, not the venv's install"
backends = G.available_backends()
assert "cpu" in backends, f"cpu backend missing: {G.backend_info()}"
torch.manual_seed(0)
qkv, anchor = torch.randn(2, 32 * 32, 3 * 16), torch.randn(2, 8, 8, 16)
args = dict(x_size=(32, 32), stripe_size=[8, 8], stripe_groups=[None, None], stripe_shift=True, num_heads=2,
            logit_scale1=torch.full((2, 1, 1), 2.3), bias_table1=torch.randn(9 * 9, 2),
            logit_scale2=torch.full((2, 1, 1), 2.3), bias_table2=torch.randn(9 * 9, 2),
            anchor_window_down_factor=4)
out = G.anchored_stripe_attention(qkv, anchor, backend="cpu", **args)
ref = G.anchored_stripe_attention(qkv, anchor, backend="reference", **args)
err = (out - ref).abs().max().item()
assert err < 1e-5, err
print(f"{sys.argv[1]}: backends {backends}, cpu vs reference max error {err:.1e}, "
      f"first use {time.time() - t:.1f}s, extension from {extension.source_root()}")
EOF
  local built=no
  grep -q "building the cpu extension" "$log" && built=yes
  if [ "$built" != "$expect" ]; then
    echo "[install-paths] $name: expected just-in-time build '$expect', got '$built'; its stderr:" >&2
    cat "$log" >&2
    exit 1
  fi
  step "$name: ok (just-in-time build: $built)"
}

step "1. pip install <checkout> (build isolation)"
fresh_venv isolated
"$WORK/isolated/bin/python" -m pip install -q "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
check isolated yes

step "2. pip install <sdist>"
(cd "$ROOT" && "$WORK/base/bin/python" setup.py -q sdist -d "$WORK/dist" >/dev/null 2>"$WORK/sdist.log") \
  || { cat "$WORK/sdist.log" >&2; exit 1; }
SDIST="$(ls "$WORK"/dist/grl_kernels-*.tar.gz)"
# (listings go to files first: with pipefail, grep -q quitting early would fail the pipe)
tar -tzf "$SDIST" > "$WORK/sdist.list"
grep -q "csrc/cpu/grl_cpu_stripe.cpp" "$WORK/sdist.list" || { echo "sdist lacks csrc/" >&2; exit 1; }
fresh_venv sdist
"$WORK/sdist/bin/python" -m pip install -q "$SDIST" 2>&1 | grep -v "^WARNING: Location" || true
check sdist no  # identical sources and flags: the build of path 1 is reused from the cache

step "3. pip wheel --no-build-isolation, then install the wheel"
rm -rf "$WORK/wheel-src" && mkdir "$WORK/wheel-src"  # a clean copy: no venv, no earlier build outputs
tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' -cf - . \
  | tar -C "$WORK/wheel-src" -xf -
(cd "$WORK/wheel-src" && "$WORK/base/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" . \
  2>&1 | grep -v "^WARNING: Location") || true
WHEEL="$(ls "$WORK"/wheels/grl_kernels-*.whl)"
unzip -l "$WHEEL" > "$WORK/wheel.list"
grep -q "grl_kernels/_C_cpu" "$WORK/wheel.list" || { echo "the wheel holds no compiled extension" >&2; exit 1; }
# portable: no AVX-512 (zmm) instructions in the wheel's extension
(cd "$WORK" && rm -rf whl-x && mkdir whl-x && cd whl-x && unzip -q "$WHEEL" 'grl_kernels/_C_cpu*')
# the per-ISA copies (AVX2 / AVX-512 task code, chosen at run time) may use ymm/zmm; the code
# outside them must not: the default target of the build is baseline x86-64
if command -v objdump >/dev/null; then
  objdump -d --no-show-raw-insn "$WORK"/whl-x/grl_kernels/_C_cpu*.so > "$WORK/wheel.asm"
  if awk '/^[0-9a-f]+ <.*>:$/ {isa = ($0 ~ /isa_avx/)} /%zmm/ && !isa {bad = 1} END {exit !bad}' "$WORK/wheel.asm"; then
    echo "the wheel's extension uses AVX-512 outside its run-time-dispatched copies: built with -march=native?" >&2
    exit 1
  fi
fi
rm -rf "$WORK/wheel-src"
fresh_venv wheel
"$WORK/wheel/bin/python" -m pip install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
GRL_KERNELS_CACHE="$WORK/empty-cache" GRL_KERNELS_NO_JIT=1 check wheel no
step "wheel: $(basename "$WHEEL"), $(du -k "$WHEEL" | cut -f1) KiB"
step "all install paths give the cpu backend"
