"""``grl_kernels.optimize``: one call for the fast inference path of a GRL model."""
from __future__ import annotations

from typing import Optional, Union

import torch

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16, /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(fl in flags for fl in _CPU_BF16_FLAGS)
    except OSError:
        pass
    cap = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return "AMX" in str(cap).upper()


def best_dtype(device) -> torch.dtype:
    """bfloat16 on GPUs that support it and on CPUs with native bfloat16 arithmetic, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32
    return torch.float32


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def optimize(model, *, dtype: Union[str, torch.dtype, None] = "auto", compile: bool = True,
             backend: Optional[str] = "auto"):
    """Prepare a GRL model for fast inference and return it (possibly a compiled wrapper).

    * ``backend``: attention backend of every block ("auto": the fused one for the device and
      dtype). It is resolved here, once, to a concrete name (so later ``use_backend`` scopes do
      not change an optimized model); an unavailable explicit backend is an error here.
    * Convolution weights are stored channels-last (:meth:`GRL.channels_last_convs`).
    * ``dtype``: "auto" (bfloat16 where the device computes it natively, float32 otherwise; see
      :func:`best_dtype`), a torch dtype, or None (keep). The weights are converted in place.
    * ``compile``: ``torch.compile`` of the whole model (one graph, no breaks), returned as a
      :class:`CompiledGRL` (``_orig_mod`` is the model).
    The model is put in eval mode; its in-place inference fast path is used when no grad is needed.
    Inputs of another floating dtype (e.g. float32 images for a bfloat16 model) are converted to the
    model's dtype and the output back to theirs (``model.cast_inputs = True``).
    """
    from .models import GRL

    m = getattr(model, "_orig_mod", model)
    if not isinstance(m, GRL):
        raise TypeError(f"optimize expects a grl_kernels.models.GRL model, got {type(m).__name__}")
    device = _device_of(m)
    if dtype == "auto":
        dtype = best_dtype(device)
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be 'auto', None or a torch dtype, got {dtype!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    m.eval()
    m.cast_inputs = True
    if dtype is not None:
        m.to(dtype)
    m.channels_last_convs()
    # a concrete backend, chosen now: resolving "auto" inside the compiled graph would check the
    # backends' availability there (the first check loads the extension under a lock, which Dynamo
    # cannot trace: one graph break per attention call)
    from .backends.registry import resolve_backend

    param_dtype = next((p.dtype for p in m.parameters()), torch.float32)
    m.set_backend(resolve_backend(None if backend == "auto" else backend, device, param_dtype).name)
    if compile:
        return CompiledGRL(m)
    return m


class CompiledGRL(torch.nn.Module):
    """``torch.compile`` of a GRL model, called inside the model's heap cache.

    The compiled graph cannot enter :func:`grl_kernels.heap.heap_cache` itself (a C call is a
    graph break), so this wrapper does it around the call. ``_orig_mod`` is the GRL model (as on
    torch's own compiled modules); ``state_dict`` and ``parameters`` are the model's.
    """

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_compiled", torch.compile(model, dynamic=False))  # not a submodule

    def forward(self, x):
        from .heap import COMPILED_MAX_FIT, heap_cache

        with heap_cache(self._orig_mod._use_heap_cache(x), max_fit=COMPILED_MAX_FIT):
            return self._compiled(x)

    def state_dict(self, *args, **kwargs):
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._orig_mod.load_state_dict(*args, **kwargs)
