"""Input builders and comparisons for the Triton backend tests."""
from __future__ import annotations

import torch

from grl_kernels.geometry import stripe_geometry, window_geometry
from grl_kernels.reference import stripe_attention_reference, window_attention_reference


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - e| / max(max |e|, floor): error relative to the magnitude of the tensor.

    ``floor`` makes it absolute for tensors that are (nearly) zero in exact arithmetic.
    """
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(floor)).item()


def _strided(shape, extra: int, offset: int, dtype):
    """A (.., n) tensor that is a channel slice [offset:offset+n] of a wider one (non-contiguous)."""
    *lead, n = shape
    return torch.randn(*lead, n + extra, dtype=torch.float64).to(dtype)[..., offset:offset + n]


def taus(nh: int) -> torch.Tensor:
    """Logit scales over the published range: tau = exp(min(lambda, ln 100)) in [1, 100]."""
    t = torch.tensor([10.0, 100.0, 3.0, 30.0, 1.0, 50.0], dtype=torch.float64)
    return t[torch.arange(nh) % len(t)]


def bias_table(rows: int, nh: int) -> torch.Tensor:
    return 16 * torch.sigmoid(torch.randn(rows, nh, dtype=torch.float64))


def stripe_case(B, x_size, stripe_size, stripe_groups, shift, f, nh, d, dtype=torch.float32, strided=False,
                zero_rows=False):
    """Inputs rounded to ``dtype`` (qkv, anchor) plus float64 params; returns (geom, inputs dict)."""
    g = stripe_geometry(x_size, stripe_size, stripe_groups, shift, f)
    C = nh * d
    L = g.H * g.W
    if strided:  # qkv: channel slice of a wider projection; anchor: permuted channel slice
        qkv = _strided((B, L, 3 * C), 11, 4, dtype)
        anchor = torch.randn(B, C + 5, g.Ha, g.Wa, dtype=torch.float64).to(dtype).permute(0, 2, 3, 1)[..., 2:2 + C]
    else:
        qkv = torch.randn(B, L, 3 * C, dtype=torch.float64).to(dtype)
        anchor = torch.randn(B, g.Ha, g.Wa, C, dtype=torch.float64).to(dtype)
    if zero_rows:  # vectors below F.normalize's eps: a query, a key and an anchor of head 0
        qkv[0, 3, 0:d] = 0
        qkv[0, 5, C:C + d] = 0
        anchor[0, 0, 1, 0:d] = 0
    inputs = dict(qkv=qkv, anchor=anchor, scale1=taus(nh), bias1=bias_table(g.table_rows, nh),
                  scale2=taus(nh).flip(0), bias2=bias_table(g.table_rows, nh))
    return g, inputs


def window_case(B, x_size, ws, shift, nh, d, dtype=torch.float32, strided=False):
    g = window_geometry(x_size, ws, shift)
    C = nh * d
    L = g.H * g.W
    qkv = _strided((B, L, 3 * C), 9, 3, dtype) if strided else torch.randn(B, L, 3 * C, dtype=torch.float64).to(dtype)
    return g, dict(qkv=qkv, scale=taus(nh), bias=bias_table(g.table_rows, nh))


STRIPE_ARGS = ("qkv", "anchor", "scale1", "bias1", "scale2", "bias2")
WINDOW_ARGS = ("qkv", "scale", "bias")


def run_stripe(fn, g, nh, inputs, grad_out, dtype):
    """Output and gradients of every input of ``fn`` (a backend's stripe function).

    qkv/anchor are used as given (rounded to their dtype); the float64 params are cast to
    ``dtype`` the way a module would pass them (float32 tables for 16-bit activations).
    """
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = {k: (v if k in ("qkv", "anchor") else v.to(pdt)).detach().requires_grad_() for k, v in inputs.items()}
    out = fn(leaves["qkv"], leaves["anchor"], g, nh, leaves["scale1"], leaves["bias1"], leaves["scale2"],
             leaves["bias2"])
    grads = torch.autograd.grad(out, [leaves[k] for k in STRIPE_ARGS], grad_out.to(out.dtype))
    return out, dict(zip(STRIPE_ARGS, grads))


def run_window(fn, g, nh, inputs, grad_out, dtype):
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = {k: (v if k == "qkv" else v.to(pdt)).detach().requires_grad_() for k, v in inputs.items()}
    out = fn(leaves["qkv"], g, nh, leaves["scale"], leaves["bias"])
    grads = torch.autograd.grad(out, [leaves[k] for k in WINDOW_ARGS], grad_out.to(out.dtype))
    return out, dict(zip(WINDOW_ARGS, grads))


def reference_stripe(g, nh, inputs, grad_out):
    """Ground truth: the reference path in float64 on the same (rounded) inputs."""
    as64 = {k: v.double() for k, v in inputs.items()}
    return run_stripe(stripe_attention_reference, g, nh, as64, grad_out.double(), torch.float64)


def reference_window(g, nh, inputs, grad_out):
    as64 = {k: v.double() for k, v in inputs.items()}
    return run_window(window_attention_reference, g, nh, as64, grad_out.double(), torch.float64)
