"""Error metrics and tolerances used by ``grl-kernels check`` (and the tests).

Errors are measured against the reference evaluated in float64 on the SAME rounded
inputs (a bfloat16 run is compared with float64 math on its bfloat16 inputs), so the
error is the implementation's arithmetic error only. ``rel`` is the max abs error
divided by the max abs value of the float64 result (a normwise error: it does not blow
up on entries near zero).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# Tolerances on ``rel``, per dtype, for outputs and gradients. Inputs are N(0, 1), tau in
# [5, 30], bias in (0, 16), so logits reach ~50 and errors in cos(q, k) are amplified by tau.
# float32: unit roundoff 6e-8; dot products over d <= 32 and softmax sums over <= 1024
#   keys, amplified x30 by tau, measure ~1e-6 on the reference; 2e-5 leaves room for a
#   different (but correct) summation order, while a wrong index, mask or shift gives O(0.1-1).
# float16 / bfloat16: unit roundoff 4.9e-4 / 3.9e-3. Kernels keep softmax statistics and
#   accumulation in float32, so the error is dominated by rounding the logits' inputs and
#   the final cast: measured ~4e-3 (fp16) and ~3e-2 (bf16) for the reference run in that
#   dtype; limits 1e-2 / 6e-2 still catch any real indexing error (O(0.1-1)).
# float64: 1e-10 (summation-order differences only).
TOLERANCES: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}


def tolerance(dtype: torch.dtype) -> float:
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
