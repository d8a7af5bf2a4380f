"""The "triton" backend: fused Triton kernels on CUDA (see grl_kernels/backends/triton, docs/triton.md).

Chosen by "auto" for float16/bfloat16/float32 CUDA tensors when triton is importable and
the GPU is sm80 or newer. Head dims above 128 are outside the kernels: those calls run the
reference path with a warning. Under TRITON_INTERPRET=1 it also takes CPU tensors (Triton's
interpreter; slow, for testing).
"""
import warnings

import torch

from ..reference import stripe_attention_reference, window_attention_reference
from .registry import Backend, register_backend

try:  # registers the custom ops; imports no triton (that happens on the first call)
    from . import triton as _triton

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - e.g. a torch without torch.library.custom_op
    _triton, _IMPORT_ERROR = None, f"{type(exc).__name__}: {exc}"


def _availability():
    if _triton is None:
        return False, f"grl_kernels.backends.triton failed to import ({_IMPORT_ERROR})"
    return _triton.availability()


def _too_wide(qkv: torch.Tensor, num_heads: int) -> bool:
    d = qkv.shape[-1] // 3 // num_heads
    if d <= _triton.MAX_HEAD_DIM:
        return False
    warnings.warn(
        f"triton backend: head dim {d} > {_triton.MAX_HEAD_DIM} is not handled by the kernels; "
        "running the reference path", RuntimeWarning, stacklevel=3,
    )
    return True


def _stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
    if _too_wide(qkv, num_heads):
        return stripe_attention_reference(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)
    return _triton.stripe_attention(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)


def _window(qkv, geom, num_heads, scale, bias):
    if _too_wide(qkv, num_heads):
        return window_attention_reference(qkv, geom, num_heads, scale, bias)
    return _triton.window_attention(qkv, geom, num_heads, scale, bias)


register_backend(
    Backend(
        name="triton",
        stripe=_stripe,
        window=_window,
        devices=frozenset({"cuda", "cpu"} if _triton is not None and _triton.interpreting() else {"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        priority=10,
        check_available=_availability,
        description="fused Triton kernels (CUDA sm80+): in-place partition/shift, no attention maps in memory",
    )
)
