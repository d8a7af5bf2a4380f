"""Element offsets beyond 2^31 on every backend: a 32-bit offset anywhere makes these tests fail.

The inputs are strided views whose batch, token and anchor-row/column strides are each BELOW
2^31 elements (so they reach the kernels as 32-bit ints, as Triton specializes them) while
index * stride is ABOVE 2^31 for the last images, tokens and anchor rows/columns. The views lie
in an anonymous MAP_NORESERVE mapping of ~40 GB of address space of which only the few pages
holding the views' rows are ever touched (< 1 MB), so CI runs them on a small machine. The
views start 2^32 elements into the mapping: an offset computed in 32 bits (wrapped, signed or
unsigned) still points into the mapping, reads zeros instead of the data, or writes where
nobody looks, and the comparison with the reference on compact copies fails (no crash).

- cpu and cuda (the CUDA kernels through the emulation layer, csrc/emu): qkv and anchor read
  in place through their strides (those backends write their outputs contiguous: their write
  offsets are covered by tests/test_large_offsets_cxx.py);
- triton (Triton's interpreter, which computes int32 arithmetic in int32 numpy arrays): also
  the forward output and the gradients written through huge strides
  (``launcher.activation_allocator``) and ``grad`` / ``out`` read through them in the backward.

The triton cases re-run this file in a subprocess with TRITON_INTERPRET=1 (as
tests/test_triton_interpreter.py does). Geometry: batch 3, 8 x 8 images, shifted stripes 4 x 8
with f = 2 (4 x 4 anchors), shifted windows 4 x 4, 2 heads of dim 4, float32.
"""
from __future__ import annotations

import mmap
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from triton_helpers import (
    reference_stripe, reference_window, rel_err, run_stripe, run_window, stripe_case, window_case,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
NO_JIT = os.environ.get("GRL_KERNELS_NO_JIT") == "1"
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 does not export it
GUARD = 1 << 32  # elements before the views: any 32-bit wrap of an offset < 2^33 stays inside
LIMIT = 1 << 31
TOL = 5e-4  # float32 kernels vs the float64 reference: observed <= 5.3e-5 (tau gradients, cancelling sums),
# <= 1e-5 elsewhere; a wrong offset reads zeros / leaves rows unwritten: O(1) errors

B, X_SIZE, NH, D = 3, (8, 8), 2, 4
STRIPE = dict(stripe_size=(4, 8), stripe_groups=(None, None), shift=True, f=2)
WS = 4

_keep = []  # the mappings must outlive the tensors viewing them


def huge_strides(shape) -> tuple:
    """Strides (channel stride 1) with every stride < 2^31 and (size - 1) * stride >= 1.5 * 2^31:
    the outer dimensions are NOT nested (a token stride may exceed the batch stride); rows
    never overlap (checked)."""
    strides = []
    for k, n in enumerate(shape[:-1]):
        assert n >= 3, "a dimension of 2 cannot reach 2^31 with a stride below 2^31"
        s = int(1.5 * LIMIT / (n - 1)) // 64 * 64 + 8 * (2 * k + 1)
        assert s < LIMIT and (n - 1) * s >= LIMIT
        strides.append(s)
    strides.append(1)
    starts = torch.zeros((), dtype=torch.int64)
    for n, s in zip(shape[:-1], strides[:-1]):
        starts = (starts.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s).reshape(-1)
    gaps = starts.sort().values.diff()
    assert int(gaps.min()) >= shape[-1], "rows of the huge view overlap"
    return tuple(strides)


def huge_view(shape, dtype, fill: torch.Tensor | None = None) -> torch.Tensor:
    """A (zero or ``fill``-valued) view with huge strides, GUARD elements into a lazy mapping."""
    shape = tuple(shape)
    strides = huge_strides(shape)
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    esize = torch.empty((), dtype=dtype).element_size()
    try:
        mm = mmap.mmap(-1, (GUARD + span) * esize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except (OSError, OverflowError) as e:  # e.g. a 32-bit address space or vm.overcommit_memory = 2
        pytest.skip(f"cannot map {(GUARD + span) * esize / 2 ** 30:.0f} GiB of address space lazily: {e}")
    _keep.append(mm)
    view = torch.frombuffer(mm, dtype=dtype).as_strided(shape, strides, GUARD)
    assert max(i * s for i, s in zip(shape, strides)) > LIMIT
    if fill is not None:
        view.copy_(fill)
    return view


def _alloc(shape, dtype, device):
    assert device.type == "cpu"
    return huge_view(shape, dtype)


def _check(label, out, grads, ref_out, ref_grads):
    errs = {"out": rel_err(out, ref_out)}
    errs.update({k: rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    print(label, {k: f"{v:.1e}" for k, v in errs.items()})
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{label}: offsets beyond 2^31 went wrong in {sorted(bad)}: {errs}"


def _stripe_inputs():
    g, inputs = stripe_case(B, X_SIZE, STRIPE["stripe_size"], STRIPE["stripe_groups"], STRIPE["shift"],
                            STRIPE["f"], NH, D, torch.float32)
    grad_out = torch.randn(B, g.H * g.W, NH * D, dtype=torch.float64).float()
    ref = reference_stripe(g, NH, inputs, grad_out)
    huge = dict(inputs, qkv=huge_view(inputs["qkv"].shape, torch.float32, inputs["qkv"]),
                anchor=huge_view(inputs["anchor"].shape, torch.float32, inputs["anchor"]))
    return g, huge, grad_out, ref


def _window_inputs():
    g, inputs = window_case(B, X_SIZE, WS, True, NH, D, torch.float32)
    grad_out = torch.randn(B, g.H * g.W, NH * D, dtype=torch.float64).float()
    ref = reference_window(g, NH, inputs, grad_out)
    huge = dict(inputs, qkv=huge_view(inputs["qkv"].shape, torch.float32, inputs["qkv"]))
    return g, huge, grad_out, ref


def test_huge_views_are_lazy_and_exact():
    """The harness itself: the views read back what was written, cost no memory, and a
    32-bit-wrapped offset lands in the untouched (zero) part of the mapping."""
    x = torch.randn(B, 64, 24)
    v = huge_view(x.shape, torch.float32, x)
    assert torch.equal(v.contiguous(), x)
    assert v.stride(0) < LIMIT and v.stride(1) < LIMIT and 63 * v.stride(1) > LIMIT
    wrapped = (2 * v.stride(0) + 63 * v.stride(1)) % (1 << 32)
    wrapped = wrapped - (1 << 32) if wrapped >= LIMIT else wrapped  # int32 wrap
    base = torch.frombuffer(_keep[-1], dtype=torch.float32)
    assert float(base[GUARD + wrapped]) == 0.0


@pytest.fixture(scope="module")
def cpu_backend():
    from grl_kernels.backends import cpu_backend as cb
    from grl_kernels.backends import extension

    ok, why = extension.availability("cpu")
    if not ok:
        pytest.fail(f"the cpu extension must build: {why}")
    return cb


@pytest.fixture(scope="module")
def emulated():
    if NO_JIT:
        pytest.skip("the emulation is built just in time")
    from grl_kernels.backends.extension import emulated as em

    em.module()
    return em


@pytest.mark.skipif(IN_INTERPRETER, reason="the triton subprocess runs only the triton cases")
@pytest.mark.parametrize("backend", ["cpu", "cuda-emulated"])
def test_stripe_reads_beyond_2_31(backend, request):
    mod = request.getfixturevalue("cpu_backend" if backend == "cpu" else "emulated")
    g, huge, grad_out, (ref_out, ref_grads) = _stripe_inputs()
    out, grads = run_stripe(mod.stripe, g, NH, huge, grad_out, torch.float32)
    _check(f"stripe {backend}", out, grads, ref_out, ref_grads)


@pytest.mark.skipif(IN_INTERPRETER, reason="the triton subprocess runs only the triton cases")
@pytest.mark.parametrize("backend", ["cpu", "cuda-emulated"])
def test_window_reads_beyond_2_31(backend, request):
    mod = request.getfixturevalue("cpu_backend" if backend == "cpu" else "emulated")
    g, huge, grad_out, (ref_out, ref_grads) = _window_inputs()
    out, grads = run_window(mod.window, g, NH, huge, grad_out, torch.float32)
    _check(f"window {backend}", out, grads, ref_out, ref_grads)


# ---- triton, in Triton's interpreter ---------------------------------------------------------
interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside the TRITON_INTERPRET=1 subprocess")


@interp
def test_triton_stripe_reads_and_writes_beyond_2_31():
    from grl_kernels.backends.triton import launcher

    g, huge, grad_out, (ref_out, ref_grads) = _stripe_inputs()
    grad = huge_view(grad_out.shape, torch.float32, grad_out)
    p = {k: huge[k] for k in ("scale1", "bias1", "scale2", "bias2")}
    p = {k: v.float() for k, v in p.items()}
    with launcher.activation_allocator(_alloc):
        out, z, lse1, lse2 = launcher.stripe_forward(huge["qkv"], huge["anchor"], g, NH, p["scale1"], p["bias1"],
                                                     p["scale2"], p["bias2"])
        assert out.stride(1) < LIMIT < (out.shape[1] - 1) * out.stride(1)  # really written through huge strides
        res = launcher.stripe_backward(grad, huge["qkv"], huge["anchor"], g, NH, p["scale1"], p["bias1"],
                                       p["scale2"], p["bias2"], out, z, lse1, lse2)
    assert res[0].stride(0) < LIMIT < (res[0].shape[0] - 1) * res[0].stride(0)
    grads = dict(zip(("qkv", "anchor", "scale1", "bias1", "scale2", "bias2"), res))
    _check("stripe triton (interpreted)", out, grads, ref_out, ref_grads)


@interp
def test_triton_window_reads_and_writes_beyond_2_31():
    from grl_kernels.backends.triton import launcher

    g, huge, grad_out, (ref_out, ref_grads) = _window_inputs()
    grad = huge_view(grad_out.shape, torch.float32, grad_out)
    scale, bias = huge["scale"].float(), huge["bias"].float()
    with launcher.activation_allocator(_alloc):
        out, lse = launcher.window_forward(huge["qkv"], g, NH, scale, bias)
        res = launcher.window_backward(grad, huge["qkv"], g, NH, scale, bias, out, lse)
    grads = dict(zip(("qkv", "scale", "bias"), res))
    _check("window triton (interpreted)", out, grads, ref_out, ref_grads)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the driver of the interpreter subprocess")
def test_triton_beyond_2_31_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k", "triton_stripe or triton_window",
           str(pathlib.Path(__file__))]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-6000:])
    assert r.returncode == 0, f"interpreted triton cases failed (rc {r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert "2 passed" in r.stdout, r.stdout[-2000:]
