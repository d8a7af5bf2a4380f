"""The "cuda" backend: CUDA C++ kernels (csrc/cuda), float32/float16/bfloat16, head dim <= 64.

SIMT kernels (one thread per attention row, online softmax, float32 accumulation),
reading qkv/anchor in place and never storing an attention map. Differentiable w.r.t.
qkv, anchor, scales and bias tables. Head dims above 64 (no GRL preset uses them) run
the reference path with a warning.

``GRL_KERNELS_EMULATE_CUDA=1`` (read at import) also makes this backend take CPU tensors:
they run the same kernels compiled for the host through the emulation layer (csrc/emu,
docs/cuda.md; built just in time). "auto" never picks it for CPU tensors; name it
explicitly (``backend="cuda"``, ``grl-kernels check --backend cuda``).
"""
import os
import warnings

import torch

from . import extension
from .extension import emulated, ops
from .registry import Backend, register_backend

DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
MAX_HEAD_DIM = 64  # register tiles of the kernels (grl::cuda::kMaxHeadDim)
_warned = [False]
EMULATED = os.environ.get("GRL_KERNELS_EMULATE_CUDA", "0") == "1"
DEVICES = frozenset({"cuda", "cpu"}) if EMULATED else frozenset({"cuda"})


def _check(name: str, t: torch.Tensor) -> None:
    if t.device.type not in DEVICES:
        raise ValueError(f"the 'cuda' backend needs CUDA tensors{' (or CPU tensors, emulated)' if EMULATED else ''}; "
                         f"{name} is on {t.device}")
    if t.dtype not in DTYPES:
        raise TypeError(f"the 'cuda' backend takes float32, float16 or bfloat16 {name}, got {t.dtype}")


def _too_wide(qkv, num_heads) -> bool:
    d = qkv.shape[-1] // 3 // num_heads
    if d <= MAX_HEAD_DIM:
        return False
    if not _warned[0]:
        warnings.warn(f"grl_kernels 'cuda' backend: head dim {d} > {MAX_HEAD_DIM}; using the reference path")
        _warned[0] = True
    return True


def unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with channel stride 1 (any batch / token strides): copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
    _check("qkv", qkv)
    _check("anchor", anchor)
    if anchor.dtype != qkv.dtype:
        raise TypeError(f"anchor has dtype {anchor.dtype} but qkv has {qkv.dtype}; expected the same dtype")
    if _too_wide(qkv, num_heads):
        from ..reference import stripe_attention_reference

        return stripe_attention_reference(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)
    qkv, anchor = unit_channel_stride(qkv), unit_channel_stride(anchor)
    if qkv.device.type == "cpu":
        return emulated.stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)
    return ops.stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)


def window(qkv, geom, num_heads, scale, bias):
    _check("qkv", qkv)
    if _too_wide(qkv, num_heads):
        from ..reference import window_attention_reference

        return window_attention_reference(qkv, geom, num_heads, scale, bias)
    qkv = unit_channel_stride(qkv)
    if qkv.device.type == "cpu":
        return emulated.window(qkv, geom, num_heads, scale, bias)
    return ops.window(qkv, geom, num_heads, scale, bias)


def _available():
    if EMULATED:  # the CPU path must build; a GPU, when there is one, needs its own module too
        ok, why = extension.availability("cuda_emu")
        if not ok or not torch.cuda.is_available():
            return ok, why
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return extension.availability("cuda")


register_backend(
    Backend(
        name="cuda",
        stripe=stripe,
        window=window,
        devices=DEVICES,
        dtypes=DTYPES,
        priority=5,
        check_available=_available,
        description=("CUDA C++ SIMT kernels (one thread per row, online softmax, no attention maps)"
                     + ("; CPU tensors run them through the emulation layer (GRL_KERNELS_EMULATE_CUDA=1)"
                        if EMULATED else "")),
        auto_devices=frozenset({"cuda"}),
        display_name="cuda (emulated on CPU)" if EMULATED else "cuda",
    )
)
