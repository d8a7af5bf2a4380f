"""Functional API: validated entry points that build the geometry and dispatch to a backend."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import validation as V
from .backends import resolve_backend
from .geometry import StripeGeometry, WindowGeometry, stripe_geometry, window_geometry

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # tau = exp(min(lambda, ln 100))


def logit_scale_to_tau(logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-head tau = exp(min(lambda, ln 100)) as a (nh,) tensor (differentiable)."""
    return torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().reshape(-1)


def stripe_attention(
    qkv: torch.Tensor,
    anchor: torch.Tensor,
    geom: StripeGeometry,
    num_heads: int,
    scale1: torch.Tensor,
    bias1: torch.Tensor,
    scale2: torch.Tensor,
    bias2: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Low-level anchored stripe attention for a prepared geometry.

    ``scale*``: tau per head (nh,); ``bias*``: 16 * sigmoid(T) tables (R, nh).
    Validates shapes against ``geom`` and dispatches.
    """
    V.check_geometry(geom, "geom", StripeGeometry, "stripe_geometry")
    V.check_num_heads(num_heads)
    B, C = V.check_qkv(qkv, (geom.H, geom.W), num_heads)
    V.check_anchor(anchor, qkv, B, C, (geom.Ha, geom.Wa), geom.down)
    for name, t in (("scale1", scale1), ("scale2", scale2)):
        V.check_param(t, name, (num_heads,), qkv)
    for name, t in (("bias1", bias1), ("bias2", bias2)):
        V.check_param(t, name, (geom.table_rows, num_heads), qkv)
    b = resolve_backend(backend, qkv.device, qkv.dtype)
    return b.stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)


def window_attention(
    qkv: torch.Tensor,
    geom: WindowGeometry,
    num_heads: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Low-level window attention for a prepared geometry (see :func:`stripe_attention`)."""
    V.check_geometry(geom, "geom", WindowGeometry, "window_geometry")
    V.check_num_heads(num_heads)
    V.check_qkv(qkv, (geom.H, geom.W), num_heads)
    V.check_param(scale, "scale", (num_heads,), qkv)
    V.check_param(bias, "bias", (geom.table_rows, num_heads), qkv)
    b = resolve_backend(backend, qkv.device, qkv.dtype)
    return b.window(qkv, geom, num_heads, scale, bias)


def anchored_stripe_attention(
    qkv: torch.Tensor,
    anchor: torch.Tensor,
    x_size: Sequence[int],
    stripe_size,
    stripe_groups,
    stripe_shift: bool,
    num_heads: int,
    logit_scale1: torch.Tensor,
    bias_table1: torch.Tensor,
    logit_scale2: torch.Tensor,
    bias_table2: torch.Tensor,
    anchor_window_down_factor: int = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """GRL anchored stripe attention on the image layout.

    qkv: (B, H*W, 3C) laid out [q | k | v] (a strided channel slice is fine);
    anchor: (B, H/f, W/f, C); logit_scale*: the learned lambda (nh,) or (nh, 1, 1);
    bias_table*: 16 * sigmoid(cpb_mlp(coords_table)), (R, nh) for the geometry.
    Returns (B, H*W, C).
    """
    x_size = V.check_x_size(x_size)
    ss, sg = V.check_stripe_config(stripe_size, stripe_groups)
    geom = stripe_geometry(x_size, ss, sg, bool(stripe_shift), anchor_window_down_factor)
    V.check_num_heads(num_heads)
    for name, t in (("logit_scale1", logit_scale1), ("logit_scale2", logit_scale2)):
        V.check_logit_scale(t, name, num_heads)
    for name, t in (("bias_table1", bias_table1), ("bias_table2", bias_table2)):
        if isinstance(t, torch.Tensor) and tuple(t.shape) != (geom.table_rows, num_heads):
            raise ValueError(
                f"{name} must have shape (R, num_heads) = {(geom.table_rows, num_heads)} for this stripe geometry "
                f"(R = (sh + ah - 1) * (sw + aw - 1)), got {tuple(t.shape)}"
            )
    return stripe_attention(
        qkv, anchor, geom, num_heads, logit_scale_to_tau(logit_scale1), bias_table1,
        logit_scale_to_tau(logit_scale2), bias_table2, backend,
    )


def grl_window_attention(
    qkv: torch.Tensor,
    x_size: Sequence[int],
    window_size: int,
    window_shift: bool,
    num_heads: int,
    logit_scale: torch.Tensor,
    bias_table: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """GRL window attention on the image layout: qkv (B, H*W, 3C) -> (B, H*W, C)."""
    x_size = V.check_x_size(x_size)
    geom = window_geometry(x_size, window_size, bool(window_shift))
    V.check_num_heads(num_heads)
    V.check_logit_scale(logit_scale, "logit_scale", num_heads)
    if isinstance(bias_table, torch.Tensor) and tuple(bias_table.shape) != (geom.table_rows, num_heads):
        raise ValueError(
            f"bias_table must have shape (R, num_heads) = {(geom.table_rows, num_heads)} for window_size "
            f"{geom.ws} (R = (2 * window_size - 1)^2), got {tuple(bias_table.shape)}"
        )
    return window_attention(qkv, geom, num_heads, logit_scale_to_tau(logit_scale), bias_table, backend)
