"""Property-based tests: random geometries on every backend that takes CPU tensors, against
the reference path (see docs/testing.md).

Drawn: image sizes, stripe sizes or stripe groups per dimension, shift on/off, anchor down
factor f in {1, 2, 4}, window sizes 1..7 (mostly not powers of two), 1..4 heads, head dims
1..64 (odd included), batch 1..3, qkv as a channel slice of a wider tensor or stored batch-inner,
anchors permuted or sliced, logit scales up to and past the ln 100 clamp, zero rows and rows
below F.normalize's eps in q, k, v and the anchors. Checked: the output and the gradient of
every input (qkv, anchor, both logit scales, both bias tables).

- float64: each backend against the reference, scaled error (conftest.max_scaled_error, per
  subset of rows, see fuzz_helpers.errors) <= 1e-10. Observed worst: 8e-13 (a wrong index,
  mask, shift or normalization is O(1e-3) or larger).
- float32 / bfloat16: ground truth is the reference in float64 on the same rounded inputs; a
  backend may be at most 2x worse than the reference run in that dtype (both measured against
  the float64 truth), plus a slack of a few units of roundoff (RATIO_SLACK) for tensors the
  reference happens to get (almost) exactly.

Budget: CI runs EXAMPLES (derandomized: the same examples every run); GRL_FUZZ_EXAMPLES=N
multiplies every budget so that about N examples run in all, with fresh random examples
(GRL_FUZZ_DERANDOMIZE=1 keeps them fixed). The Triton interpreter runs a smaller budget on
smaller shapes in a TRITON_INTERPRET=1 subprocess (as tests/test_triton_interpreter.py).
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

import grl_kernels as G

from fuzz_helpers import Stats, cpu_backends, errors, make_inputs, run_case, stripe_cases, window_cases

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = pathlib.Path(__file__).resolve().parent.parent

# CI budget per test (main process; >= 300 examples in all) and in the interpreter subprocess
EXAMPLES = {
    ("stripe", torch.float64): 110, ("window", torch.float64): 70,
    ("stripe", torch.float32): 45, ("window", torch.float32): 35,
    ("stripe", torch.bfloat16): 35, ("window", torch.bfloat16): 25,
}
INTERP_EXAMPLES = {("stripe", torch.float32): 5, ("window", torch.float32): 4,
                   ("stripe", torch.bfloat16): 3, ("window", torch.bfloat16): 3}
_CI_TOTAL = sum(EXAMPLES.values())
LONG = int(os.environ.get("GRL_FUZZ_EXAMPLES", "0"))

# float64: the kernels and the reference differ only in summation order; observed <= 8.2e-13
# (gradients of vectors below eps, "@tiny", included: 5.9e-14). 1e-10 is ~100x that and still
# catches a float32-rounded eps (2e-8) as well as any index, mask or shift error (>= 1e-3).
TOL64 = 1e-10
# the backend may be 2x worse than the reference in the same dtype, plus an absolute slack for
# tensors whose reference error is itself at the roundoff level, where 2x of it means nothing:
# gradients that are zero in exact arithmetic (head dim 1, one anchor per window) come out as
# noise ~ eps * tau / |x| in any implementation, and the logit-scale gradients are reductions
# over every logit that cancel (rows of dS sum to 0). Observed float32 cases: 3.2e-6 vs the
# reference's 2e-8 (qkv, d = 1, tau 55) and 5.9e-6 vs 8.7e-7 (logit scale, d = 1). Slack:
# float32 2e-5 (see RATIO_SLACK), bfloat16 3.1e-2 (4 eps); an index, mask or shift error is
# >= 1e-3 in float32.
RATIO = 2.0
# Triton float32 is held to 2x: its backward recomputes P = exp2(s - m) / l from the saved row
# max m and row sum l, s with the forward's bits (from one rounded log-sum-exp per row, and s in
# another product order where the backward's rows are the forward's columns, it was 3.6e-5 vs
# the reference's 3.9e-7: logit scale, d = 1, rows below eps). 90 interpreter examples
# (GRL_FUZZ_EXAMPLES=3200) are all within the bound, the closest anchor 2.6e-5 vs 5.9e-6 (f = 4,
# tau 100: inside the slack).
# Triton bfloat16 is held to 2x too: its backward sums Delta = sum P dP itself with the P and
# dP its loops use (window_bwd_dq, stripe_bwd_tokens2, stripe_bwd_anchors1 with DELTA_PASS).
# With Delta = rowsum(dO * O), O rounded to bfloat16, and dZ . Z with an unrounded dZ, every dS
# of a row carried that rounding and the cancelling sums drifted: 250 interpreter examples found
# 36 tensors past 2x (stripe qkv 0.33 vs the reference's 0.009, anchor 0.52 vs 0.002; window
# logit scale 0.13 vs 0.028), then held to a fixed 1e-1; after the change the same examples'
# worst ratio is 0.92 (stripe anchor; window 0.42).
# The CUDA C++ kernels (run on the CPU by the emulation layer) are held to 2x in both dtypes:
# they recompute P = exp(s - m) / l from the rows' saved (max, 1/sum), not from one
# log-sum-exp, whose rounding (~1e-5 at logits ~100) scaled whole rows and left float32 qkv /
# anchor gradients 10-20x above the reference's error (4.1e-5 vs 2.0e-6, window, d = 2, tau 20).
KNOWN_LIMIT = {}  # (backend, dtype) -> a fixed limit that replaces the 2x rule; none
# float32 slack 2e-5, 100x below an index / mask error. (The cpu case that first set it, a d = 1
# logit-scale gradient at 1.19e-5 vs the reference's 1.2e-7, was not summation noise: the
# stage-1 backward recomputed its logits in another order than the forward; fixed, now ~1.5e-6.
# Above tau 50 the float32 slack grows with tau (x tau / 50, 4e-5 at the clamp): the logits'
# rounding, ~tau * 2^-24, is what a gradient's error is made of, and one example's error is a
# draw from a wide spread. 40 seeds of one stripe geometry at tau 99.9 (1 anchor per window,
# d = 32): anchor-gradient errors of the reference median 1.5e-6 / max 4.7e-5, of the cpu backend
# median 2.3e-6 / max 3.2e-5; at tau 20: 4.6e-7 / 1.7e-6 and 5.9e-7 / 2.2e-6. The one seed where
# the cpu error (3.2e-5) passed 2x the reference's (5.0e-6) + 2e-5 is the one 6500 fresh random
# float32 examples found; an earlier long run found rows below eps at tau 100, 4.5e-5 vs 8.2e-6,
# also inside the scaled slack.)
RATIO_SLACK = {torch.float32: 2e-5, torch.bfloat16: 4 * 7.8e-3}


def _slack(case, dtype) -> float:
    """RATIO_SLACK, in float32 times max(1, tau / 50) for the case's largest logit scale."""
    if dtype != torch.float32:
        return RATIO_SLACK[dtype]
    lam = max(list(case.get("lam1", [])) + list(case.get("lam2", [])) + list(case.get("lam", [])) + [0.0])
    tau = math.exp(min(lam, math.log(100.0)))
    return RATIO_SLACK[dtype] * max(1.0, tau / 50.0)

STATS = Stats()


# GRL_FUZZ_EMULATED_CUDA=1 (set by test_fuzz_emulated_cuda's subprocess, with
# GRL_KERNELS_EMULATE_CUDA=1): fuzz only the CUDA kernels run on the CPU, a quarter of the budget
EMULATED_ONLY = os.environ.get("GRL_FUZZ_EMULATED_CUDA", "0") == "1"


def _settings(kind, dtype, interp=False):
    n = (INTERP_EXAMPLES if interp else EXAMPLES)[(kind, dtype)]
    if EMULATED_ONLY:
        n = max(4, n // 4)
    derandomize = True
    if LONG:
        n = max(n, round(n * LONG / _CI_TOTAL))
        derandomize = os.environ.get("GRL_FUZZ_DERANDOMIZE", "0") == "1"
    # GRL_FUZZ_NO_SHRINK=1 (scripts/mutation_check.py): report the first failing example as found
    # (and always in the interpreter, where one example takes seconds)
    no_shrink = interp or os.environ.get("GRL_FUZZ_NO_SHRINK") == "1"
    phases = [Phase.explicit, Phase.generate] if no_shrink else list(Phase)
    return settings(max_examples=n, derandomize=derandomize, deadline=None, database=None, print_blob=True,
                    phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _dump_stats():
    yield
    STATS.dump()


def _backends(dtype):
    names = cpu_backends(dtype)
    if IN_INTERPRETER:
        names = [n for n in names if n == "triton"]
    if EMULATED_ONLY:
        assert "cuda" in names or dtype == torch.float64, f"the emulated cuda backend is not available: {G.backend_info()}"
        names = [n for n in names if n == "cuda"]
    return names


def _check_float64(case):
    names = _backends(torch.float64)
    if not names:
        pytest.skip("no backend other than the reference takes float64 CPU tensors")
    values = make_inputs(case, torch.float64)
    want = run_case(case, values, "reference", torch.float64)
    for name in names:
        errs = errors(run_case(case, values, name, torch.float64), want, values, case)
        STATS.add(f"{name}/float64/{case['kind']}", errs, case=case)
        bad = {k: v for k, v in errs.items() if not v <= TOL64}
        assert not bad, (name, case, errs)


def _check_low(case, dtype):
    names = _backends(dtype)
    if not names:
        pytest.skip(f"no backend other than the reference takes {dtype} CPU tensors")
    values = make_inputs(case, dtype)  # activations rounded to dtype, kept as float64
    truth = run_case(case, values, "reference", torch.float64)
    ref_errs = errors(run_case(case, values, "reference", dtype), truth, values, case)
    for name in names:
        errs = errors(run_case(case, values, name, dtype), truth, values, case)
        slack = _slack(case, dtype)
        limit = {k: max(RATIO * ref_errs[k] + slack, KNOWN_LIMIT.get((name, dtype), 0.0)) for k in errs}
        ratios = {k: errs[k] / max(ref_errs[k], slack) for k in errs}
        STATS.add(f"{name}/{str(dtype).split('.')[1]}/{case['kind']}", errs, ratios, case)
        bad = {k: (errs[k], ref_errs[k]) for k in errs if not errs[k] <= limit[k]}
        assert not bad, (name, str(dtype), case, "backend vs reference errors", bad)


if not IN_INTERPRETER:
    @_settings("stripe", torch.float64)
    @given(case=stripe_cases())
    def test_fuzz_stripe_float64(case):
        _check_float64(case)

    @_settings("window", torch.float64)
    @given(case=window_cases())
    def test_fuzz_window_float64(case):
        _check_float64(case)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
    def test_fuzz_stripe_low_precision(dtype):
        @_settings("stripe", dtype)
        @given(case=stripe_cases(max_d=48, max_tokens=192))
        def run(case):
            _check_low(case, dtype)
        run()

    # Float32 cases the fuzz found where fused kernels (cuda, cpu) missed the 2x bar because their
    # backward recomputed P with a rounding the forward did not have: P = exp(s - lse) with one saved
    # log-sum-exp (qkv of a row with norm below eps at tau 100: 1.2e-4 vs the reference's
    # 8.8e-6), and column-owner kernels computing the logit in another order than the forward
    # (one anchor per window, f = 4: anchor 2.2e-5 vs 6.4e-7). Kept as fixed cases.
    CANCELLING_STRIPE_CASES = {
        "d1-tiny-rows-tau100": dict(kind="stripe", B=2, x_size=(3, 3), stripe_size=(3, 3), stripe_groups=(None, None),
                                    shift=False, f=1, nh=1, d=1, qkv_layout="contiguous", anchor_layout="contiguous",
                                    lam1=[1.0], lam2=[4.6041701859880915], special="tiny_rows", seed=579431),
        "one-anchor-per-window": dict(kind="stripe", B=1, x_size=(12, 4), stripe_size=(4, 4),
                                      stripe_groups=(None, None), shift=True, f=4, nh=1, d=4,
                                      qkv_layout="contiguous", anchor_layout="contiguous", lam1=[4.6041701859880915],
                                      lam2=[-1.0], special="none", seed=1),
        "one-anchor-per-window-4-heads": dict(kind="stripe", B=1, x_size=(12, 8), stripe_size=(4, 4),
                                              stripe_groups=(None, None), shift=True, f=4, nh=4, d=5,
                                              qkv_layout="contiguous", anchor_layout="contiguous",
                                              lam1=[-1.0, 3.0, -1.0, -1.0], lam2=[-1.0, 4.0, -1.0, -1.0],
                                              special="none", seed=1628289684),
        # cpu: stage-1 logits recomputed in another order than the forward (logit scale 5.0e-5 vs 3.1e-7)
        "one-anchor-per-window-d1": dict(kind="stripe", B=3, x_size=(8, 4), stripe_size=(4, 4),
                                         stripe_groups=(None, None), shift=False, f=4, nh=1, d=1,
                                         qkv_layout="contiguous", anchor_layout="contiguous", lam1=[3.0],
                                         lam2=[-1.0], special="none", seed=208),
    }

    @pytest.mark.parametrize("name", list(CANCELLING_STRIPE_CASES))
    def test_cancelling_gradients_float32(name):
        _check_low(CANCELLING_STRIPE_CASES[name], torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
    def test_fuzz_window_low_precision(dtype):
        @_settings("window", dtype)
        @given(case=window_cases(max_d=48, max_tokens=192))
        def run(case):
            _check_low(case, dtype)
        run()

    @pytest.mark.skipif(EMULATED_ONLY or os.environ.get("GRL_KERNELS_NO_JIT") == "1",
                        reason="this is the driver; the emulation is built just in time")
    def test_fuzz_emulated_cuda():
        """The CUDA C++ kernels, executed on the CPU by the emulation layer (csrc/emu), fuzzed in
        float32 and bfloat16 in a subprocess (GRL_KERNELS_EMULATE_CUDA is read at import)."""
        env = dict(os.environ, GRL_KERNELS_EMULATE_CUDA="1", GRL_FUZZ_EMULATED_CUDA="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(pathlib.Path(__file__)),
               "-k", "(float32 or bfloat16) and not interp and not triton_interpreter and not emulated"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        print(r.stdout[-6000:])
        assert r.returncode == 0, f"emulated cuda fuzz failed (rc {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
        m = re.search(r"(\d+) passed", r.stdout)
        assert m and int(m.group(1)) == 4 + len(CANCELLING_STRIPE_CASES) and "skipped" not in r.stdout, r.stdout[-2000:]

    @pytest.mark.skipif(os.environ.get("GRL_FUZZ_INTERPRETER", "1") == "0", reason="GRL_FUZZ_INTERPRETER=0")
    def test_fuzz_triton_interpreter():
        """Drives the interpreter cases below in a TRITON_INTERPRET=1 subprocess."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(pathlib.Path(__file__))]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        print(r.stdout[-6000:])
        assert r.returncode == 0, f"interpreter fuzz failed (rc {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
        m = re.search(r"(\d+) passed", r.stdout)
        assert m and int(m.group(1)) == 4, r.stdout[-2000:]  # every interpreter test ran, none skipped
else:
    # small shapes: the interpreter runs every program instance in Python
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
    def test_interp_fuzz_stripe(dtype):
        assert _backends(dtype) == ["triton"]

        @_settings("stripe", dtype, interp=True)
        @given(case=stripe_cases(max_d=16, max_tokens=32, max_batch=2))
        def run(case):
            _check_low(case, dtype)
        run()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
    def test_interp_fuzz_window(dtype):
        assert _backends(dtype) == ["triton"]

        @_settings("window", dtype, interp=True)
        @given(case=window_cases(max_d=16, max_tokens=32, max_batch=2))
        def run(case):
            _check_low(case, dtype)
        run()
