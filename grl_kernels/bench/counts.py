"""Useful work of one attention call: FLOPs and the minimal bytes moved.

Stripe (per window and head, N1 tokens, N2 anchors, head dim d): stage 1 is
cos(a, k) (N2 x N1 x d multiply-adds) and softmax @ v (the same), stage 2 the same
with q and the anchors: 4 matmuls of N1*N2*d MACs = 8 N1 N2 d FLOPs. Summed over
windows and heads: 8 * B * L * N2 * C. Window: 2 matmuls of N^2 d MACs per window
and head: 4 * B * L * N * C. Backward does two matmuls per forward matmul:
forward+backward = 3x forward (recomputation by a fused kernel is not counted: these
are the FLOPs of the math, so GFLOP/s compare across implementations).

Bytes: what any implementation must read and write once. Forward reads q, k, v
(3 C per token; a strided slice reads only those), the anchors and both tau/bias tables,
and writes the output. Backward additionally reads the output gradient and the forward
inputs again, and writes the gradients of qkv, anchors and the tables.
"""
from __future__ import annotations

from .cases import Case


def _elt(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def flops(case: Case, backward: bool = False) -> float:
    g = case.geometry()
    L = case.H * case.W
    if case.kind == "stripe":
        f = 8.0 * case.batch * L * g.n2 * case.channels
    else:
        f = 4.0 * case.batch * L * g.n * case.channels
    return 3.0 * f if backward else f


def bytes_moved(case: Case, dtype, backward: bool = False) -> float:
    g = case.geometry()
    e = _elt(dtype)
    L, B, C = case.H * case.W, case.batch, case.channels
    qkv = B * L * 3 * C * e
    out = B * L * C * e
    anchor = B * g.Ha * g.Wa * C * e if case.kind == "stripe" else 0
    tables = (2 if case.kind == "stripe" else 1) * (g.table_rows * case.heads + case.heads) * 4
    fwd = qkv + anchor + tables + out
    if not backward:
        return float(fwd)
    # forward, then: read grad_out, qkv, anchor, tables again; write grads of qkv, anchor, tables
    return float(fwd + out + qkv + anchor + tables + qkv + anchor + tables)
