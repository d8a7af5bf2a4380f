"""Bad input to the compiled backends: clear TypeError / ValueError / RuntimeError, never a crash."""
import os

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import cpu_backend, cuda_backend, extension
from grl_kernels.geometry import stripe_geometry, window_geometry

needs_cpu = pytest.mark.usefixtures("_cpu_ext")


@pytest.fixture
def _cpu_ext():
    ok, why = dict((n, (o, w)) for n, o, w in G.backend_info())["cpu"]
    if not ok:
        if os.environ.get("GRL_KERNELS_SKIP_CPU_EXT") == "1":
            pytest.skip(f"cpu extension unavailable: {why}")
        pytest.fail(f"the cpu extension is unavailable: {why}")


def _stripe_args(dtype=torch.float32):
    g = stripe_geometry((16, 16), (8, 8), (None, None), True, 4)
    return g, torch.randn(1, 256, 24, dtype=dtype), torch.randn(1, 4, 4, 8, dtype=dtype)


@needs_cpu
def test_cpu_backend_rejects_float16_by_name():
    g, qkv, anc = _stripe_args(torch.float16)
    s, b = torch.ones(2), torch.zeros(g.table_rows, 2)
    with pytest.raises(ValueError, match="does not handle torch.float16"):
        G.stripe_attention(qkv, anc, g, 2, s, b, s, b, backend="cpu")
    with pytest.raises(TypeError, match="float32, bfloat16 or float64 qkv"):
        cpu_backend.stripe(qkv, anc, g, 2, s, b, s, b)


@needs_cpu
def test_cpu_backend_dtype_mismatch():
    g, qkv, anc = _stripe_args()
    s, b = torch.ones(2), torch.zeros(g.table_rows, 2)
    with pytest.raises(TypeError, match="anchor has dtype torch.float64 but qkv has torch.float32"):
        cpu_backend.stripe(qkv, anc.double(), g, 2, s, b, s, b)


@needs_cpu
def test_functional_validation_reaches_cpu_backend_checked():
    g, qkv, anc = _stripe_args()
    s, b = torch.ones(2), torch.zeros(g.table_rows, 2)
    with pytest.raises(ValueError, match="bias1 must have shape"):
        G.stripe_attention(qkv, anc, g, 2, s, b[:-1], s, b, backend="cpu")
    with pytest.raises(ValueError, match="anchor must have shape"):
        G.stripe_attention(qkv, anc[:, :2], g, 2, s, b, s, b, backend="cpu")
    wg = window_geometry((16, 16), 8, True)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        G.window_attention(qkv, wg, 3, torch.ones(3), torch.zeros(wg.table_rows, 3), backend="cpu")


@needs_cpu
def test_extension_checks_are_runtime_errors_not_crashes():
    ext = extension.load("cpu")
    g, qkv, anc = _stripe_args()
    t, b = torch.ones(2), torch.zeros(2, g.table_rows)
    params = [16, 16, 8, 8, 4, 4, 4, 1]
    with pytest.raises(RuntimeError, match="qkv must be"):
        ext.stripe_forward(qkv[:, :100], anc, t, b, t, b, params, 2)
    with pytest.raises(RuntimeError, match="anchor must be"):
        ext.stripe_forward(qkv, anc[:, :, :2], t, b, t, b, params, 2)
    with pytest.raises(RuntimeError, match="bias1 has"):
        ext.stripe_forward(qkv, anc, t, torch.zeros(2, g.table_rows - 1), t, b, params, 2)
    with pytest.raises(RuntimeError, match="invalid stripe geometry"):
        ext.stripe_forward(qkv, anc, t, b, t, b, [16, 16, 8, 8, 4, 4, 3, 1], 2)
    with pytest.raises(RuntimeError, match="8 ints"):
        ext.stripe_forward(qkv, anc, t, b, t, b, [16, 16], 2)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        ext.stripe_forward(qkv, anc, t.double(), b, t, b, params, 2)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        out, z, lse = ext.stripe_forward(qkv, anc, t, b, t, b, params, 2)
        ext.stripe_backward(out[:, :10].contiguous(), qkv, anc, t, b, t, b, z, lse, params, 2)
    with pytest.raises(RuntimeError, match="invalid window geometry"):
        ext.window_forward(qkv, t, torch.zeros(2, 225), [16, 16, 8, 9], 2)


def test_cuda_backend_rejects_cpu_tensors():
    g, qkv, anc = _stripe_args()
    s, b = torch.ones(2), torch.zeros(g.table_rows, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors; qkv is on cpu"):
        cuda_backend.stripe(qkv, anc, g, 2, s, b, s, b)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_backend.window(qkv, window_geometry((16, 16), 8, True), 2, s, torch.zeros(225, 2))


def test_cuda_backend_unavailable_is_reported_not_raised():
    ok, why = dict((n, (o, w)) for n, o, w in G.backend_info())["cuda"]
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why
    # available exactly when no reason is given; an unavailable backend says why
    assert ok == (why == "")


def test_extension_load_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \['cpu', 'cuda', 'cuda_emu'\], got 'tpu'"):
        extension.load("tpu")
