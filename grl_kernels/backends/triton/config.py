"""Settings of the Triton backend that do not need triton itself: head-dim limits and the
deterministic switch."""
from __future__ import annotations

import os
from typing import Optional

import torch

MAX_HEAD_DIM = 128
ENV_DETERMINISTIC = "GRL_KERNELS_DETERMINISTIC"
_deterministic: Optional[bool] = None  # None: follow the environment / torch


def head_pad(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16); masks cover the padding."""
    d = int(d)
    if not 1 <= d <= MAX_HEAD_DIM:
        raise NotImplementedError(f"the triton backend handles head dims 1..{MAX_HEAD_DIM}, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def set_deterministic(flag: Optional[bool]) -> None:
    """Choose how the backward accumulates the bias-table gradients.

    True: int64 fixed-point atomics, the same bits on every run (slightly slower, and the
    backward makes one extra pass over dY / v to bound the sums). False: float32 atomics
    (the default; last-bit differences between runs). None: back to the default, which is
    deterministic when the environment variable GRL_KERNELS_DETERMINISTIC=1 is set or
    torch.use_deterministic_algorithms(True) is on. Every other gradient, and the forward,
    is deterministic in both modes.
    """
    global _deterministic
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {flag!r}")
    _deterministic = flag


def is_deterministic() -> bool:
    if _deterministic is not None:
        return _deterministic
    env = os.environ.get(ENV_DETERMINISTIC, "").strip().lower()
    return env in ("1", "true", "yes", "on") or torch.are_deterministic_algorithms_enabled()
