#!/usr/bin/env bash
# One command for a GPU machine with only torch, Triton and nvcc installed:
#   bash benchmarks/gpu_suite.sh OUTDIR
# installs the package (building the extension), runs the GPU tests, compute-sanitizer
# (memcheck + racecheck) on a tiny case, the checks and the benchmarks, and writes every
# result (JSON + Markdown, GPU name, driver, versions, nvidia-smi) into OUTDIR.
# Each step has its own `timeout`; the whole run stays within TOTAL_BUDGET seconds
# (default 570, i.e. under 10 minutes on an H100): a step that would overrun is cut, and
# steps are ordered by importance. A failing step does not stop the others; the exit code
# is non-zero if any step failed. Environment knobs: PYTHON (default python3 or python),
# SKIP_INSTALL=1, TOTAL_BUDGET=seconds, MAX_JOBS (extension build parallelism).
set -uo pipefail

OUT="${1:?usage: benchmarks/gpu_suite.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_BUDGET="${TOTAL_BUDGET:-570}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=0
STEPS="$OUT/steps.tsv"
printf 'step\trc\tseconds\tbudget\n' > "$STEPS"

# step NAME BUDGET_SECONDS COMMAND...  (output to OUT/NAME.log; the budget is capped by what is left)
step() {
    local name="$1" budget="$2"; shift 2
    local left=$(( TOTAL_BUDGET - (SECONDS - START) ))
    if (( left < 15 )); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$STEPS"
        echo "== $name: skipped (time budget spent)"
        return 0
    fi
    (( budget > left )) && budget=$left
    echo "== $name (budget ${budget}s, $(( SECONDS - START ))s elapsed)"
    local t0=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$budget" >> "$STEPS"
    tail -n 5 "$OUT/$name.log"
    if (( rc != 0 )); then
        FAILED=1
        echo "== $name: FAILED (rc $rc$( ((rc == 124)) && echo ', timed out'))"
    fi
    return 0
}

# ---- machine and versions
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
    echo "python: $("$PY" --version 2>&1)"
    "$PY" -c 'import torch, triton; print("torch:", torch.__version__, "cuda:", torch.version.cuda); print("triton:", triton.__version__)' 2>&1
    echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
    echo "driver: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
} > "$OUT/versions.txt"
cat "$OUT/versions.txt"

# ---- install (builds the CPU and CUDA extensions); --no-deps: the machine may be offline
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step install 240 "$PY" -m pip install --no-build-isolation --no-deps -e "$ROOT"
fi
step info 60 "$PY" -m grl_kernels info --json "$OUT/info.json"

HAVE_PYTEST=0
"$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1

# ---- GPU tests first, the checks, the sanitizer, the benchmarks, then the other tests
if (( HAVE_PYTEST )); then
    # GPU-related tests: marked gpu, or in the cuda/triton test files (-k matches file and marker names)
    step tests_gpu 150 "$PY" -m pytest -q -ra tests -m "gpu or not slow" -k "cuda or triton or gpu" \
        --junitxml="$OUT/tests_gpu.xml" -p no:cacheprovider
else
    echo "pytest is not installed: test steps skipped" | tee "$OUT/tests_gpu.log"
    printf 'tests_gpu\tno-pytest\t0\t0\n' >> "$STEPS"
fi
step check 120 "$PY" -m grl_kernels check --no-progress --json "$OUT/check.json" --markdown "$OUT/check.md"

SAN="$(command -v compute-sanitizer || true)"
[[ -z "$SAN" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SAN="$CUDA_HOME/bin/compute-sanitizer"
[[ -z "$SAN" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
if [[ -n "$SAN" ]]; then
    step sanitizer_warmup 60 "$PY" benchmarks/sanitizer_case.py  # fills the Triton cache outside the sanitizer
    step memcheck 90 "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitizer_case.py
    step racecheck 90 "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitizer_case.py
else
    echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"
    printf 'memcheck\tnot-found\t0\t0\nracecheck\tnot-found\t0\t0\n' >> "$STEPS"
fi

step bench_bf16 150 "$PY" -m grl_kernels bench --device cuda --dtype bfloat16 --size 256x256 --batch 2 \
    --baselines reference,flex --no-progress --json "$OUT/bench_cuda_bf16.json" --markdown "$OUT/bench_cuda_bf16.md"
step bench_fp32 100 "$PY" -m grl_kernels bench --device cuda --dtype float32 --quick --size 256x256 --batch 2 \
    --baselines reference,compile,flex --no-progress --json "$OUT/bench_cuda_fp32.json" --markdown "$OUT/bench_cuda_fp32.md"
step bench_model 120 "$PY" -m grl_kernels bench-model --device cuda --dtype bfloat16 --preset GRL-T --preset GRL-B \
    --image-size 256 --no-progress --json "$OUT/bench_model_bf16.json" --markdown "$OUT/bench_model_bf16.md"
if (( HAVE_PYTEST )); then
    step tests_rest 200 "$PY" -m pytest -q -ra tests -m "not gpu and not slow" -k "not (cuda or triton or gpu)" \
        --junitxml="$OUT/tests_rest.xml" -p no:cacheprovider
fi

# ---- summary
{
    echo "# grl_kernels GPU suite"
    echo
    echo '```'
    cat "$OUT/versions.txt"
    echo '```'
    echo
    echo "| step | rc | seconds | budget |"
    echo "|---|---|---|---|"
    tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
    echo
    echo "Total: $(( SECONDS - START ))s. Logs: *.log; results: *.json and *.md beside this file."
    for f in check.md bench_cuda_bf16.md bench_cuda_fp32.md bench_model_bf16.md; do
        [[ -f "$OUT/$f" ]] && { echo; sed 's/^# /## /' "$OUT/$f"; }
    done
    echo
    echo "## nvidia-smi"
    echo '```'
    cat "$OUT/nvidia-smi.txt"
    echo '```'
} > "$OUT/summary.md"
"$PY" - "$OUT" <<'PYEOF' || true
import csv, json, os, sys
out = sys.argv[1]
with open(os.path.join(out, "steps.tsv")) as f:
    steps = list(csv.DictReader(f, delimiter="\t"))
json.dump({"steps": steps}, open(os.path.join(out, "summary.json"), "w"), indent=2)
PYEOF
echo "== done in $(( SECONDS - START ))s; results in $OUT (summary.md)"
exit $FAILED
