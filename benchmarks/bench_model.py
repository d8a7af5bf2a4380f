"""pytest-benchmark suite behind ``grl-kernels bench-model``: GRL inference per attention
backend (not part of ``pytest tests``).

    pytest benchmarks/bench_model.py --benchmark-json out.json
    GRL_BENCH_PRESETS=GRL-T,GRL-B GRL_BENCH_SIZE=256 pytest benchmarks/bench_model.py   # on a GPU

The fused backends' outputs are checked against the reference path before timing.
"""
import os

import pytest
import torch

import grl_kernels
from grl_kernels.backends import registry
from grl_kernels.bench.compare import errors
from grl_kernels.bench.timing import synchronize

models = pytest.importorskip("grl_kernels.models")
from grl_kernels.bench.model import MODEL_TOL, build_model  # noqa: E402

DEVICE = os.environ.get("GRL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SIZE = int(os.environ.get("GRL_BENCH_SIZE", "256" if DEVICE == "cuda" else "64"))
PRESETS = os.environ.get("GRL_BENCH_PRESETS", "GRL-T").split(",")
BACKENDS = [n for n in grl_kernels.available_backends()
            if registry._REGISTRY[n].supports(torch.device(DEVICE), torch.float32)]


@pytest.fixture(scope="module", params=PRESETS)
def model_and_input(request):
    torch.manual_seed(0)
    model = build_model(request.param, DEVICE).eval()
    x = torch.rand(1, 3, SIZE, SIZE, device=DEVICE)
    with torch.no_grad(), grl_kernels.use_backend("reference"):
        ref = model(x)
    return request.param, model, x, ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference(benchmark, backend, model_and_input):
    preset, model, x, ref = model_and_input
    benchmark.group = f"{preset} {SIZE}x{SIZE} inference"

    def infer():
        with torch.no_grad(), grl_kernels.use_backend(backend):
            out = model(x)
        synchronize(DEVICE)
        return out

    assert errors(infer(), ref)[1] <= MODEL_TOL[torch.float32]
    benchmark.pedantic(infer, rounds=3, warmup_rounds=1, iterations=1)
