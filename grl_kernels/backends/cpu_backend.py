"""The "cpu" backend: fused C++ kernels (csrc/cpu), OpenMP threads, float32/bfloat16/float64.

Reads qkv/anchor in place (any strides), never stores an N1 x N2 attention map,
and is differentiable w.r.t. qkv, anchor, scales and bias tables. The kernels run as
torch custom ops (``torch.ops.grl_kernels.*``, see extension/ops.py), so torch.compile
traces through them.
"""
import torch

from . import extension
from .extension import ops
from .registry import Backend, register_backend

DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float64})


def _check(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"the 'cpu' backend needs CPU tensors; {name} is on {t.device}")
    if t.dtype not in DTYPES:
        raise TypeError(f"the 'cpu' backend takes float32, bfloat16 or float64 {name}, got {t.dtype}")


def stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
    _check("qkv", qkv)
    _check("anchor", anchor)
    if anchor.dtype != qkv.dtype:
        raise TypeError(f"anchor has dtype {anchor.dtype} but qkv has {qkv.dtype}; expected the same dtype")
    return ops.stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2)


def window(qkv, geom, num_heads, scale, bias):
    _check("qkv", qkv)
    return ops.window(qkv, geom, num_heads, scale, bias)


DESCRIPTION = "fused C++ CPU kernels (OpenMP, streaming softmax, no attention maps)"


def _available():
    """Builds/loads the extension; once loaded, the description names the instruction-set
    path chosen at run time (``grl-kernels info`` shows it)."""
    ok, why = extension.availability("cpu")
    if ok:
        BACKEND.description = f"{DESCRIPTION}; path {ops.cpu_path()}"
    return ok, why


BACKEND = Backend(
    name="cpu",
    stripe=stripe,
    window=window,
    devices=frozenset({"cpu"}),
    dtypes=DTYPES,
    priority=20,
    check_available=_available,
    description=DESCRIPTION,
)
register_backend(BACKEND)
