"""Input checks shared by the functional API and the modules.

Every failure is a TypeError/ValueError whose message names the argument and
what was expected; nothing reaches a kernel unchecked.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_x_size(x_size) -> Tuple[int, int]:
    if not isinstance(x_size, (tuple, list, torch.Size)) or len(x_size) != 2:
        raise TypeError(f"x_size must be a pair (H, W) of ints, got {x_size!r}")
    out = []
    for v in x_size:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TypeError(f"x_size must be a pair (H, W) of positive ints (H >= 1, W >= 1), got {tuple(x_size)!r}")
        out.append(v)
    return out[0], out[1]


def check_qkv(qkv, x_size: Tuple[int, int], num_heads: int) -> Tuple[int, int]:
    """Returns (B, C) of the branch; qkv must be (B, H*W, 3C) with C divisible by heads."""
    check_tensor(qkv, "qkv", 3, "(B, H*W, 3*C)")
    B, L, C3 = qkv.shape
    H, W = x_size
    if L != H * W:
        raise ValueError(f"qkv has {L} tokens but x_size {(H, W)} needs H*W = {H * W}")
    if C3 % 3:
        raise ValueError(f"qkv last dimension must be 3*C ([q | k | v]), got {C3} which is not divisible by 3")
    C = C3 // 3
    if C == 0:
        raise ValueError(f"qkv last dimension must be 3*C with C >= num_heads = {num_heads} channels per branch, got 0")
    if C % num_heads:
        raise ValueError(f"channels per branch C = {C} must be divisible by num_heads = {num_heads}")
    if B == 0:
        raise ValueError(
            f"qkv has batch size 0 (shape {tuple(qkv.shape)}); expected B >= 1: empty batches are refused on every backend"
        )
    return B, C


def check_anchor(anchor, qkv: torch.Tensor, B: int, C: int, grid: Tuple[int, int], down: int) -> None:
    check_tensor(anchor, "anchor", 4, "(B, H/f, W/f, C)")
    expected = (B, grid[0], grid[1], C)
    if tuple(anchor.shape) != expected:
        raise ValueError(
            f"anchor must have shape (B, H/f, W/f, C) = {expected} for anchor_window_down_factor f = {down}, "
            f"got {tuple(anchor.shape)}"
        )
    check_same(anchor, "anchor", qkv, "qkv")


def check_same(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")


def check_param(t, name: str, shape: Sequence[int], ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but qkv is on {ref.device}; expected the same device")


def check_logit_scale(t, name: str, num_heads: int) -> None:
    """A learned logit scale lambda: (nh,) or the published (nh, 1, 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({num_heads},) or ({num_heads}, 1, 1), got {type(t).__name__}")
    if tuple(t.shape) not in ((num_heads,), (num_heads, 1, 1)):
        raise ValueError(
            f"{name} must have shape ({num_heads},) or ({num_heads}, 1, 1) (one value per head), got {tuple(t.shape)}"
        )


def check_geometry(geom, name: str, cls, maker: str) -> None:
    if not isinstance(geom, cls):
        raise TypeError(f"{name} must be a {cls.__name__} (from grl_kernels.geometry.{maker}), got {type(geom).__name__}")


def check_num_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    return num_heads


def check_stripe_config(stripe_size, stripe_groups) -> Tuple[tuple, tuple]:
    def pair(v, name):
        if v is None or isinstance(v, int):
            return (v, v)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            for e in v:
                if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
                    raise ValueError(f"{name} entries must be positive ints or None, got {list(v)}")
            return tuple(v)
        raise TypeError(f"{name} must be a pair (height, width) of ints or None, got {v!r}")

    ss = pair(stripe_size, "stripe_size")
    sg = pair(stripe_groups, "stripe_groups") if stripe_groups is not None else (None, None)
    for s, g in zip(ss, sg):
        if s is None and g is None:
            raise ValueError(
                f"stripe_size {list(ss)} and stripe_groups {list(sg)}: each dimension needs a size or a group count"
            )
    return ss, sg


def optional_int(v, name: str) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or None, got {v!r}")
    return v
