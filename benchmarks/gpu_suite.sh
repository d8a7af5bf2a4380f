#!/usr/bin/env bash
# One command for a GPU machine with only torch, Triton and nvcc installed (offline):
#   bash benchmarks/gpu_suite.sh OUTDIR
# builds the package for THIS GPU's architecture only (TORCH_CUDA_ARCH_LIST from the device),
# runs the GPU tests, the checks, compute-sanitizer (memcheck + racecheck) on a tiny case, the
# static resource report of the CUDA kernels and the benchmarks, and leaves exactly two files:
#   OUTDIR/summary.md        versions, the step table, the check and benchmark tables
#   OUTDIR/gpu_suite.tar.gz  everything else (logs, JSON + Markdown results, nvidia-smi, junit XML)
# (the GPU machine returns at most 8 files). Nothing is fetched: pip runs with --no-index
# --no-deps --no-build-isolation, and nothing else touches the network.
#
# Time: each step has its own `timeout`, and the whole run stays within TOTAL_BUDGET seconds
# (default 450: under 8 minutes on an H100/H200 including the build, which leaves a 15-minute
# lease room for the machine's start and a rerun); a step that would overrun is cut, steps are
# ordered by importance. A failing step does not stop the others; the exit code is non-zero if
# any step failed.
#
# GPU_SUITE_DRYRUN=1 (CI, tests/test_gpu_suite.py): the same steps on a CPU machine, with GPU
# commands replaced by CPU equivalents (the CUDA kernels through the emulation layer,
# GRL_KERNELS_EMULATE_CUDA=1; tiny benchmarks) or skipped with the reason in the step table.
#
# Knobs: PYTHON (default python3 or python), SKIP_INSTALL=1, TOTAL_BUDGET=seconds,
# MAX_JOBS (build parallelism), TORCH_CUDA_ARCH_LIST (default: the local GPU's).
set -uo pipefail

OUT="${1:?usage: benchmarks/gpu_suite.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RES="$OUT/gpu_suite"  # staging folder, packed into gpu_suite.tar.gz at the end
rm -rf "$RES" "$OUT/gpu_suite.tar.gz" "$OUT/summary.md"
mkdir -p "$RES"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DRY="${GPU_SUITE_DRYRUN:-0}"
TOTAL_BUDGET="${TOTAL_BUDGET:-450}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # offline, whatever pip's config says
START=$SECONDS
FAILED=0
STEPS="$RES/steps.tsv"
printf 'step\trc\tseconds\tbudget\tnote\n' > "$STEPS"

# step NAME BUDGET_SECONDS COMMAND...  (output to RES/NAME.log; the budget is capped by what is left)
step() {
    local name="$1" budget="$2"; shift 2
    local left=$(( TOTAL_BUDGET - (SECONDS - START) ))
    if (( left < 15 )); then
        printf '%s\tskipped\t0\t%s\ttime budget spent\n' "$name" "$budget" >> "$STEPS"
        echo "== $name: skipped (time budget spent)"
        return 0
    fi
    (( budget > left )) && budget=$left
    echo "== $name (budget ${budget}s, $(( SECONDS - START ))s elapsed)"
    local t0=$SECONDS
    timeout --kill-after=10 "$budget" "$@" > "$RES/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$budget" "$( ((DRY)) && echo 'dry run (CPU)')" >> "$STEPS"
    tail -n 5 "$RES/$name.log"
    if (( rc != 0 )); then
        FAILED=1
        echo "== $name: FAILED (rc $rc$( ((rc == 124)) && echo ', timed out'))"
    fi
    return 0
}

# skip NAME REASON  (a step that cannot run here, with the reason in the table)
skip() {
    printf '%s\tskipped\t0\t0\t%s\n' "$1" "$2" >> "$STEPS"
    echo "$2" > "$RES/$1.log"
    echo "== $1: skipped ($2)"
}

HAVE_PYTEST=0
"$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1

# ---- machine and versions
if (( DRY )); then
    echo "dry run: no GPU, nvidia-smi not called" > "$RES/nvidia-smi.txt"
    export GRL_KERNELS_EMULATE_CUDA=1  # the 'cuda' backend runs its kernels on the CPU
    DEV=cpu
else
    nvidia-smi > "$RES/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$RES/nvidia-smi.txt"
    DEV=cuda
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then  # build for this GPU only
        TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
        export TORCH_CUDA_ARCH_LIST
    fi
fi
ARCH_NUM="$(echo "${TORCH_CUDA_ARCH_LIST:-9.0}" | tr -d '.+PTX' | awk '{print $1}')"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "mode: $( ((DRY)) && echo 'DRY RUN on CPU (GPU_SUITE_DRYRUN=1)' || echo GPU)"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
    echo "python: $("$PY" --version 2>&1)"
    "$PY" -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)' 2>&1
    "$PY" -c 'import triton; print("triton:", triton.__version__)' 2>&1 | tail -n 1
    echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
    echo "arch list: ${TORCH_CUDA_ARCH_LIST:-none}"
    ((DRY)) || echo "driver: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
} > "$RES/versions.txt"
cat "$RES/versions.txt"

# ---- install (builds the CPU and CUDA extensions for the local arch); offline
if (( DRY )); then  # CPU equivalent: build the CPU extension and the emulated CUDA one (just in time, cached)
    step install 400 "$PY" -c "from grl_kernels.backends.extension import load; load('cpu'); load('cuda_emu'); print('built')"
elif [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step install 200 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e "$ROOT"
fi
step info 60 "$PY" -m grl_kernels info --json "$RES/info.json"

# ---- GPU tests first, the checks, the sanitizer, the static report, the benchmarks, the other tests
if (( ! HAVE_PYTEST )); then
    skip tests_gpu "pytest is not installed"
elif (( DRY )); then
    # CPU equivalent: the CUDA kernel tests through the emulation, two small cases
    step tests_gpu 120 "$PY" -m pytest -q -ra tests/test_cuda_kernels.py -k "cpu and (w4-d16 or t0-anchor) and float32" \
        --junitxml="$RES/tests_gpu.xml" -p no:cacheprovider
else
    # GPU-related tests: marked gpu, or in the cuda/triton test files (-k matches file and marker
    # names); the emulated CPU variants are CI's job
    step tests_gpu 120 "$PY" -m pytest -q -ra tests -m "gpu or not slow" -k "(cuda or triton or gpu) and not cpu" \
        --junitxml="$RES/tests_gpu.xml" -p no:cacheprovider
fi
if (( DRY )); then
    step check 90 "$PY" -m grl_kernels check --backend cuda --device cpu --case "t//f=0" --no-fixtures --no-progress \
        --json "$RES/check.json" --markdown "$RES/check.md"
else
    step check 90 "$PY" -m grl_kernels check --no-progress --json "$RES/check.json" --markdown "$RES/check.md"
fi

SAN="$(command -v compute-sanitizer || true)"
[[ -z "$SAN" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SAN="$CUDA_HOME/bin/compute-sanitizer"
[[ -z "$SAN" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
if (( DRY )); then
    skip memcheck "dry run: compute-sanitizer needs a GPU (CI runs the emulated kernels under ASan/UBSan instead)"
    skip racecheck "dry run: compute-sanitizer needs a GPU"
elif [[ -n "$SAN" ]]; then
    step sanitizer_warmup 45 "$PY" benchmarks/sanitizer_case.py  # fills the Triton cache outside the sanitizer
    step memcheck 60 "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitizer_case.py
    step racecheck 60 "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitizer_case.py
else
    skip memcheck "compute-sanitizer not found"
    skip racecheck "compute-sanitizer not found"
fi

if (( DRY )); then
    skip static_report "dry run: CI compiles the same kernels and applies the gates (tests/test_cuda_compile.py)"
elif command -v nvcc > /dev/null; then
    step static_report 90 "$PY" benchmarks/cuda_static_report.py --arch "$ARCH_NUM" --out "$RES/static"
else
    skip static_report "nvcc not found"
fi

if (( DRY )); then
    TINY="window:16x16,ws=8,shift=1,heads=1,dim=16"
    step bench_bf16 60 "$PY" -m grl_kernels bench --device cpu --dtype bfloat16 --geometry "$TINY" --reps 1 --warmup 0 \
        --baselines reference --no-ceilings --no-progress --json "$RES/bench_${DEV}_bf16.json" --markdown "$RES/bench_${DEV}_bf16.md"
    skip bench_fp32 "dry run: one tiny benchmark (bf16) is enough to exercise the step"
    skip bench_model "dry run: whole-model benchmarks are GPU-only here"
else
    step bench_bf16 110 "$PY" -m grl_kernels bench --device cuda --dtype bfloat16 --size 256x256 --batch 2 \
        --baselines reference,flex --no-progress --json "$RES/bench_cuda_bf16.json" --markdown "$RES/bench_cuda_bf16.md"
    step bench_fp32 70 "$PY" -m grl_kernels bench --device cuda --dtype float32 --quick --size 256x256 --batch 2 \
        --baselines reference,compile,flex --no-progress --json "$RES/bench_cuda_fp32.json" --markdown "$RES/bench_cuda_fp32.md"
    step bench_model 90 "$PY" -m grl_kernels bench-model --device cuda --dtype bfloat16 --preset GRL-T --preset GRL-B \
        --image-size 256 --no-progress --json "$RES/bench_model_bf16.json" --markdown "$RES/bench_model_bf16.md"
fi
if (( ! HAVE_PYTEST )); then
    :
elif (( DRY )); then
    skip tests_rest "dry run: CI runs the whole suite itself"
else
    step tests_rest 150 "$PY" -m pytest -q -ra tests -m "not gpu and not slow" -k "not (cuda or triton or gpu)" \
        --junitxml="$RES/tests_rest.xml" -p no:cacheprovider
fi

# ---- summary.md (beside the archive) and summary.json (inside it)
{
    echo "# grl_kernels GPU suite$( ((DRY)) && echo ' (DRY RUN on CPU)')"
    echo
    echo '```'
    cat "$RES/versions.txt"
    echo '```'
    echo
    echo "| step | rc | seconds | budget | note |"
    echo "|---|---|---|---|---|"
    tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}'
    echo
    echo "Total: $(( SECONDS - START ))s. Everything else is in gpu_suite.tar.gz (folder gpu_suite/: *.log, *.json, *.md, *.xml)."
    for f in check.md static/cuda.md bench_cuda_bf16.md bench_cuda_fp32.md bench_model_bf16.md bench_cpu_bf16.md; do
        [[ -f "$RES/$f" ]] && { echo; sed 's/^# /## /' "$RES/$f"; }
    done
    echo
    echo "## nvidia-smi"
    echo '```'
    cat "$RES/nvidia-smi.txt"
    echo '```'
} > "$OUT/summary.md"
"$PY" - "$RES" <<'PYEOF' || true
import csv, json, os, sys
res = sys.argv[1]
with open(os.path.join(res, "steps.tsv")) as f:
    steps = list(csv.DictReader(f, delimiter="\t"))
json.dump({"steps": steps}, open(os.path.join(res, "summary.json"), "w"), indent=2)
PYEOF
cp "$OUT/summary.md" "$RES/summary.md"
tar -czf "$OUT/gpu_suite.tar.gz" -C "$OUT" gpu_suite && rm -rf "$RES"
echo "== done in $(( SECONDS - START ))s; results in $OUT (summary.md, gpu_suite.tar.gz)"
exit $FAILED
