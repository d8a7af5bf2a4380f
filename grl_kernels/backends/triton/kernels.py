"""All kernels in one namespace, and whether they run compiled or in Triton's interpreter.

Triton picks the interpreter when triton (triton.language included) is imported with
TRITON_INTERPRET=1 in the environment; it cannot be switched afterwards, because
triton.language's own helpers (tl.sum, tl.max, ...) are decorated at that import.
In an interpreting process the kernels take CPU tensors; otherwise they need CUDA.
"""
from __future__ import annotations

import types

from . import bias_grad, stripe_bwd, stripe_fwd, window_bwd, window_fwd

_MODULES = (stripe_fwd, stripe_bwd, window_fwd, window_bwd, bias_grad)


def _collect() -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    for mod in _MODULES:
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if name.startswith(("stripe_", "window_", "bias_")) and getattr(fn, "__module__", None) == mod.__name__:
                setattr(ns, name, obj)
    return ns


KERNELS = _collect()
INTERPRETED = type(KERNELS.window_fwd).__name__ == "InterpretedFunction"
