"""Reference anchored-stripe and window attention, written like the published code.

Materializes window copies and the full attention maps (that is what makes it
slow and memory hungry), with the published order of operations so that it
matches the fixtures to float32 rounding.

Backend interface shared by every backend:
    stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2) -> (B, H*W, C)
    window(qkv, geom, num_heads, scale, bias) -> (B, H*W, C)
where ``scale*`` are the per-head logit scales tau = exp(min(lambda, ln 100)), shape
(nh,), and ``bias*`` are the bias tables 16 * sigmoid(cpb_mlp(table)), shape (R, nh).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import StripeGeometry, WindowGeometry


def _partition(x: torch.Tensor, wh: int, ww: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """(B, Hg, Wg, C) -> (B * windows, wh * ww, C) after rolling by (-shift)."""
    B, Hg, Wg, C = x.shape
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
    x = x.reshape(B, Hg // wh, wh, Wg // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def _reverse(x: torch.Tensor, B: int, Hg: int, Wg: int, wh: int, ww: int, shift_h: int, shift_w: int) -> torch.Tensor:
    """Inverse of :func:`_partition`: (B * windows, wh * ww, C) -> (B, Hg * Wg, C)."""
    C = x.shape[-1]
    x = x.reshape(B, Hg // wh, Wg // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hg, Wg, C)
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    return x.reshape(B, Hg * Wg, C)


def _attend(q, k, v, scale, bias_table, index, mask, num_windows):
    """softmax(scale * cos(q, k) + bias[index] + mask) @ v for (B_, nh, N, d) inputs."""
    B_, nh, n1, _ = q.shape
    n2 = k.shape[2]
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * scale.view(nh, 1, 1).to(attn.dtype)
    bias = bias_table[index.reshape(-1)].view(n1, n2, nh).permute(2, 0, 1)
    attn = attn + bias.unsqueeze(0).to(attn.dtype)
    if mask is not None:
        attn = attn.view(B_ // num_windows, num_windows, nh, n1, n2) + mask.unsqueeze(1).unsqueeze(0).to(attn.dtype)
        attn = attn.view(B_, nh, n1, n2)
    attn = torch.softmax(attn, dim=-1)
    return attn @ v


def stripe_attention_reference(
    qkv: torch.Tensor,
    anchor: torch.Tensor,
    geom: StripeGeometry,
    num_heads: int,
    scale1: torch.Tensor,
    bias1: torch.Tensor,
    scale2: torch.Tensor,
    bias2: torch.Tensor,
) -> torch.Tensor:
    """Anchored stripe attention: Z = softmax(S1) v (anchors -> window), Y = softmax(S2) Z."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qkv = _partition(qkv.reshape(B, geom.H, geom.W, C3), geom.sh, geom.sw, geom.shift_h, geom.shift_w)
    anc = _partition(anchor, geom.ah, geom.aw, geom.anchor_shift_h, geom.anchor_shift_w)
    B_, n1, _ = qkv.shape
    n2 = anc.shape[1]
    qkv = qkv.reshape(B_, n1, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    anc = anc.reshape(B_, n2, num_heads, d).permute(0, 2, 1, 3)
    dev = qkv.device
    z = _attend(anc, k, v, scale1, bias1, geom.index_a2w(dev), geom.mask_a2w(dev), geom.num_windows)
    y = _attend(q, anc, z, scale2, bias2, geom.index_w2a(dev), geom.mask_w2a(dev), geom.num_windows)
    y = y.transpose(1, 2).reshape(B_, n1, C)
    return _reverse(y, B, geom.H, geom.W, geom.sh, geom.sw, geom.shift_h, geom.shift_w)


def window_attention_reference(
    qkv: torch.Tensor, geom: WindowGeometry, num_heads: int, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Window attention: Y = softmax(tau cos(q, k) + B + M) v inside each window."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    qkv = _partition(qkv.reshape(B, geom.H, geom.W, C3), geom.ws, geom.ws, geom.shift, geom.shift)
    B_, n, _ = qkv.shape
    qkv = qkv.reshape(B_, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    dev = qkv.device
    y = _attend(q, k, v, scale, bias, geom.index(dev), geom.mask(dev), geom.num_windows)
    y = y.transpose(1, 2).reshape(B_, n, C)
    return _reverse(y, B, geom.H, geom.W, geom.ws, geom.ws, geom.shift, geom.shift)
