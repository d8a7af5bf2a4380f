"""First-use check of the Triton toolchain: compile, load and run one tiny kernel on a device.

``availability()`` calls :func:`probe` once per process (the registry caches the answer), so a
toolchain that cannot produce loadable code here (for example a driver older than the PTX the
installed Triton emits, or a missing / too old ptxas) makes the backend report itself unavailable
with the reason and a hint, and "auto" moves on to the next backend, instead of a crash at the
first attention call.
"""
from __future__ import annotations

import warnings
from typing import Tuple

HINT = ("a driver older than the PTX this Triton emits is the usual cause: update the NVIDIA driver, "
        "install a Triton release that supports it (docs/triton.md), or set TRITON_PTXAS_PATH to the ptxas of a "
        "CUDA toolkit that matches the driver")
_warned = False


def _run_probe_kernel(device_index: int) -> None:
    """Compile and run a 16-element kernel; raise if anything fails or the values are wrong."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _grl_probe(X, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(X + i, i * 3 + 1)

    with torch.cuda.device(device_index):
        x = torch.zeros(16, dtype=torch.int32, device=f"cuda:{device_index}")
        _grl_probe[(1,)](x, BLOCK=16)
        torch.cuda.synchronize(device_index)
        want = torch.arange(16, dtype=torch.int32, device=x.device) * 3 + 1
        if not torch.equal(x, want):
            raise RuntimeError(f"the probe kernel wrote {x.tolist()}")


def probe(device_index: int) -> Tuple[bool, str]:
    """(ok, reason): whether Triton compiles, loads and runs a kernel on cuda:device_index.
    A failure also warns once per process (RuntimeWarning) so that "auto" falling back is visible."""
    global _warned
    try:
        _run_probe_kernel(device_index)
    except Exception as exc:  # any toolchain / driver error: report, never crash
        msg = str(exc).strip().splitlines()
        first = msg[0][:300] if msg else ""
        reason = (f"Triton could not compile and run a kernel on cuda:{device_index} "
                  f"({type(exc).__name__}: {first}); {HINT}")
        if not _warned:
            _warned = True
            warnings.warn(f"grl_kernels: the triton backend is unavailable: {reason}. Falling back to the next "
                          "backend.", RuntimeWarning, stacklevel=2)
        return False, reason
    return True, ""
