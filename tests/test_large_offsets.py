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
  in place through their strides. Those backends write their outputs contiguous, so their write
  offsets pass 2^31 only in buffers of > 2^31 elements: for the emulated CUDA kernels that is
  tests/test_large_offsets_cxx.py; for the cpu kernels the last section here
  (``test_cpu_*_writes_beyond_2_32``): through test-only entries that run only the tasks of image
  0 and of image B-1 of a batch of 18.9M images (batch-stride-0 inputs) into lazily mapped
  buffers, every buffer the kernels write (out, the saved Z and stage-1 row statistics, d_qkv,
  d_anchor, read back by the backward with grad_out) has image B-1 beyond 2^32 elements, and it
  must hold image 0's bits (and those of a batch of one), float32 and bfloat16;
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


# ---- cpu: write offsets beyond 2^32 (only the tasks of image 0 and of image B-1 run) -----------
# The cpu kernels write contiguous buffers (out, the saved Z and stage-1 row statistics, d_qkv,
# d_anchor), so their write offsets pass 2^31 only for buffers of > 2^31 elements. The test-only
# entries _C_cpu._*_tasks run the tasks of the given ranges only, into caller-provided buffers:
# here lazily committed ones of a batch so large that image B-1 starts beyond 2^32 elements in
# every buffer (2 x 2 x 8 x 8 grid values per image in each of out, Z, stat1 and d_anchor, 3x in
# d_qkv), with batch-stride-0 inputs. Image 0 and image B-1 must hold the bits a batch of one
# gives, and the per-chunk (tau, bias) partials of their chunks (0 and 63) must be equal.
HUGE_B = (1 << 24) + (1 << 21)  # 18874368 images: (B - 1) * 256 = 1.125 * 2^32
HW_NH, HW_D = 2, 2
WRITE_STRIPE = dict(stripe_size=(4, 8), stripe_groups=(None, None), shift=True, f=1)  # f = 1: anchors = tokens
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def lazy_buffer(numel: int, dtype) -> torch.Tensor:
    """A contiguous zero tensor of ``numel`` elements, 2^31 elements into a lazy mapping: an offset
    wrapped to 32 bits (signed: >= -2^31; unsigned: < 2^32) stays inside it, no crash."""
    esize = torch.empty((), dtype=dtype).element_size()
    try:
        mm = mmap.mmap(-1, (LIMIT + numel) * esize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except (OSError, OverflowError) as e:
        pytest.skip(f"cannot map {(LIMIT + numel) * esize / 2 ** 30:.0f} GiB of address space lazily: {e}")
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=LIMIT * esize)  # the tensor keeps mm alive


def _same_images(name: str, huge: torch.Tensor, want: torch.Tensor) -> None:
    """Image 0 and image HUGE_B - 1 of ``huge`` (flat) hold the bits of ``want`` (one image)."""
    n = want.numel()
    assert huge.numel() == HUGE_B * n
    assert (HUGE_B - 1) * n > (1 << 32), f"{name}: the last image must start beyond 2^32 elements"
    assert huge.dtype == want.dtype
    want = want.reshape(-1).view(BITS[huge.dtype])
    assert bool(want.ne(0).any()), f"{name}: the batch-of-one result is all zero"
    for b in (0, HUGE_B - 1):
        got = huge[b * n:(b + 1) * n].view(BITS[huge.dtype])
        bad = int(got.ne(want).sum())
        assert bad == 0, f"{name}: image {b} (offset {b * n}) differs from a batch of one in {bad} of {n} elements"


def _same_chunks(name: str, part: torch.Tensor, want: torch.Tensor) -> None:
    """Per-chunk partials: chunk 0 (image 0's tasks) and chunk 63 (image B-1's) equal bit for bit and
    close to a batch of one's sum (``want``), the chunks between them zero."""
    assert part.shape[0] == 64, part.shape
    bits = part.view(torch.int32)
    assert torch.equal(bits[0], bits[-1]), f"{name}: image B-1's partial differs from image 0's"
    assert not bool(part[1:-1].ne(0).any()), f"{name}: a chunk without tasks got a partial"
    assert rel_err(part[0], want) <= 1e-5, f"{name}: {rel_err(part[0], want):.1e} from a batch of one"


def _huge_batch(x: torch.Tensor) -> torch.Tensor:
    return x.expand(HUGE_B, *x.shape[1:])  # batch stride 0: every image sees image 0's data


def _ranges(tasks_per_image: int):
    return [0, tasks_per_image, (HUGE_B - 1) * tasks_per_image, HUGE_B * tasks_per_image]


@pytest.mark.skipif(IN_INTERPRETER, reason="the triton subprocess runs only the triton cases")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_stripe_writes_beyond_2_32(cpu_backend, dtype):
    from grl_kernels.backends import extension
    from grl_kernels.backends.extension import ops

    ext = extension.load("cpu")
    g, inputs = stripe_case(1, X_SIZE, WRITE_STRIPE["stripe_size"], WRITE_STRIPE["stripe_groups"],
                            WRITE_STRIPE["shift"], WRITE_STRIPE["f"], HW_NH, HW_D, dtype)
    qkv, anc = inputs["qkv"], inputs["anchor"]
    p = [ops._tau(inputs["scale1"], torch.float32), ops._bias(inputs["bias1"], torch.float32),
         ops._tau(inputs["scale2"], torch.float32), ops._bias(inputs["bias2"], torch.float32)]
    geom, C, L, nw = ops.stripe_params(g), HW_NH * HW_D, g.H * g.W, g.num_windows
    gout1 = torch.randn(1, L, C, dtype=torch.float64).to(dtype)
    # a batch of one through the ordinary entry points
    out1, z1, st1 = ext.stripe_forward(qkv, anc, *p, geom, HW_NH)
    g1 = ext.stripe_backward(gout1, qkv, anc, *p, z1, st1, geom, HW_NH)
    # the huge batch, image 0's and image B-1's tasks only
    ranges = _ranges(nw * HW_NH)
    out, z, st = (lazy_buffer(HUGE_B * t.numel(), t.dtype) for t in (out1, z1, st1))
    hq, ha = _huge_batch(qkv), _huge_batch(anc)
    ext._stripe_forward_tasks(hq, ha, *p, geom, HW_NH, out, z, st, ranges)
    gout = lazy_buffer(HUGE_B * gout1.numel(), dtype)
    gout[:L * C] = gout1.reshape(-1)
    gout[-L * C:] = gout1.reshape(-1)
    gq, ga = (lazy_buffer(HUGE_B * t.numel(), dtype) for t in (g1[0], g1[1]))
    dt, rdb = ext._stripe_backward_tasks(gout.view(HUGE_B, L, C), hq, ha, *p, z, st, geom, HW_NH, gq, ga, ranges)
    for name, huge, want in (("out", out, out1), ("Z", z, z1), ("stat1", st, st1), ("d_qkv", gq, g1[0]),
                             ("d_anchor", ga, g1[1])):
        _same_images(f"stripe {name}", huge, want)
    _same_chunks("stripe d_tau", dt, torch.stack([g1[2], g1[4]]))
    _same_chunks("stripe d_bias", rdb.flip(-1), torch.stack([g1[3], g1[5]]))


@pytest.mark.skipif(IN_INTERPRETER, reason="the triton subprocess runs only the triton cases")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_window_writes_beyond_2_32(cpu_backend, dtype):
    from grl_kernels.backends import extension
    from grl_kernels.backends.extension import ops

    ext = extension.load("cpu")
    g, inputs = window_case(1, X_SIZE, WS, True, HW_NH, HW_D, dtype)
    qkv = inputs["qkv"]
    p = [ops._tau(inputs["scale"], torch.float32), ops._bias(inputs["bias"], torch.float32)]
    geom, C, L, nw = ops.window_params(g), HW_NH * HW_D, g.H * g.W, g.num_windows
    gout1 = torch.randn(1, L, C, dtype=torch.float64).to(dtype)
    (out1,) = ext.window_forward(qkv, *p, geom, HW_NH)
    g1 = ext.window_backward(gout1, qkv, *p, geom, HW_NH)
    ranges = _ranges(nw * HW_NH)
    hq = _huge_batch(qkv)
    out = lazy_buffer(HUGE_B * out1.numel(), dtype)
    ext._window_forward_tasks(hq, *p, geom, HW_NH, out, ranges)
    gout = lazy_buffer(HUGE_B * gout1.numel(), dtype)
    gout[:L * C] = gout1.reshape(-1)
    gout[-L * C:] = gout1.reshape(-1)
    gq = lazy_buffer(HUGE_B * g1[0].numel(), dtype)
    dt, rdb = ext._window_backward_tasks(gout.view(HUGE_B, L, C), hq, *p, geom, HW_NH, gq, ranges)
    _same_images("window out", out, out1)
    _same_images("window d_qkv", gq, g1[0])
    _same_chunks("window d_tau", dt, g1[1])
    _same_chunks("window d_bias", rdb.flip(-1), g1[2])


@pytest.mark.skipif(IN_INTERPRETER, reason="the triton subprocess runs only the triton cases")
def test_cpu_task_entries_check_their_arguments(cpu_backend):
    from grl_kernels.backends import extension
    from grl_kernels.backends.extension import ops

    ext = extension.load("cpu")
    g, inputs = window_case(2, X_SIZE, WS, True, HW_NH, HW_D)
    p = [ops._tau(inputs["scale"], torch.float32), ops._bias(inputs["bias"], torch.float32)]
    geom, tasks = ops.window_params(g), 2 * g.num_windows * HW_NH
    out = torch.zeros(2, g.H * g.W, HW_NH * HW_D)
    ext._window_forward_tasks(inputs["qkv"], *p, geom, HW_NH, out, [0, tasks])
    assert torch.equal(out, ext.window_forward(inputs["qkv"], *p, geom, HW_NH)[0])  # all tasks: the entry point
    for bad in ([0], [0, tasks + 1], [3, 2], [0, 4, 2, 5]):
        with pytest.raises(RuntimeError, match="task ranges"):
            ext._window_forward_tasks(inputs["qkv"], *p, geom, HW_NH, out, bad)
    for buf in (out[:1], out.double(), out.transpose(1, 2)):
        with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
            ext._window_forward_tasks(inputs["qkv"], *p, geom, HW_NH, buf, [0, tasks])
