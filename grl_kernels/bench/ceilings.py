"""The machine's practical ceilings, measured in the same run as the benchmarks.

FLOP/s: a large square matmul in the benchmark dtype (2 n^3 FLOPs).
Bytes/s: a large tensor copy (reads and writes the buffer: 2 x its size).
Achieved GFLOP/s and GB/s of the attention are reported as fractions of these.
"""
from __future__ import annotations

from typing import Dict

import torch

from .timing import time_fn


def matmul_ceiling(device="cpu", dtype=torch.float32, n: int = 0, reps: int = 5) -> float:
    """FLOP/s of an n x n matmul (n defaults to 1024 on CPU and 8192 on CUDA)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: a @ b, device, reps=reps, warmup=1)
    return 2.0 * n ** 3 / t.min_s


def copy_ceiling(device="cpu", nbytes: int = 0, reps: int = 5) -> float:
    """Bytes/s of a device-to-device copy (64 MiB on CPU, 1 GiB on CUDA)."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, reps=reps, warmup=1)
    return 2.0 * src.numel() * 4 / t.min_s


def measure_ceilings(device="cpu", dtype=torch.float32, quick: bool = False) -> Dict[str, float]:
    n = 0
    if quick and torch.device(device).type == "cpu":
        n = 768
    return {
        "matmul_gflops": matmul_ceiling(device, dtype, n=n) / 1e9,
        "copy_gbps": copy_ceiling(device) / 1e9,
        "matmul_dtype": str(dtype).replace("torch.", ""),
    }
