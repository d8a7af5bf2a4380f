"""The CUDA kernels ("cuda" backend) against the reference path: on a GPU when there is one,
and ALWAYS on the CPU through the emulation layer (csrc/emu: the same .cu sources compiled for
the host, module ``_C_cuda_emu``, built just in time; docs/cuda.md).

Same geometry spread as the CPU tests; float32, float16 and bfloat16, forward and every
gradient, strided qkv, non-contiguous anchors, shifted and not, stripe groups, non-square,
head dims 4-64, batch 2. ``test_sanitizer_small`` is a tiny case meant for
``compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_kernels.py -k sanitizer``
(and racecheck / initcheck).
"""
import os

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import cuda_backend
from grl_kernels.backends.extension import emulated
from grl_kernels.geometry import stripe_geometry, window_geometry
from grl_kernels.reference import stripe_attention_reference, window_attention_reference

from conftest import max_scaled_error

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# "cpu" = the emulated kernels (skipped only when just-in-time builds are disabled)
DEVICES = [pytest.param("cuda", marks=needs_gpu),
           pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("GRL_KERNELS_NO_JIT") == "1",
                                                         reason="the emulation is built just in time"))]


class _Emulated:
    stripe = staticmethod(emulated.stripe)
    window = staticmethod(emulated.window)


def _kernels(dev):
    """The CUDA kernels for tensors on `dev`: the GPU module, or the emulated one on the CPU."""
    return cuda_backend if dev == "cuda" else _Emulated

STRIPE_CASES = {
    "square-shifted": (16, 32, (8, 8), (None, None), True, 4, 2, 8),
    "square-unshifted": (16, 32, (8, 8), (None, None), False, 4, 2, 8),
    "H-groups-shifted": (32, 32, (8, None), (None, 4), True, 4, 2, 32),
    "W-groups-nonsquare": (32, 16, (None, 8), (4, None), True, 4, 2, 8),
    "t0-anchor-quirk": (16, 16, (8, None), (None, 4), True, 4, 2, 6),
    "groups-1-zero-shift": (16, 16, (None, None), (1, 2), True, 2, 1, 4),
    "nonsquare-d30": (24, 40, (8, 8), (None, None), True, 2, 3, 30),
    "d64": (16, 16, (8, 8), (None, None), True, 2, 1, 64),
    "W-groups-d16-unshifted": (16, 32, (None, 8), (2, None), False, 4, 2, 16),
}
WINDOW_CASES = {
    "w8-shifted": (16, 24, 8, True, 2, 8),
    "w8-unshifted": (16, 24, 8, False, 2, 32),
    "w6-nonsquare-d30": (12, 18, 6, True, 3, 30),
    "w4-d64": (8, 12, 4, True, 1, 64),
    "w4-d16-unshifted": (8, 8, 4, False, 2, 16),
}

# float32: float32 accumulation over up to a few thousand terms in another order than the
# reference's matmuls: observed ~1e-6; 2e-5 of max(1, |ref|) still flags any index error.
# float16 / bfloat16: compared with a float32 reference on the same rounded inputs; the
# kernels accumulate in float32 and round once: one rounding of the result, 2^-10 (fp16,
# 11-bit significand, with margin) / 2^-8 (bf16). Parameter grads stay float32: 1e-4.
TOL = {torch.float32: 2e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -8}
PARAM_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _stripe_inputs(case, dtype, batch=2, dev="cuda"):
    H, W, ss, sg, shift, f, nh, d = case
    geom = stripe_geometry((H, W), ss, sg, shift, f)
    C = nh * d
    big = torch.randn(batch, H * W, 5 * C, device=dev).to(dtype)
    anchor = torch.randn(batch, W // f, H // f, C, device=dev).to(dtype).transpose(1, 2)
    params = [torch.rand(nh, device=dev) * 9 + 1, torch.rand(geom.table_rows, nh, device=dev) * 16,
              torch.rand(nh, device=dev) * 9 + 1, torch.rand(geom.table_rows, nh, device=dev) * 16]
    go = torch.randn(batch, H * W, C, device=dev).to(dtype)
    return geom, nh, big, C, anchor, params, go


def _grads(fn, geom, nh, big, C, anchor, params, go, dtype):
    big = big.detach().to(dtype).requires_grad_(True)
    anc = anchor.detach().to(dtype).requires_grad_(True)
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn(big[..., C: 4 * C], anc, geom, nh, *ps)
    grads = torch.autograd.grad(out, [big, anc] + ps, go.to(dtype))
    return out, grads


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(STRIPE_CASES))
def test_stripe_matches_reference(name, dtype, dev):
    geom, nh, big, C, anchor, params, go = _stripe_inputs(STRIPE_CASES[name], dtype, dev=dev)
    ref_out, ref_g = _grads(stripe_attention_reference, geom, nh, big, C, anchor, params, go, torch.float32)
    out, g = _grads(_kernels(dev).stripe, geom, nh, big, C, anchor, params, go, dtype)
    assert out.dtype == dtype
    assert max_scaled_error(out, ref_out) <= TOL[dtype]
    for n, a, e in zip(["qkv", "anchor"], g[:2], ref_g[:2]):
        assert max_scaled_error(a, e) <= TOL[dtype], n
    for n, a, e in zip(["scale1", "bias1", "scale2", "bias2"], g[2:], ref_g[2:]):
        assert max_scaled_error(a, e) <= PARAM_TOL[dtype], n


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_matches_reference(name, dtype, dev):
    H, W, ws, shifted, nh, d = WINDOW_CASES[name]
    geom = window_geometry((H, W), ws, shifted)
    C = nh * d
    base = torch.randn(2, H * W, 4 * C, device=dev).to(dtype)
    scale, bias = torch.rand(nh, device=dev) * 9 + 1, torch.rand(geom.table_rows, nh, device=dev) * 16
    go = torch.randn(2, H * W, C, device=dev).to(dtype)

    def run(fn, dt):
        big = base.detach().to(dt).requires_grad_(True)
        s, b = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        out = fn(big[..., C:], geom, nh, s, b)
        return out, torch.autograd.grad(out, [big, s, b], go.to(dt))

    ref_out, ref_g = run(window_attention_reference, torch.float32)
    out, g = run(_kernels(dev).window, dtype)
    assert out.dtype == dtype and max_scaled_error(out, ref_out) <= TOL[dtype]
    assert max_scaled_error(g[0], ref_g[0]) <= TOL[dtype]
    for a, e in zip(g[1:], ref_g[1:]):
        assert max_scaled_error(a, e) <= PARAM_TOL[dtype]


@pytest.mark.parametrize("dev", DEVICES)
def test_backward_is_deterministic(dev):
    """No atomics: every gradient, the bias tables and logit scales included, has the same bits
    on every run (the GPU schedules blocks differently each time; the emulation runs its blocks
    on OpenMP threads)."""
    geom, nh, big, C, anchor, params, go = _stripe_inputs(STRIPE_CASES["H-groups-shifted"], torch.float32, dev=dev)
    runs = [_grads(_kernels(dev).stripe, geom, nh, big, C, anchor, params, go, torch.float32)[1] for _ in range(3)]
    for other in runs[1:]:
        for n, a, b in zip(["qkv", "anchor", "scale1", "bias1", "scale2", "bias2"], runs[0], other):
            assert torch.equal(a, b), n
    wgeom = window_geometry((16, 24), 8, True)
    base = torch.randn(2, 16 * 24, 3 * 2 * 8, device=dev)
    s, b = torch.rand(2, device=dev) * 9 + 1, torch.rand(wgeom.table_rows, 2, device=dev) * 16
    wgo = torch.randn(2, 16 * 24, 16, device=dev)

    def wgrads():
        x, sc, bi = base.clone().requires_grad_(True), s.clone().requires_grad_(True), b.clone().requires_grad_(True)
        return torch.autograd.grad(_kernels(dev).window(x, wgeom, 2, sc, bi), [x, sc, bi], wgo)

    first = wgrads()
    for _ in range(2):
        assert all(torch.equal(a, e) for a, e in zip(wgrads(), first))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sanitizer_small():
    """Tiny shifted stripe + window case (runs in seconds under compute-sanitizer)."""
    geom, nh, big, C, anchor, params, go = _stripe_inputs((8, 8, (4, 4), (None, None), True, 2, 1, 4), torch.float32, 1)
    ref_out, ref_g = _grads(stripe_attention_reference, geom, nh, big, C, anchor, params, go, torch.float32)
    out, g = _grads(cuda_backend.stripe, geom, nh, big, C, anchor, params, go, torch.float32)
    torch.cuda.synchronize()
    assert max_scaled_error(out, ref_out) <= TOL[torch.float32]
    for a, e in zip(g, ref_g):
        assert max_scaled_error(a, e) <= TOL[torch.float32]
    wg = window_geometry((8, 8), 4, True)
    qkv = torch.randn(1, 64, 12, device="cuda", requires_grad=True)
    s, b = torch.rand(2, device="cuda") + 1, torch.rand(wg.table_rows, 2, device="cuda")
    out = cuda_backend.window(qkv, wg, 2, s, b)
    out.sum().backward()
    torch.cuda.synchronize()
    assert max_scaled_error(out, window_attention_reference(qkv, wg, 2, s, b)) <= TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_uses_a_compiled_backend_on_cuda():
    b = G.backends.resolve_backend("auto", torch.device("cuda"), torch.float32)
    assert b.name != "reference"


@pytest.mark.parametrize("dev", DEVICES)
def test_channel_stride_other_than_one(dev):
    """The kernels read rows with channel stride 1; other layouts are copied first (same result)."""
    geom = window_geometry((8, 8), 4, True)
    base = torch.randn(1, 64, 12, 2, device=dev)[..., 0]  # channel stride 2
    assert base.stride(-1) == 2
    s, b = torch.rand(2, device=dev) + 1, torch.rand(geom.table_rows, 2, device=dev)
    out = _kernels(dev).window(base, geom, 2, s, b)
    assert max_scaled_error(out, window_attention_reference(base, geom, 2, s, b)) <= TOL[torch.float32]
