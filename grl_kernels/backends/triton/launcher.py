"""Host side of the Triton backend: configuration choice, workspaces, grids, launches.

Entry points (tensors in, tensors out; no autograd here, see autograd.py):
    stripe_forward(qkv, anchor, geom, nh, scale1, bias1, scale2, bias2) -> (out, z, stat1, stat2)
    stripe_backward(grad, qkv, anchor, geom, nh, scale1, bias1, scale2, bias2, out, z, stat1, stat2)
    window_forward(qkv, geom, nh, scale, bias) -> (out, stat)
    window_backward(grad, qkv, geom, nh, scale, bias, out, stat)
``geom`` is a StripeGeometry / WindowGeometry. ``stat*`` are the softmax row statistics the
forward saves for the backward, float32 (BWH, rows, 2): the row max (log2 units) and the
row sum of exp2(s - max) (common.store_stats). ``scale*`` are tau (nh,), ``bias*`` the
(R, nh) tables 16*sigmoid(T), in any floating dtype (used in float32).

CUDA tensors run the compiled kernels. In a process that imported triton with
TRITON_INTERPRET=1, the same kernels run in Triton's interpreter and take CPU tensors
(slow; that is how the CI checks the numerics without a GPU). ``record_launches()``
collects the launches instead of running them (used with meta tensors by the compile checks).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ...geometry import StripeGeometry, WindowGeometry
from . import kernels as _kernels
from .config import head_pad

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Test hook: {"BM": int, "BN": int, "splits": int, "bias_groups": int} forces block sizes / split counts.
_OVERRIDE: Dict[str, int] = {}
_recorder: Optional[List[dict]] = None


@contextlib.contextmanager
def override(**kw):
    """Force block sizes (BM, BN: powers of two >= 16) or the split count, for tests."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kw)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


# Test hook: allocator of the activation-sized outputs (out, dqkv, danchor), fn(shape, dtype, device).
# The kernels take those tensors' strides, so a test can hand them views with huge strides
# (tests/test_large_offsets.py: element offsets beyond 2^31).
_activation_alloc = None


def _activation(shape, dtype, device) -> torch.Tensor:
    if _activation_alloc is not None:
        return _activation_alloc(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def activation_allocator(fn):
    """Allocate out / dqkv / danchor with ``fn(shape, dtype, device)`` (any strides), for tests."""
    global _activation_alloc
    old, _activation_alloc = _activation_alloc, fn
    try:
        yield
    finally:
        _activation_alloc = old


@contextlib.contextmanager
def record_launches():
    """Collect launches as dicts {kernel, args, constexprs, num_warps, num_stages} instead of running."""
    global _recorder
    old, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = old


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    BM: int  # rows of a program (queries / anchors / tokens it owns)
    BN: int  # columns per loop iteration
    num_warps: int = 4
    num_stages: int = 2


def _p2(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def device_arch(device: torch.device) -> int:
    """Compute capability as 80, 86, 90, ... (meta tensors: the target set by ``target_arch``)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return _META_ARCH[0]


_META_ARCH = [90]


@contextlib.contextmanager
def target_arch(arch: int):
    """The compute capability that launches on meta tensors are configured for (compile checks)."""
    old = _META_ARCH[0]
    _META_ARCH[0] = int(arch)
    try:
        yield
    finally:
        _META_ARCH[0] = old


def choose_config(kind: str, rows: int, cols: int, D: int, dtype: torch.dtype, arch: int = 90) -> Config:
    """Block sizes for a kernel whose programs own ``rows`` and loop over ``cols``, on compute
    capability ``arch``.

    kind "fwd": one score tile, one P@V; "bwd": score, dP, dS and two or three products
    per tile, so narrower column blocks; "bias": score and dP, plus the dS accumulator tile.
    """
    # The largest tiles without register spills at head dim <= 32 on sm80/sm90 (compile_check;
    # benchmarks/results/static-sm90/triton.md). 16-bit: 64 x 64 forward, 64 x 32 backward (64 x 64
    # spilled 50-220 B). float32 products are FMA loops (no tensor cores): half the rows, and
    # narrower columns at D = 64 (64 x 32 spilled 150-470 B).
    # sm8x (mma.sync, no wgmma) needs more registers for the same tiles: at D >= 32 the 16-bit
    # forward takes 64 x 32 there and the backward one pipeline stage (64 x 64 forward and the
    # 2-stage backward spilled 4-56 B on sm80).
    stages = 2
    if dtype != torch.float32:
        sm8x = arch < 90 and D >= 32
        if kind == "fwd":
            bm, bn = 64, (32 if (sm8x or D > 64) else 64)
        else:
            bm, bn = (32 if D > 64 else 64), 32
            stages = 1 if sm8x else 2
    elif kind == "fwd":
        bm = 32 if D <= 64 else 16
        bn = 32 if D <= 32 else 16
    else:
        bm = 32
        bn = 32 if D <= 64 else 16
    if _kernels.INTERPRETED:  # no registers to budget: big tiles, fewer interpreted steps
        bm, bn = 64, 64
    bm = _OVERRIDE.get("BM", min(bm, _p2(rows)))
    bn = _OVERRIDE.get("BN", min(bn, _p2(cols)))
    return Config(bm, bn, num_stages=stages)  # 4 warps: FlashAttention-2's choice for 64-row tiles (untuned)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact products unless the user allowed TF32 for matmuls in torch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132 if device.type == "meta" else 1


def _splits(device: torch.device, programs: int, blocks: int) -> Tuple[int, int]:
    """(number of splits, blocks per split) of a loop of ``blocks`` over ``programs`` programs."""
    if "splits" in _OVERRIDE:
        want = _OVERRIDE["splits"]
    else:
        want = math.ceil(2 * _num_sms(device) / max(programs, 1))
        want = min(want, max(1, blocks // 4), 16)  # >= 4 blocks per split, bounded workspace
    want = max(1, min(want, blocks))
    per = math.ceil(blocks / want)
    return math.ceil(blocks / per), per


# ---------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------
def _launch(name: str, grid, args, constexprs: dict, cfg: Config, device: torch.device) -> None:
    if _recorder is not None:
        _recorder.append(dict(kernel=name, args=args, constexprs=constexprs, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages))
        return
    if device.type == "meta":
        return
    kern = getattr(_kernels.KERNELS, name)
    if _kernels.INTERPRETED:
        kern[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kern[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check_inputs(qkv: torch.Tensor, nh: int) -> Tuple[int, int, int, int]:
    if qkv.device.type == "cpu" and _recorder is None and not _kernels.INTERPRETED:
        raise RuntimeError(
            "the triton backend runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (or use CUDA tensors)"
        )
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend handles float16, bfloat16 and float32, got {qkv.dtype}")
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // nh
    return B, L, C, d


def _bias_arg(bias: torch.Tensor) -> torch.Tensor:
    """(R, nh) table -> (nh, R) float32 times log2(e) (the kernels work in log2 units)."""
    return (bias.detach().to(torch.float32).t() * LOG2E).contiguous()


def _scale_arg(scale: torch.Tensor) -> torch.Tensor:
    return scale.detach().reshape(-1).to(torch.float32).contiguous()


def stripe_geo_args(g: StripeGeometry, nh: int, d: int) -> tuple:
    """Run-time geometry arguments of the stripe kernels (image size, shifts, window counts)."""
    mth, mtw = (g.shift_h, g.shift_w) if g.shifted else (0, 0)
    mtah, mtaw = (g.anchor_shift_h, g.anchor_shift_w) if g.shifted else (0, 0)
    return (
        g.H, g.W, g.shift_h, g.shift_w, mth, mtw,
        g.Ha, g.Wa, g.anchor_shift_h, g.anchor_shift_w, mtah, mtaw,
        g.windows_w, g.num_windows, nh, g.table_rows,
    )


def stripe_geo_constexprs(g: StripeGeometry, d: int, align: int) -> dict:
    """The geometry fixed per model, compiled in: stripe and anchor-window sizes, head dim, and
    the row-offset alignment ``AL`` (see row_align)."""
    return dict(sh=g.sh, sw=g.sw, ah=g.ah, aw=g.aw, d=d, AL=align)


def window_geo_args(g: WindowGeometry, nh: int, d: int) -> tuple:
    return (g.H, g.W, g.shift, g.windows_w, g.num_windows, nh, g.table_rows)


def window_geo_constexprs(g: WindowGeometry, d: int, align: int) -> dict:
    return dict(ws=g.ws, d=d, AL=align)


def row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing every stride of the activation tensors except their
    last (channel) one: the kernels may assume row offsets are multiples of it (vector loads)."""
    a = 16
    for t in tensors:
        for s in t.stride()[:-1]:
            if s:
                a = math.gcd(a, abs(int(s)))
    return a


def _bias_groups(device, n_win: int, tiles_per_head: int, nh: int, cells: int) -> Tuple[int, int]:
    """(groups, windows per group) of a bias-gradient partial kernel: about 4 programs per SM
    (each loops over its group's windows), and at most ~64M float32 partials (256 MB)."""
    if "bias_groups" in _OVERRIDE:
        want = _OVERRIDE["bias_groups"]
    else:
        want = math.ceil(4 * _num_sms(device) / max(1, tiles_per_head * nh))
        want = min(want, max(1, (64 << 20) // max(1, nh * cells)))
    want = max(1, min(want, n_win))
    per = math.ceil(n_win / want)
    return math.ceil(n_win / per), per


def _bias_grad(partial: str, ptrs: tuple, strides: tuple, geo: tuple, gc: dict, n_win: int, nh: int, rows: int,
               cols: int, D: int, dtype, prec: str, bin_geo: tuple, R: int, like: torch.Tensor, device) -> torch.Tensor:
    """Bias-table gradient (R, nh) in like.dtype: the partial kernel ``partial`` (rows x cols tiles,
    summed over the windows of a group), the group sum in torch, then bias_grad_reduce."""
    c = choose_config("bias", rows, cols, D, dtype, device_arch(device))
    rb, cb = -(-rows // c.BM), -(-cols // c.BN)
    groups, per = _bias_groups(device, n_win, rb * cb, nh, rows * cols)
    gp = torch.empty((groups, nh, rows, cols), dtype=torch.float32, device=device)
    _launch(partial, (groups * nh, rb, cb), (*ptrs, gp, *strides, *geo, per, n_win),
            dict(D=D, BM=c.BM, BN=c.BN, PREC=prec, **gc), c, device)
    g = gp.sum(0) if groups > 1 else gp[0]
    del gp
    db = torch.empty((nh, R), dtype=torch.float32, device=device)
    rh, rw, ch, cw, oy, ox, Rw = bin_geo
    Rh = R // Rw
    red = Config(32, min(64, _p2(rw)), num_warps=4)  # (rx, v) tiles
    _launch("bias_grad_reduce", (nh * Rh,), (g, db, R),
            dict(rh=rh, rw=rw, ch=ch, cw=cw, oy=oy, ox=ox, Rh=Rh, Rw=Rw, BX=red.BM, BV=red.BN), red, device)
    return db.t().to(like.dtype).contiguous()


# ---------------------------------------------------------------------------
# anchored stripe attention
# ---------------------------------------------------------------------------
def stripe_forward(qkv, anchor, g: StripeGeometry, nh: int, scale1, bias1, scale2, bias2):
    B, L, C, d = _check_inputs(qkv, nh)
    D = head_pad(d)
    dev = qkv.device
    N1, N2 = g.n1, g.n2
    BWH = B * g.num_windows * nh
    prec = _dot_precision(qkv.dtype)
    geo = stripe_geo_args(g, nh, d)
    s1, s2 = _scale_arg(scale1), _scale_arg(scale2)
    b1, b2 = _bias_arg(bias1), _bias_arg(bias2)
    qs = qkv.stride()
    as_ = anchor.stride()
    out = _activation((B, L, C), qkv.dtype, dev)
    gc = stripe_geo_constexprs(g, d, row_align(qkv, anchor, out))

    # stage 1: anchors over tokens, split over token blocks, then combined
    c1 = choose_config("fwd", N2, N1, D, qkv.dtype, device_arch(dev))
    mblocks = -(-N2 // c1.BM)
    n_splits, per = _splits(dev, BWH * mblocks, -(-N1 // c1.BN))
    acc = torch.empty((BWH, n_splits, N2, D), dtype=torch.float32, device=dev)
    ms = torch.empty((BWH, n_splits, N2), dtype=torch.float32, device=dev)
    ls = torch.empty_like(ms)
    _launch("stripe_fwd_anchor_partial", (BWH, mblocks, n_splits),
            (qkv, anchor, s1, b1, acc, ms, ls, *qs, *as_, *geo, per, n_splits),
            dict(D=D, BM=c1.BM, BN=c1.BN, PREC=prec, **gc), c1, dev)
    z = torch.empty((BWH, N2, D), dtype=torch.float32, device=dev)
    stat1 = torch.empty((BWH, N2, 2), dtype=torch.float32, device=dev)
    cc = Config(min(32, _p2(N2)), 16)
    _launch("stripe_fwd_combine", (BWH, -(-N2 // cc.BM)), (acc, ms, ls, z, stat1, N2, n_splits),
            dict(D=D, BM=cc.BM), cc, dev)
    del acc, ms, ls

    # stage 2: tokens over anchors, written in place into (B, H*W, C)
    stat2 = torch.empty((BWH, N1, 2), dtype=torch.float32, device=dev)
    c2 = choose_config("fwd", N1, N2, D, qkv.dtype, device_arch(dev))
    _launch("stripe_fwd_tokens", (BWH, -(-N1 // c2.BM)),
            (qkv, anchor, s2, b2, z, out, stat2, *qs, *as_, *out.stride(), *geo),
            dict(D=D, BM=c2.BM, BN=c2.BN, PREC=prec, **gc), c2, dev)
    return out, z, stat1, stat2


def stripe_backward(grad, qkv, anchor, g: StripeGeometry, nh: int, scale1, bias1, scale2, bias2, out, z, stat1, stat2):
    B, L, C, d = _check_inputs(qkv, nh)
    D = head_pad(d)
    dev = qkv.device
    N1, N2 = g.n1, g.n2
    nW = g.num_windows
    BWH = B * nW * nh
    prec = _dot_precision(qkv.dtype)
    geo = stripe_geo_args(g, nh, d)
    s1, s2 = _scale_arg(scale1), _scale_arg(scale2)
    b1, b2 = _bias_arg(bias1), _bias_arg(bias2)
    qs, as_, os_, gs = qkv.stride(), anchor.stride(), out.stride(), grad.stride()
    R = g.table_rows

    dqkv = _activation((B, L, 3 * C), qkv.dtype, dev)
    danchor = _activation(tuple(anchor.shape), anchor.dtype, dev)
    gc = stripe_geo_constexprs(g, d, row_align(qkv, anchor, out, grad, dqkv, danchor))

    # 1. tokens, stage 2: Delta2, dq, tau2 gradient
    ct = choose_config("bwd", N1, N2, D, qkv.dtype, device_arch(dev))
    tblocks = -(-N1 // ct.BM)
    delta2 = torch.empty((BWH, N1), dtype=torch.float32, device=dev)
    dtau2 = torch.empty((BWH, tblocks), dtype=torch.float32, device=dev)
    _launch("stripe_bwd_tokens2", (BWH, tblocks),
            (qkv, anchor, s2, b2, z, out, grad, stat2, delta2, dqkv, dtau2,
             *qs, *as_, *os_, *gs, *dqkv.stride(), *geo),
            dict(D=D, BM=ct.BM, BN=ct.BN, PREC=prec, **gc), ct, dev)
    dbias2 = _bias_grad("stripe_bwd_bias2_partial", (qkv, anchor, s2, b2, z, grad, stat2, delta2), (*qs, *as_, *gs),
                        geo, gc, B * nW, nh, N1, N2, D, qkv.dtype, prec, (g.sh, g.sw, g.ah, g.aw, g.ah - 1, g.aw - 1,
                                                                       g.table_w), R, bias2, dev)

    # 2. anchors, stage 2: dZ and the stage-2 part of d(a_hat), split over token blocks
    ca = choose_config("bwd", N2, N1, D, qkv.dtype, device_arch(dev))
    ablocks = -(-N2 // ca.BM)
    n_splits, per = _splits(dev, BWH * ablocks, -(-N1 // ca.BN))
    dzp = torch.empty((n_splits, BWH, N2, D), dtype=torch.float32, device=dev)
    dap2 = torch.empty_like(dzp)
    _launch("stripe_bwd_anchors2", (BWH, ablocks, n_splits),
            (qkv, anchor, s2, b2, z, grad, stat2, delta2, dzp, dap2, *qs, *as_, *gs, *geo, per, BWH),
            dict(D=D, BM=ca.BM, BN=ca.BN, PREC=prec, **gc), ca, dev)
    dz = dzp.sum(0) if n_splits > 1 else dzp[0]
    del dzp
    # Delta1 = sum_j P1 dP1: dZ . Z in float32; in 16 bits a pass of stripe_bwd_anchors1 over all
    # token blocks with its own P1 and dP1 (see stripe_bwd.py, 3.)
    dap1 = torch.empty_like(dap2)
    if qkv.dtype == torch.float32:
        delta1 = (dz * z).sum(-1)
    else:
        delta1 = torch.empty((BWH, N2), dtype=torch.float32, device=dev)
        _launch("stripe_bwd_anchors1", (BWH, ablocks, 1),
                (qkv, anchor, s1, b1, dz, delta1, stat1, dap1, *qs, *as_, *geo, -(-N1 // ca.BN), BWH),
                dict(D=D, BM=ca.BM, BN=ca.BN, PREC=prec, DELTA_PASS=True, **gc), ca, dev)

    # 3. anchors, stage 1: the rest of d(a_hat); then through F.normalize into (B, H/f, W/f, C)
    _launch("stripe_bwd_anchors1", (BWH, ablocks, n_splits),
            (qkv, anchor, s1, b1, dz, delta1, stat1, dap1, *qs, *as_, *geo, per, BWH),
            dict(D=D, BM=ca.BM, BN=ca.BN, PREC=prec, **gc), ca, dev)
    dah = (dap1 + dap2).sum(0) if n_splits > 1 else dap1[0] + dap2[0]
    del dap1, dap2
    cf = Config(min(32, _p2(N2)), 16)
    _launch("stripe_bwd_anchor_finalize", (BWH, -(-N2 // cf.BM)),
            (anchor, dah, danchor, *as_, *danchor.stride(), *geo), dict(D=D, BM=cf.BM, **gc), cf, dev)

    # 4. tokens, stage 1: dk, dv, tau1 gradient; then the bias1 gradient
    dtau1 = torch.empty((BWH, tblocks), dtype=torch.float32, device=dev)
    _launch("stripe_bwd_tokens1", (BWH, tblocks),
            (qkv, anchor, s1, b1, dz, delta1, stat1, dqkv, dtau1, *qs, *as_, *dqkv.stride(), *geo),
            dict(D=D, BM=ct.BM, BN=ct.BN, PREC=prec, **gc), ct, dev)
    dbias1 = _bias_grad("stripe_bwd_bias1_partial", (qkv, anchor, s1, b1, dz, stat1, delta1), (*qs, *as_),
                        geo, gc, B * nW, nh, N2, N1, D, qkv.dtype, prec, (g.ah, g.aw, g.sh, g.sw, g.sh - 1, g.sw - 1,
                                                                       g.table_w), R, bias1, dev)

    dscale1 = dtau1.view(B * nW, nh, tblocks).sum((0, 2)).to(scale1.dtype).reshape(scale1.shape)
    dscale2 = dtau2.view(B * nW, nh, tblocks).sum((0, 2)).to(scale2.dtype).reshape(scale2.shape)
    return dqkv, danchor, dscale1, dbias1, dscale2, dbias2


# ---------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------
def window_forward(qkv, g: WindowGeometry, nh: int, scale, bias):
    B, L, C, d = _check_inputs(qkv, nh)
    D = head_pad(d)
    dev = qkv.device
    N = g.n
    BWH = B * g.num_windows * nh
    out = _activation((B, L, C), qkv.dtype, dev)
    stat = torch.empty((BWH, N, 2), dtype=torch.float32, device=dev)
    c = choose_config("fwd", N, N, D, qkv.dtype, device_arch(dev))
    gc = window_geo_constexprs(g, d, row_align(qkv, out))
    _launch("window_fwd", (BWH, -(-N // c.BM)),
            (qkv, _scale_arg(scale), _bias_arg(bias), out, stat, *qkv.stride(), *out.stride(),
             *window_geo_args(g, nh, d)),
            dict(D=D, BM=c.BM, BN=c.BN, PREC=_dot_precision(qkv.dtype), **gc), c, dev)
    return out, stat


def window_backward(grad, qkv, g: WindowGeometry, nh: int, scale, bias, out, stat):
    B, L, C, d = _check_inputs(qkv, nh)
    D = head_pad(d)
    dev = qkv.device
    N = g.n
    nW = g.num_windows
    BWH = B * nW * nh
    prec = _dot_precision(qkv.dtype)
    geo = window_geo_args(g, nh, d)
    sc, bi = _scale_arg(scale), _bias_arg(bias)
    dqkv = _activation((B, L, 3 * C), qkv.dtype, dev)
    gc = window_geo_constexprs(g, d, row_align(qkv, out, grad, dqkv))
    delta = torch.empty((BWH, N), dtype=torch.float32, device=dev)
    c = choose_config("bwd", N, N, D, qkv.dtype, device_arch(dev))
    qblocks = -(-N // c.BM)
    dtau = torch.empty((BWH, qblocks), dtype=torch.float32, device=dev)
    _launch("window_bwd_dq", (BWH, qblocks),
            (qkv, sc, bi, out, grad, stat, delta, dqkv, dtau,
             *qkv.stride(), *out.stride(), *grad.stride(), *dqkv.stride(), *geo),
            dict(D=D, BM=c.BM, BN=c.BN, PREC=prec, **gc), c, dev)
    _launch("window_bwd_dkv", (BWH, qblocks),
            (qkv, sc, bi, grad, stat, delta, dqkv, *qkv.stride(), *grad.stride(), *dqkv.stride(), *geo),
            dict(D=D, BM=c.BM, BN=c.BN, PREC=prec, **gc), c, dev)
    ws = g.ws
    dbias = _bias_grad("window_bwd_bias_partial", (qkv, sc, bi, grad, stat, delta),
                       (*qkv.stride(), *grad.stride()),
                       geo, gc, B * nW, nh, N, N, D, qkv.dtype, prec, (ws, ws, ws, ws, ws - 1, ws - 1, g.table_side),
                       g.table_rows, bias, dev)
    dscale = dtau.view(B * nW, nh, qblocks).sum((0, 2)).to(scale.dtype).reshape(scale.shape)
    return dqkv, dscale, dbias
