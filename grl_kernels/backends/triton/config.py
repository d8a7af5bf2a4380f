"""Settings of the Triton backend that do not need triton itself: head-dim limits and the
(compatibility) deterministic switch."""
from __future__ import annotations

from typing import Optional


MAX_HEAD_DIM = 128
ENV_DETERMINISTIC = "GRL_KERNELS_DETERMINISTIC"  # accepted, no effect: always deterministic
_deterministic: Optional[bool] = None  # the last set_deterministic request (no effect)


def head_pad(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16); masks cover the padding."""
    d = int(d)
    if not 1 <= d <= MAX_HEAD_DIM:
        raise NotImplementedError(f"the triton backend handles head dims 1..{MAX_HEAD_DIM}, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def set_deterministic(flag: Optional[bool]) -> None:
    """Kept for compatibility: the backward is deterministic in every mode.

    The bias-table gradients are per-tile partials reduced in a fixed order (bias_grad.py), no
    atomics, so every output has the same bits on every run on the same device and launch
    configuration, whatever this switch (True, False, or None for the default) or
    GRL_KERNELS_DETERMINISTIC / torch.use_deterministic_algorithms say.
    """
    global _deterministic
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {flag!r}")
    _deterministic = flag


def is_deterministic() -> bool:
    """True: the forward and every gradient are bit-reproducible (no atomics anywhere)."""
    return True
