"""Drop-in modules with the published parameter names.

``AnchoredStripeAttention`` has ``attn_transform1`` / ``attn_transform2`` and
``WindowAttention`` has ``attn_transform``, each with ``logit_scale`` (nh, 1, 1)
and ``cpb_mlp`` = Linear(2, 512) -> ReLU -> Linear(512, nh, bias=False), so a
published state_dict loads. Geometry is computed from the call's ``x_size`` and
cached; the coordinate tables are not stored as buffers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import validation as V
from .functional import logit_scale_to_tau, stripe_attention, window_attention
from .geometry import stripe_geometry, window_geometry


def _to_2tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


class AffineTransform(nn.Module):
    """Per-head logit scale and continuous position bias MLP of one attention stage."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))

    def tau(self) -> torch.Tensor:
        """(nh,) tau = exp(min(lambda, ln 100))."""
        return logit_scale_to_tau(self.logit_scale)

    def bias_table(self, coords: torch.Tensor) -> torch.Tensor:
        """(R, nh) table 16 * sigmoid(cpb_mlp(coords))."""
        w = self.cpb_mlp[0].weight
        return 16 * torch.sigmoid(self.cpb_mlp(coords.to(device=w.device, dtype=w.dtype)))


class _BackendMixin:
    def _check_backend_arg(self, backend):
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None or a backend name, got {type(backend).__name__}")
        return backend


class AnchoredStripeAttention(nn.Module, _BackendMixin):
    """GRL anchored stripe attention: ``module(qkv, anchor, x_size) -> (B, H*W, C)``.

    Arguments follow the published ``AnchorStripeAttention``; ``stripe_size`` and
    ``stripe_groups`` are the block's own (already reversed for vertical stripes).
    """

    def __init__(
        self,
        input_resolution,
        stripe_size,
        stripe_groups,
        stripe_shift,
        num_heads,
        attn_drop=0.0,
        pretrained_stripe_size=(0, 0),
        anchor_window_down_factor=1,
        backend: Optional[str] = None,
        args=None,
    ):
        super().__init__()
        self.input_resolution = _to_2tuple(input_resolution)
        self.stripe_size, self.stripe_groups = V.check_stripe_config(stripe_size, stripe_groups)
        self.stripe_shift = bool(stripe_shift)
        self.num_heads = V.check_num_heads(num_heads)
        if not 0.0 <= float(attn_drop) < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        self.attn_drop = float(attn_drop)
        self.pretrained_stripe_size = _to_2tuple(pretrained_stripe_size)
        if isinstance(anchor_window_down_factor, bool) or not isinstance(anchor_window_down_factor, int) or anchor_window_down_factor < 1:
            raise ValueError(f"anchor_window_down_factor must be a positive int, got {anchor_window_down_factor!r}")
        self.anchor_window_down_factor = anchor_window_down_factor
        self.backend = self._check_backend_arg(backend)
        if getattr(args, "euclidean_dist", False):
            raise ValueError("euclidean_dist=True (an ablation of the paper) is not supported; GRL uses cosine attention")
        self.attn_transform1 = AffineTransform(num_heads)
        self.attn_transform2 = AffineTransform(num_heads)

    def geometry(self, x_size):
        return stripe_geometry(
            V.check_x_size(x_size), self.stripe_size, self.stripe_groups, self.stripe_shift,
            self.anchor_window_down_factor, self.pretrained_stripe_size,
        )

    def forward(self, qkv: torch.Tensor, anchor: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        if self.attn_drop > 0 and self.training:
            raise NotImplementedError(
                f"attn_drop = {self.attn_drop} > 0 in training is not supported by grl_kernels; expected attn_drop = 0 "
                "(every published configuration) or eval mode"
            )
        geom = self.geometry(x_size)
        table = geom.coords_table(qkv.device)
        return stripe_attention(
            qkv, anchor, geom, self.num_heads,
            self.attn_transform1.tau(), self.attn_transform1.bias_table(table),
            self.attn_transform2.tau(), self.attn_transform2.bias_table(table),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"stripe_size={list(self.stripe_size)}, stripe_groups={list(self.stripe_groups)}, "
            f"stripe_shift={self.stripe_shift}, num_heads={self.num_heads}, "
            f"anchor_window_down_factor={self.anchor_window_down_factor}, backend={self.backend}"
        )


class WindowAttention(nn.Module, _BackendMixin):
    """GRL (shifted) window attention: ``module(qkv, x_size) -> (B, H*W, C)``."""

    def __init__(
        self,
        input_resolution,
        window_size,
        num_heads,
        window_shift=False,
        attn_drop=0.0,
        pretrained_window_size=(0, 0),
        backend: Optional[str] = None,
        args=None,
    ):
        super().__init__()
        self.input_resolution = _to_2tuple(input_resolution)
        ws = _to_2tuple(window_size)
        if ws[0] != ws[1] or isinstance(ws[0], bool) or not isinstance(ws[0], int) or ws[0] < 1:
            raise ValueError(f"window_size must be a positive int or a square pair, got {window_size!r}")
        self.window_size = ws
        self.num_heads = V.check_num_heads(num_heads)
        self.window_shift = bool(window_shift)
        self.shift_size = ws[0] // 2 if window_shift else 0
        if not 0.0 <= float(attn_drop) < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        self.attn_drop = float(attn_drop)
        self.pretrained_window_size = _to_2tuple(pretrained_window_size)
        self.backend = self._check_backend_arg(backend)
        if getattr(args, "euclidean_dist", False):
            raise ValueError("euclidean_dist=True (an ablation of the paper) is not supported; GRL uses cosine attention")
        self.attn_transform = AffineTransform(num_heads)

    def geometry(self, x_size):
        return window_geometry(V.check_x_size(x_size), self.window_size, self.window_shift, self.pretrained_window_size)

    def forward(self, qkv: torch.Tensor, x_size: Sequence[int]) -> torch.Tensor:
        if self.attn_drop > 0 and self.training:
            raise NotImplementedError(
                f"attn_drop = {self.attn_drop} > 0 in training is not supported by grl_kernels; expected attn_drop = 0 "
                "(every published configuration) or eval mode"
            )
        geom = self.geometry(x_size)
        table = geom.coords_table(qkv.device)
        return window_attention(
            qkv, geom, self.num_heads, self.attn_transform.tau(), self.attn_transform.bias_table(table),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"window_size={self.window_size[0]}, window_shift={self.window_shift}, num_heads={self.num_heads}, backend={self.backend}"
