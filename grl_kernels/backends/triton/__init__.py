"""Fused Triton kernels for GRL's anchored stripe attention and window attention.

Public names:
- :func:`stripe_attention`, :func:`window_attention`: the backend functions (signatures of
  :mod:`grl_kernels.reference.attention`), differentiable, torch.compile-able (custom ops
  ``torch.ops.grl_kernels.triton_*``);
- :func:`set_deterministic`, :func:`is_deterministic`: kept for compatibility (every result is
  bit-reproducible now);
- :func:`availability`: (available, reason), including a first-use probe that compiles and runs
  one kernel on the current device.

Importing this package does not import triton; the kernels are loaded on the first call.
See docs/triton.md.
"""
from __future__ import annotations

import os
from typing import Tuple

from .autograd import stripe_attention, window_attention
from .config import MAX_HEAD_DIM, is_deterministic, set_deterministic

__all__ = ["stripe_attention", "window_attention", "set_deterministic", "is_deterministic", "availability",
           "interpreting", "MAX_HEAD_DIM"]


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability() -> Tuple[bool, str]:
    """(available, reason): triton importable, a CUDA device of compute capability >= 8.0 on
    which Triton compiles, loads and runs a probe kernel (probe.py), or Triton's interpreter
    (then CPU tensors are accepted)."""
    try:
        import triton  # noqa: F401  (availability probe)
    except Exception as exc:  # ImportError, or a broken installation
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreting():
        return True, ""
    import torch

    if getattr(torch.version, "hip", None):
        return False, "ROCm is not supported by these kernels (only CUDA sm80+ is compiled and tested)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"needs a GPU of compute capability >= 8.0 (sm80), found {major}.{minor}"
    from . import probe

    return probe.probe(torch.cuda.current_device())
