"""Baselines the fused backends are compared with, all with the backend interface.

- ``reference``: the pure-PyTorch ground truth (materializes windows and attention maps).
- ``compile``: ``torch.compile`` of the reference, one compiled function per geometry.
- ``flex``: the same math composed from FlexAttention: windows become the batch
  dimension (tokens gathered with the geometry's permutation), q/k/anchors are
  L2-normalized and made contiguous up front (torch 2.13 on CPU gave wrong values for
  normalized strided views inside the compiled graph), and a ``score_mod`` adds
  tau[h] * score + B[h, i, j] + M[window, i, j] with scale 1. Stripe attention is two
  flex calls (anchors -> window, then tokens -> anchors). On CPU FlexAttention is
  forward only. (SDPA has no fused path for an additive bias at head dim 30, so it is
  not a baseline.)

Each baseline is checked against the reference before it is timed.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..geometry import StripeGeometry, WindowGeometry
from ..reference import attention as R
from ..reference import stripe_attention_reference, window_attention_reference


class Baseline:
    """An object with the backend interface (``stripe``/``window``) and a name."""

    name = "baseline"
    forward_only_on_cpu = False

    def stripe(self, qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
        raise NotImplementedError

    def window(self, qkv, geom, num_heads, scale, bias):
        raise NotImplementedError

    def supports_backward(self, device) -> bool:
        return not (self.forward_only_on_cpu and torch.device(device).type == "cpu")


class ReferenceBaseline(Baseline):
    name = "reference"

    def stripe(self, *args):
        return stripe_attention_reference(*args)

    def window(self, *args):
        return window_attention_reference(*args)


def _stripe_tables(qkv, anchor, geom, num_heads, s1, b1, s2, b2, idx_a2w, idx_w2a, m_a2w, m_w2a):
    """The reference stripe math with the index/mask tables passed in (so a compiled graph
    takes them as inputs instead of rebuilding them on every call)."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    x = R._partition(qkv.reshape(B, geom.H, geom.W, C3), geom.sh, geom.sw, geom.shift_h, geom.shift_w)
    anc = R._partition(anchor, geom.ah, geom.aw, geom.anchor_shift_h, geom.anchor_shift_w)
    B_, n1, _ = x.shape
    x = x.reshape(B_, n1, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    anc = anc.reshape(B_, geom.n2, num_heads, d).permute(0, 2, 1, 3)
    z = R._attend(anc, x[1], x[2], s1, b1, idx_a2w, m_a2w, geom.num_windows)
    y = R._attend(x[0], anc, z, s2, b2, idx_w2a, m_w2a, geom.num_windows)
    y = y.transpose(1, 2).reshape(B_, n1, C)
    return R._reverse(y, B, geom.H, geom.W, geom.sh, geom.sw, geom.shift_h, geom.shift_w)


def _window_tables(qkv, geom, num_heads, scale, bias, index, mask):
    B, L, C3 = qkv.shape
    C = C3 // 3
    d = C // num_heads
    x = R._partition(qkv.reshape(B, geom.H, geom.W, C3), geom.ws, geom.ws, geom.shift, geom.shift)
    B_, n, _ = x.shape
    x = x.reshape(B_, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    y = R._attend(x[0], x[1], x[2], scale, bias, index, mask, geom.num_windows)
    y = y.transpose(1, 2).reshape(B_, n, C)
    return R._reverse(y, B, geom.H, geom.W, geom.ws, geom.ws, geom.shift, geom.shift)


class CompiledReference(Baseline):
    """torch.compile of the reference math, one compiled function per geometry; the
    index and mask tables are graph inputs (built once, outside the graph)."""

    name = "compile"

    def __init__(self, **compile_kwargs):
        self._cache: Dict[tuple, Callable] = {}
        self._kwargs = compile_kwargs

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = torch.compile(fn, **self._kwargs)
        return self._cache[key]

    def stripe(self, qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
        dev = qkv.device
        tables = (geom.index_a2w(dev), geom.index_w2a(dev), geom.mask_a2w(dev), geom.mask_w2a(dev))

        def fn(qkv, anchor, s1, b1, s2, b2, *tables):
            return _stripe_tables(qkv, anchor, geom, num_heads, s1, b1, s2, b2, *tables)

        return self._get(("s", geom, num_heads), fn)(qkv, anchor, scale1, bias1, scale2, bias2, *tables)

    def window(self, qkv, geom, num_heads, scale, bias):
        dev = qkv.device

        def fn(qkv, s, b, index, mask):
            return _window_tables(qkv, geom, num_heads, s, b, index, mask)

        return self._get(("w", geom, num_heads), fn)(qkv, scale, bias, geom.index(dev), geom.mask(dev))


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled flex_attention serves every geometry of a run (a recompile per shape);
        # past dynamo's default limit of 8 it would silently run unfused, so raise the limit
        cfg = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, limit):
                setattr(cfg, limit, max(getattr(cfg, limit), 256))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _gather_windows(x: torch.Tensor, perm: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """(B, L, C) image tokens -> (B * windows, heads, n, d) in partition order, contiguous."""
    B, L, C = x.shape
    d = C // heads
    x = x.index_select(1, perm).reshape(B, -1, n, heads, d)
    return x.permute(0, 1, 3, 2, 4).reshape(-1, heads, n, d).contiguous()


def _scatter_windows(y: torch.Tensor, perm: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Inverse of :func:`_gather_windows`: (B * windows, heads, n, d) -> (B, L, C)."""
    _, heads, n, d = y.shape
    y = y.reshape(B, -1, heads, n, d).permute(0, 1, 3, 2, 4).reshape(B, L, heads * d)
    out = torch.empty_like(y)
    out[:, perm] = y
    return out


def _dense_bias(table: torch.Tensor, index: torch.Tensor, dtype) -> torch.Tensor:
    """(R, nh) table and (n1, n2) index -> (nh, n1, n2) bias."""
    n1, n2 = index.shape
    return table[index.reshape(-1)].reshape(n1, n2, -1).permute(2, 0, 1).to(dtype).contiguous()


def _stage(q, k, v, tau, bias, mask, num_windows):
    """One flex call: softmax(tau[h] * q.k + bias[h] + mask[b % windows]) v (q, k normalized)."""
    tau = tau.to(q.dtype)
    if mask is not None:
        mask = mask.to(q.dtype)

        def score_mod(score, b, h, i, j):
            return score * tau[h] + bias[h, i, j] + mask[b % num_windows, i, j]
    else:
        def score_mod(score, b, h, i, j):
            return score * tau[h] + bias[h, i, j]

    return _flex()(q, k, v, score_mod=score_mod, scale=1.0)


class FlexComposition(Baseline):
    name = "flex"
    forward_only_on_cpu = True

    def stripe(self, qkv, anchor, geom: StripeGeometry, num_heads, scale1, bias1, scale2, bias2):
        B, L, C3 = qkv.shape
        C = C3 // 3
        dev, dt = qkv.device, qkv.dtype
        tperm, aperm = geom.token_permutation(dev), geom.anchor_permutation(dev)
        q = _gather_windows(qkv[..., :C], tperm, geom.n1, num_heads)
        k = _gather_windows(qkv[..., C:2 * C], tperm, geom.n1, num_heads)
        v = _gather_windows(qkv[..., 2 * C:], tperm, geom.n1, num_heads)
        a = _gather_windows(anchor.reshape(B, -1, C), aperm, geom.n2, num_heads)
        qn, kn, an = (F.normalize(t, dim=-1).contiguous() for t in (q, k, a))
        b1 = _dense_bias(bias1, geom.index_a2w(dev), dt)
        b2 = _dense_bias(bias2, geom.index_w2a(dev), dt)
        z = _stage(an, kn, v, scale1, b1, geom.mask_a2w(dev), geom.num_windows)
        y = _stage(qn, an, z.contiguous(), scale2, b2, geom.mask_w2a(dev), geom.num_windows)
        return _scatter_windows(y, tperm, B, L)

    def window(self, qkv, geom: WindowGeometry, num_heads, scale, bias):
        B, L, C3 = qkv.shape
        C = C3 // 3
        dev, dt = qkv.device, qkv.dtype
        perm = geom.token_permutation(dev)
        q = _gather_windows(qkv[..., :C], perm, geom.n, num_heads)
        k = _gather_windows(qkv[..., C:2 * C], perm, geom.n, num_heads)
        v = _gather_windows(qkv[..., 2 * C:], perm, geom.n, num_heads)
        qn, kn = (F.normalize(t, dim=-1).contiguous() for t in (q, k))
        y = _stage(qn, kn, v, scale, _dense_bias(bias, geom.index(dev), dt), geom.mask(dev), geom.num_windows)
        return _scatter_windows(y, perm, B, L)


def flex_available() -> Optional[str]:
    """None when FlexAttention can be imported, else the reason."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def make_baselines(names=("reference", "compile", "flex")):
    table = {"reference": ReferenceBaseline, "compile": CompiledReference, "flex": FlexComposition}
    return [table[n]() for n in names]
