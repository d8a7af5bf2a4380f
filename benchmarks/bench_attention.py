"""pytest-benchmark suite behind ``grl-kernels bench``: attention forward and forward+backward
per implementation and geometry (not part of ``pytest tests``).

    pytest benchmarks/bench_attention.py --benchmark-json out.json
    GRL_BENCH_DEVICE=cuda GRL_BENCH_DTYPE=bfloat16 GRL_BENCH_FULL=1 pytest benchmarks/bench_attention.py

Implementations: every available backend that handles the device/dtype, plus the baselines
``compile`` (torch.compile of the reference) and ``flex`` (FlexAttention composition; forward
only on CPU). Each is checked against the float64 reference before it is timed.
"""
import os

import pytest
import torch

import grl_kernels
from grl_kernels.backends import registry
from grl_kernels.bench import baselines as BL
from grl_kernels.bench.cases import bench_cases, call_backend, make_inputs
from grl_kernels.bench.compare import errors, tolerance
from grl_kernels.bench.timing import synchronize

DEVICE = os.environ.get("GRL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
DTYPE = getattr(torch, os.environ.get("GRL_BENCH_DTYPE", "float32"))
FULL = os.environ.get("GRL_BENCH_FULL", "0") == "1"
CASES = bench_cases(quick=not FULL, size=(256, 256) if DEVICE == "cuda" else None,
                    batch=int(os.environ.get("GRL_BENCH_BATCH", "1")))


def _impls():
    out = {}
    for n in grl_kernels.available_backends():
        if registry._REGISTRY[n].supports(torch.device(DEVICE), DTYPE):
            out[n] = registry._REGISTRY[n]
    out["compile"] = BL.CompiledReference()
    if BL.flex_available() is None:
        out["flex"] = BL.FlexComposition()
    return out


IMPLS = _impls()


@pytest.fixture(scope="module", params=CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def case_inputs(request):
    case = request.param
    src = make_inputs(case, torch.float32, "cpu")
    inp = make_inputs(case, DTYPE, DEVICE, source=src, requires_grad=True)
    with torch.no_grad():
        expected = call_backend(BL.ReferenceBaseline(), case, make_inputs(case, torch.float64, DEVICE, source=inp))
    return case, inp, expected


def _checked(impl, case, inp, expected):
    with torch.no_grad():
        out = call_backend(impl, case, inp)
    assert errors(out, expected)[1] <= tolerance(DTYPE)[0], "output differs from the reference"


def _run(benchmark, fn, rounds):
    def timed():
        fn()
        synchronize(DEVICE)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, case_inputs):
    case, inp, expected = case_inputs
    b = IMPLS[impl]
    _checked(b, case, inp, expected)
    benchmark.group = f"fwd {case.describe()}"

    def fwd():
        with torch.no_grad():
            return call_backend(b, case, inp)

    _run(benchmark, fwd, rounds=10 if DEVICE == "cuda" else 5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, case_inputs):
    case, inp, expected = case_inputs
    b = IMPLS[impl]
    if isinstance(b, BL.Baseline) and not b.supports_backward(DEVICE):
        pytest.skip(f"{impl} is forward only on {DEVICE}")
    _checked(b, case, inp, expected)
    benchmark.group = f"fwd+bwd {case.describe()}"
    leaves = list(inp.leaves().values())
    gout = torch.randn(case.batch, case.H * case.W, case.channels, device=DEVICE, dtype=DTYPE)

    def fwd_bwd():
        out = call_backend(b, case, inp)
        return torch.autograd.grad(out, leaves, gout, allow_unused=True)

    _run(benchmark, fwd_bwd, rounds=10 if DEVICE == "cuda" else 3)
