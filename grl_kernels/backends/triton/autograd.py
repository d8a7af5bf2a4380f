"""Autograd and torch.compile wiring: torch.library custom ops with fake implementations.

Ops (namespace "grl_kernels"):
    triton_stripe_fwd(qkv, anchor, scale1, bias1, scale2, bias2, geom, num_heads)
        -> (out, z, stat1, stat2)
    triton_stripe_bwd(grad, qkv, anchor, scale1, bias1, scale2, bias2, out, z, stat1, stat2, geom, num_heads)
        -> (dqkv, danchor, dscale1, dbias1, dscale2, dbias2)
    triton_window_fwd(qkv, scale, bias, geom, num_heads) -> (out, stat)
    triton_window_bwd(grad, qkv, scale, bias, out, stat, geom, num_heads) -> (dqkv, dscale, dbias)
``geom`` is a list of ints (see stripe_geom_list / window_geom_list). The forward ops are
differentiable through ``register_autograd`` (the custom-op form of an autograd.Function),
so eager autograd, torch.compile(fullgraph=True) and AOT autograd all see one opaque op per
direction. z, stat1, stat2 and stat are saved statistics, not meant to be differentiated
(stat*: float32 (BWH, rows, 2), the softmax row max and row sum, see launcher).

Importing this module does not import triton; the kernels load on the first real call.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from ...geometry import StripeGeometry, WindowGeometry
from . import config


def stripe_geom_list(g: StripeGeometry) -> List[int]:
    return [g.H, g.W, g.sh, g.sw, g.shift_h, g.shift_w, g.down, int(g.shifted)]


def window_geom_list(g: WindowGeometry) -> List[int]:
    return [g.H, g.W, g.ws, g.shift]


def _stripe_geom(geom) -> StripeGeometry:
    H, W, sh, sw, th, tw, f, shifted = (int(v) for v in geom)
    return StripeGeometry(H, W, sh, sw, th, tw, f, bool(shifted))


def _window_geom(geom) -> WindowGeometry:
    H, W, ws, t = (int(v) for v in geom)
    return WindowGeometry(H, W, ws, t)


def _launcher():
    from . import launcher  # imports triton and the kernels

    return launcher


def _stats_shapes(qkv: Tensor, num_heads: int, num_windows: int):
    B, _, C3 = qkv.shape
    d = (C3 // 3) // num_heads
    return B * num_windows * num_heads, config.head_pad(d)


# ---------------------------------------------------------------------------
# anchored stripe attention
# ---------------------------------------------------------------------------
@torch.library.custom_op("grl_kernels::triton_stripe_fwd", mutates_args=())
def stripe_fwd(
    qkv: Tensor, anchor: Tensor, scale1: Tensor, bias1: Tensor, scale2: Tensor, bias2: Tensor,
    geom: List[int], num_heads: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_launcher().stripe_forward(qkv, anchor, _stripe_geom(geom), num_heads, scale1, bias1, scale2, bias2))


@stripe_fwd.register_fake
def _stripe_fwd_fake(qkv, anchor, scale1, bias1, scale2, bias2, geom, num_heads):
    g = _stripe_geom(geom)
    B, L, C3 = qkv.shape
    bwh, D = _stats_shapes(qkv, num_heads, g.num_windows)
    f32 = dict(dtype=torch.float32)
    return (
        qkv.new_empty((B, L, C3 // 3)),
        qkv.new_empty((bwh, g.n2, D), **f32),
        qkv.new_empty((bwh, g.n2, 2), **f32),
        qkv.new_empty((bwh, g.n1, 2), **f32),
    )


@torch.library.custom_op("grl_kernels::triton_stripe_bwd", mutates_args=())
def stripe_bwd(
    grad: Tensor, qkv: Tensor, anchor: Tensor, scale1: Tensor, bias1: Tensor, scale2: Tensor, bias2: Tensor,
    out: Tensor, z: Tensor, stat1: Tensor, stat2: Tensor, geom: List[int], num_heads: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_launcher().stripe_backward(
        grad, qkv, anchor, _stripe_geom(geom), num_heads, scale1, bias1, scale2, bias2, out, z, stat1, stat2,
    ))


@stripe_bwd.register_fake
def _stripe_bwd_fake(grad, qkv, anchor, scale1, bias1, scale2, bias2, out, z, stat1, stat2, geom, num_heads):
    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(anchor),
        torch.empty_like(scale1), torch.empty_like(bias1), torch.empty_like(scale2), torch.empty_like(bias2),
    )


def _stripe_setup(ctx, inputs, output):
    qkv, anchor, scale1, bias1, scale2, bias2, geom, num_heads = inputs
    out, z, stat1, stat2 = output
    ctx.mark_non_differentiable(z, stat1, stat2)
    ctx.save_for_backward(qkv, anchor, scale1, bias1, scale2, bias2, out, z, stat1, stat2)
    ctx.geom, ctx.num_heads = list(geom), num_heads


def _stripe_backward(ctx, grad_out, *_unused):
    qkv, anchor, scale1, bias1, scale2, bias2, out, z, stat1, stat2 = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = stripe_bwd(grad_out, qkv, anchor, scale1, bias1, scale2, bias2, out, z, stat1, stat2, ctx.geom, ctx.num_heads)
    return (*grads, None, None)


stripe_fwd.register_autograd(_stripe_backward, setup_context=_stripe_setup)


# ---------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------
@torch.library.custom_op("grl_kernels::triton_window_fwd", mutates_args=())
def window_fwd(qkv: Tensor, scale: Tensor, bias: Tensor, geom: List[int], num_heads: int) -> Tuple[Tensor, Tensor]:
    return tuple(_launcher().window_forward(qkv, _window_geom(geom), num_heads, scale, bias))


@window_fwd.register_fake
def _window_fwd_fake(qkv, scale, bias, geom, num_heads):
    g = _window_geom(geom)
    B, L, C3 = qkv.shape
    bwh, _ = _stats_shapes(qkv, num_heads, g.num_windows)
    return qkv.new_empty((B, L, C3 // 3)), qkv.new_empty((bwh, g.n, 2), dtype=torch.float32)


@torch.library.custom_op("grl_kernels::triton_window_bwd", mutates_args=())
def window_bwd(
    grad: Tensor, qkv: Tensor, scale: Tensor, bias: Tensor, out: Tensor, stat: Tensor, geom: List[int], num_heads: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_launcher().window_backward(grad, qkv, _window_geom(geom), num_heads, scale, bias, out, stat))


@window_bwd.register_fake
def _window_bwd_fake(grad, qkv, scale, bias, out, stat, geom, num_heads):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(bias))


def _window_setup(ctx, inputs, output):
    qkv, scale, bias, geom, num_heads = inputs
    out, stat = output
    ctx.mark_non_differentiable(stat)
    ctx.save_for_backward(qkv, scale, bias, out, stat)
    ctx.geom, ctx.num_heads = list(geom), num_heads


def _window_backward(ctx, grad_out, *_unused):
    qkv, scale, bias, out, stat = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = window_bwd(grad_out, qkv, scale, bias, out, stat, ctx.geom, ctx.num_heads)
    return (*grads, None, None)


window_fwd.register_autograd(_window_backward, setup_context=_window_setup)


# ---------------------------------------------------------------------------
# backend entry points (the signatures of grl_kernels.reference.attention)
# ---------------------------------------------------------------------------
def stripe_attention(qkv, anchor, geom: StripeGeometry, num_heads: int, scale1, bias1, scale2, bias2) -> Tensor:
    """Anchored stripe attention on the Triton kernels: (B, H*W, 3C), (B, H/f, W/f, C) -> (B, H*W, C)."""
    return stripe_fwd(qkv, anchor, scale1, bias1, scale2, bias2, stripe_geom_list(geom), num_heads)[0]


def window_attention(qkv, geom: WindowGeometry, num_heads: int, scale, bias) -> Tensor:
    """Window attention on the Triton kernels: (B, H*W, 3C) -> (B, H*W, C)."""
    return window_fwd(qkv, scale, bias, window_geom_list(geom), num_heads)[0]
