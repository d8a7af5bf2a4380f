"""Error metrics and tolerances used by ``grl-kernels check`` (and the tests).

Errors are measured against the reference evaluated in float64 on the SAME rounded
inputs (a bfloat16 run is compared with float64 math on its bfloat16 inputs), so the
error is the implementation's arithmetic error only. ``rel`` is the max abs error
divided by the max abs value of the float64 result (a normwise error: it does not blow
up on entries near zero).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

# Tolerances on ``rel`` per dtype: (forward output, qkv/anchor gradients, parameter
# gradients). Inputs are N(0, 1), tau in [5, 30], bias in (0, 16), so logits reach ~50 and
# errors in cos(q, k) are amplified by tau.
# float32: unit roundoff 6e-8; dot products over d <= 32 and softmax sums over <= 1024 keys,
#   amplified x30 by tau, measure 0.4-4e-6 on the reference path for outputs and qkv/anchor
#   gradients; 2e-5 leaves room for another (correct) summation order, while a wrong index,
#   mask or shift gives errors of 1e-2 to 1. The float32 rows pin the semantics.
# Parameter gradients (tau: one sum over every logit, bias tables: sums over every window)
#   add up n ~ 1e5 terms of both signs: their relative error is ~ eps * sqrt(n) * (sum |terms| /
#   |sum|), measured up to 2.6e-5 for a correct fused kernel in float32; limit 1e-4.
# float16 / bfloat16 (unit roundoff 4.9e-4 / 3.9e-3): these rows check dtype handling and
#   range. The reference run entirely in the low dtype (softmax in that dtype: its worst
#   case) measures up to 1.4e-2 / 9.2e-2 on outputs and 2.1e-2 / 1.2e-1 on the qkv/anchor
#   gradients over the --full cases; fused kernels accumulate in float32 and land below
#   that. Limits are ~2x those maxima. Parameter gradients in low precision can lose every
#   digit to cancellation (tau's measured 1.05 in bfloat16): reported, not judged (None).
# float64: summation-order differences only.
TOLERANCES: Dict[torch.dtype, Tuple[float, float, Optional[float]]] = {
    torch.float64: (1e-10, 1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (3e-2, 4e-2, None),
    torch.bfloat16: (2e-1, 2.5e-1, None),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float, Optional[float]]:
    """(output, qkv/anchor gradients, parameter gradients or None = not judged) limits on ``rel``."""
    return TOLERANCES[dtype]


def errors(actual: torch.Tensor, expected: torch.Tensor) -> Tuple[float, float]:
    """(max abs error, max abs error / max |expected|) computed in float64."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    abs_err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    return abs_err, abs_err / max(scale, 1e-30)
