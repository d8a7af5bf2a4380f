"""Hostile and odd inputs on the reference and cpu backends (issue 9, part 5).

- ``use_backend`` objects: re-entered, nested, shared between threads (thread-local stacks);
- empty batches and zero-size images: refused with the same ValueError/TypeError on every
  backend (validation runs before dispatch) and by the model;
- degenerate geometry: one-token windows, one anchor per window, head dim 1, rows whose
  every anchor is masked; extreme values: logit scales far past the ln 100 clamp and far
  below, bias tables of +-1e4. Every backend against the reference in float64, forward and
  every gradient; gradients that are analytically zero must be near zero (not rounding noise
  of some other size);
- torch thread counts 1, 2, 3 give bitwise identical cpu results; several Python threads with
  different backends at once give each the result of its own backend.
"""
from __future__ import annotations

import math
import os
import threading

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import registry
from grl_kernels.geometry import stripe_geometry, window_geometry

LN100 = math.log(100.0)


def _require(backend):
    if backend in G.available_backends():
        return
    if backend in os.environ.get("GRL_KERNELS_REQUIRE", "").split(","):
        pytest.fail(f"backend {backend!r} is required (GRL_KERNELS_REQUIRE) but not available")
    pytest.skip(f"backend {backend!r} not available")


BACKENDS = ["reference", "cpu"]


# ---------------------------------------------------------------------------------------------
# use_backend
def test_use_backend_object_reentered_and_nested():
    base = G.get_default_backend()
    ctx = G.use_backend("reference")
    with ctx as entered:
        assert entered is ctx and G.get_default_backend() == "reference"
        with ctx:  # the same object again, nested
            assert G.get_default_backend() == "reference"
            with G.use_backend("auto"):
                assert G.get_default_backend() == "auto"
            assert G.get_default_backend() == "reference"
        assert G.get_default_backend() == "reference"
    assert G.get_default_backend() == base
    with ctx:  # and once more after it was exited
        assert G.get_default_backend() == "reference"
    assert G.get_default_backend() == base


def test_use_backend_checks_name_at_creation():
    with pytest.raises(ValueError, match="unknown backend 'nope'; expected 'auto' or one of"):
        G.use_backend("nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        G.use_backend(3)


def test_use_backend_out_of_order_exit_is_an_error():
    a, b = G.use_backend("reference"), G.use_backend("auto")
    a.__enter__()
    b.__enter__()
    try:
        with pytest.raises(RuntimeError, match="exited in reverse order"):
            a.__exit__(None, None, None)
    finally:
        b.__exit__(None, None, None)
        a.__exit__(None, None, None)
    assert G.get_default_backend() == registry._global_default[0]


def test_use_backend_is_thread_local_and_shareable():
    ctx = G.use_backend("reference")
    barrier = threading.Barrier(3)
    seen, errors = {}, []

    def worker(i):
        try:
            barrier.wait(timeout=30)
            if i == 2:  # this thread never enters: it sees the global default throughout
                barrier.wait(timeout=30)
                seen[i] = G.get_default_backend()
                barrier.wait(timeout=30)
                return
            with ctx:  # one object entered by two threads at once
                with ctx:
                    barrier.wait(timeout=30)
                    seen[i] = G.get_default_backend()
                    barrier.wait(timeout=30)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {0: "reference", 1: "reference", 2: registry._global_default[0]}


# ---------------------------------------------------------------------------------------------
# helpers: one call of each functional entry point with every input differentiable
def _stripe_inputs(B, H, W, C, nh, ss, sg, shift, f, dtype=torch.float64, seed=0, ls=None, bias=None):
    g = torch.Generator().manual_seed(seed)
    geom = stripe_geometry((H, W), ss, sg, shift, f)
    qkv = torch.randn(B, H * W, 3 * C, generator=g, dtype=dtype)
    anchor = torch.randn(B, H // f, W // f, C, generator=g, dtype=dtype)
    ls1 = torch.full((nh,), math.log(10.0), dtype=dtype) + 0.3 * torch.randn(nh, generator=g, dtype=dtype)
    ls2 = ls1.flip(0).clone()
    if ls is not None:
        ls1 = torch.tensor(ls[0], dtype=dtype)
        ls2 = torch.tensor(ls[1], dtype=dtype)
    b1 = 16 * torch.rand(geom.table_rows, nh, generator=g, dtype=dtype)
    b2 = 16 * torch.rand(geom.table_rows, nh, generator=g, dtype=dtype)
    if bias is not None:
        b1 = bias * torch.randn(geom.table_rows, nh, generator=g, dtype=dtype)
        b2 = bias * torch.randn(geom.table_rows, nh, generator=g, dtype=dtype)
    return dict(qkv=qkv, anchor=anchor, ls1=ls1, b1=b1, ls2=ls2, b2=b2), dict(
        x_size=(H, W), stripe_size=ss, stripe_groups=sg, stripe_shift=shift, num_heads=nh, f=f)


def _run_stripe(backend, tensors, cfg, seed=1):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out = G.anchored_stripe_attention(
        leaves["qkv"], leaves["anchor"], cfg["x_size"], cfg["stripe_size"], cfg["stripe_groups"],
        cfg["stripe_shift"], cfg["num_heads"], leaves["ls1"], leaves["b1"], leaves["ls2"], leaves["b2"],
        anchor_window_down_factor=cfg["f"], backend=backend,
    )
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * gy).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _window_inputs(B, H, W, C, nh, ws, shift, dtype=torch.float64, seed=0, ls=None, bias=None):
    g = torch.Generator().manual_seed(seed)
    geom = window_geometry((H, W), ws, shift)
    qkv = torch.randn(B, H * W, 3 * C, generator=g, dtype=dtype)
    lsv = torch.full((nh,), math.log(10.0), dtype=dtype) if ls is None else torch.tensor(ls, dtype=dtype)
    b = (16 * torch.rand(geom.table_rows, nh, generator=g, dtype=dtype) if bias is None
         else bias * torch.randn(geom.table_rows, nh, generator=g, dtype=dtype))
    return dict(qkv=qkv, ls=lsv, b=b), dict(x_size=(H, W), window_size=ws, window_shift=shift, num_heads=nh)


def _run_window(backend, tensors, cfg, seed=1):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    out = G.grl_window_attention(leaves["qkv"], cfg["x_size"], cfg["window_size"], cfg["window_shift"],
                                 cfg["num_heads"], leaves["ls"], leaves["b"], backend=backend)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * gy).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _scaled(a, e):
    return ((a - e).abs().max() / e.abs().max().clamp(min=1.0)).item() if e.numel() else 0.0


def _assert_matches_reference(backend, run, tensors, cfg, tol=1e-10):
    out_r, grads_r = run("reference", tensors, cfg)
    out_b, grads_b = run(backend, tensors, cfg)
    assert torch.isfinite(out_b).all()
    assert _scaled(out_b, out_r) <= tol
    for k in grads_r:
        assert grads_b[k] is not None, k
        assert torch.isfinite(grads_b[k]).all(), k
        assert _scaled(grads_b[k], grads_r[k]) <= tol, (k, _scaled(grads_b[k], grads_r[k]))
    return out_r, grads_r, out_b, grads_b


# ---------------------------------------------------------------------------------------------
# empty and zero-size inputs: refused the same way everywhere
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_refused(backend):
    _require(backend)
    t, cfg = _stripe_inputs(1, 8, 8, 8, 2, [4, 4], [None, None], True, 2)
    with pytest.raises(ValueError, match=r"qkv has batch size 0 .*expected B >= 1"):
        G.anchored_stripe_attention(t["qkv"][:0], t["anchor"][:0], (8, 8), [4, 4], [None, None], True, 2,
                                    t["ls1"], t["b1"], t["ls2"], t["b2"], 2, backend=backend)
    w, wcfg = _window_inputs(1, 8, 8, 8, 2, 4, True)
    with pytest.raises(ValueError, match=r"qkv has batch size 0 .*expected B >= 1"):
        G.grl_window_attention(w["qkv"][:0], (8, 8), 4, True, 2, w["ls"], w["b"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_image_and_zero_channels_refused(backend):
    _require(backend)
    m = G.AnchoredStripeAttention((8, 8), [4, 4], [None, None], True, 2, anchor_window_down_factor=2, backend=backend)
    with pytest.raises(TypeError, match=r"x_size must be a pair \(H, W\) of positive ints .*got \(0, 8\)"):
        m(torch.randn(1, 0, 24), torch.randn(1, 0, 4, 8), (0, 8))
    with pytest.raises(ValueError, match="qkv last dimension must be 3\\*C with C >= num_heads = 2"):
        m(torch.randn(1, 64, 0), torch.randn(1, 4, 4, 0), (8, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_refuses_empty_batch_and_zero_size(backend):
    _require(backend)
    from grl_kernels.models import GRL

    model = GRL(img_size=8, embed_dim=8, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=4,
                stripe_size=[4, 4], upsampler="", upscale=1, backend=backend)
    for shape in [(0, 3, 8, 8), (1, 3, 0, 8), (1, 3, 8, 0)]:
        with pytest.raises(ValueError, match=r"batch size B >= 1 and height and width >= 1, got shape"):
            model(torch.rand(*shape))


# ---------------------------------------------------------------------------------------------
# degenerate geometries and extreme values, every backend against the reference in float64
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_windows(backend):
    """Window 1: softmax over one key, so the output is v and the gradients of q, k, the logit
    scale and the bias table are exactly zero."""
    _require(backend)
    t, cfg = _window_inputs(2, 5, 3, 6, 2, 1, False)
    out_r, g_r, out_b, g_b = _assert_matches_reference(backend, _run_window, t, cfg)
    torch.testing.assert_close(out_b, t["qkv"][..., 12:], rtol=0, atol=1e-12)
    assert g_b["qkv"][..., :12].abs().max() <= 1e-12
    assert g_b["ls"].abs().max() <= 1e-12 and g_b["b"].abs().max() <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_stripes_one_anchor(backend):
    """Stripe 1 x 1, f = 1: one token and one anchor per window; output = v, q/anchor/scale/bias
    gradients exactly zero."""
    _require(backend)
    t, cfg = _stripe_inputs(1, 4, 6, 4, 2, [1, 1], [None, None], False, 1)
    out_r, g_r, out_b, g_b = _assert_matches_reference(backend, _run_stripe, t, cfg)
    torch.testing.assert_close(out_b, t["qkv"][..., 8:], rtol=0, atol=1e-12)
    for k in ("anchor", "ls1", "ls2", "b1", "b2"):
        assert g_b[k].abs().max() <= 1e-12, k
    assert g_b["qkv"][..., :8].abs().max() <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [False, True])
def test_one_anchor_per_window(backend, shift):
    """Stripe 4 x 4 with f = 4: one anchor per window. Stage 2 is a softmax over one anchor,
    so q, the stage-2 scale and the stage-2 bias get exactly zero gradient; with the shift on,
    60 of 64 token rows are fully masked."""
    _require(backend)
    t, cfg = _stripe_inputs(2, 8, 8, 8, 2, [4, 4], [None, None], shift, 4)
    out_r, g_r, out_b, g_b = _assert_matches_reference(backend, _run_stripe, t, cfg)
    assert g_b["qkv"][..., :8].abs().max() <= 1e-12  # q
    assert g_b["ls2"].abs().max() <= 1e-12 and g_b["b2"].abs().max() <= 1e-12
    assert g_b["ls1"].abs().max() > 1e-3  # stage 1 still learns


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_rows(backend):
    """Stripe groups [2, 4], f = 4, shifted: 224 of 256 token rows and 12 of 16 anchor rows have
    every entry masked (-100 added everywhere, softmax unchanged, no NaN)."""
    _require(backend)
    geom = stripe_geometry((16, 16), [None, None], [2, 4], True, 4)
    assert int((geom.mask_w2a() == -100).all(-1).sum()) == 224
    t, cfg = _stripe_inputs(1, 16, 16, 8, 2, [None, None], [2, 4], True, 4)
    _assert_matches_reference(backend, _run_stripe, t, cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_one(backend):
    _require(backend)
    t, cfg = _stripe_inputs(2, 8, 8, 3, 3, [4, 8], [None, None], True, 2)
    _assert_matches_reference(backend, _run_stripe, t, cfg)
    w, wcfg = _window_inputs(2, 8, 8, 4, 4, 4, True)
    _assert_matches_reference(backend, _run_window, w, wcfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logit_scales_are_clamped(backend):
    """lambda = 60 acts as ln 100 (tau 100) with zero gradient; lambda = -60 (tau ~ 1e-26) makes
    the cosine term vanish. Compared with the reference, and with lambda = ln 100 exactly."""
    _require(backend)
    t, cfg = _stripe_inputs(2, 8, 8, 8, 2, [4, 4], [None, None], True, 2, ls=([60.0, -60.0], [-60.0, 60.0]))
    out_r, g_r, out_b, g_b = _assert_matches_reference(backend, _run_stripe, t, cfg)
    assert g_b["ls1"][0] == 0 and g_b["ls2"][1] == 0  # above the clamp: no gradient
    clamped = dict(t, ls1=torch.tensor([LN100, -60.0], dtype=torch.float64),
                   ls2=torch.tensor([-60.0, LN100], dtype=torch.float64))
    out_c, _ = _run_stripe(backend, clamped, cfg)
    torch.testing.assert_close(out_b, out_c, rtol=0, atol=1e-12)
    w, wcfg = _window_inputs(2, 8, 8, 8, 2, 4, True, ls=[60.0, -60.0])
    _, _, _, gw = _assert_matches_reference(backend, _run_window, w, wcfg)
    assert gw["ls"][0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_bias_values(backend):
    """Bias tables of +-1e4: the softmax is one-hot up to exp(-1e4); finite and equal to the reference."""
    _require(backend)
    t, cfg = _stripe_inputs(2, 8, 8, 8, 2, [4, 8], [None, None], True, 2, bias=1e4)
    _assert_matches_reference(backend, _run_stripe, t, cfg, tol=1e-9)
    w, wcfg = _window_inputs(2, 8, 8, 8, 2, 4, True, bias=1e4)
    _assert_matches_reference(backend, _run_window, w, wcfg, tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_bias_float32(backend):
    """The same in float32 (no overflow to inf/NaN in the streaming softmax)."""
    _require(backend)
    t, cfg = _stripe_inputs(1, 8, 8, 8, 2, [4, 8], [None, None], True, 2, dtype=torch.float32, bias=1e4)
    out_r, g_r = _run_stripe("reference", t, cfg)
    out_b, g_b = _run_stripe(backend, t, cfg)
    assert torch.isfinite(out_b).all() and all(torch.isfinite(g).all() for g in g_b.values())
    assert _scaled(out_b, out_r) <= 1e-5
    for k in g_r:
        assert _scaled(g_b[k], g_r[k]) <= 1e-4 * max(1.0, g_r[k].abs().max().item()), k


# ---------------------------------------------------------------------------------------------
# threads
def _cpu_results_for_thread_counts():
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            t, cfg = _stripe_inputs(3, 16, 24, 16, 2, [8, None], [None, 2], True, 2, dtype=torch.float32)
            out, grads = _run_stripe("cpu", t, cfg)
            w, wcfg = _window_inputs(3, 16, 24, 16, 2, 8, True, dtype=torch.float32)
            wout, wgrads = _run_window("cpu", w, wcfg)
            results.append({"out": out, **grads, "w_out": wout, **{"w_" + k: v for k, v in wgrads.items()}})
    finally:
        torch.set_num_threads(before)
    return results


INPUT_SIDE = ("out", "qkv", "anchor", "w_out", "w_qkv")  # outputs and per-token gradients
PARAM_SIDE = ("ls1", "b1", "ls2", "b2", "w_ls", "w_b")  # gradients reduced over windows and heads


def test_cpu_results_identical_for_thread_counts_1_2_3():
    """Forward and qkv/anchor gradients are bitwise the same for 1, 2 and 3 torch threads."""
    _require("cpu")
    results = _cpu_results_for_thread_counts()
    for other in results[1:]:
        for k in INPUT_SIDE:
            assert torch.equal(results[0][k], other[k]), k
        for k in PARAM_SIDE:  # at least equal to float32 rounding of the reduction
            assert _scaled(other[k], results[0][k]) <= 1e-5 * max(1.0, results[0][k].abs().max().item()), k


# the partials are summed over a fixed number of chunks (kReductionChunks in
# csrc/cpu/grl_cpu_common.h), not one per thread: fails if the chunking follows the thread count
def test_cpu_parameter_gradients_bitwise_identical_for_thread_counts():
    _require("cpu")
    results = _cpu_results_for_thread_counts()
    for other in results[1:]:
        for k in PARAM_SIDE:
            assert torch.equal(results[0][k], other[k]), k


def test_concurrent_threads_with_different_backends():
    """Four Python threads, two per backend, each under its own use_backend, run the same module
    repeatedly at once; each gets exactly the result of its backend run alone."""
    backends = [b for b in BACKENDS if b in G.available_backends()]
    m = G.AnchoredStripeAttention((16, 16), [8, None], [None, 2], True, 2, anchor_window_down_factor=2)
    t, _ = _stripe_inputs(2, 16, 16, 8, 2, [8, None], [None, 2], True, 2, dtype=torch.float32)
    qkv, anchor = t["qkv"], t["anchor"]
    expected = {}
    for b in backends:
        with torch.no_grad(), G.use_backend(b):
            expected[b] = m(qkv, anchor, (16, 16))
    if len(backends) > 1:
        assert not torch.equal(expected["reference"], expected["cpu"])  # the threads really differ
    errors, barrier = [], threading.Barrier(2 * len(backends))

    def worker(b):
        try:
            with G.use_backend(b):
                barrier.wait(timeout=60)
                for _ in range(5):
                    assert G.get_default_backend() == b
                    with torch.no_grad():
                        y = m(qkv, anchor, (16, 16))
                    assert torch.equal(y, expected[b]), b
        except Exception as exc:
            errors.append((b, exc))

    threads = [threading.Thread(target=worker, args=(b,)) for b in backends * 2]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
