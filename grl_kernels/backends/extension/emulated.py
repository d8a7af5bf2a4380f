"""The CUDA kernels executed on the CPU (module ``_C_cuda_emu``, csrc/emu; docs/cuda.md).

Same call convention as the GPU module (``grl_cuda_binding.cpp`` built with -DGRL_CUDA_EMU),
for CPU tensors: float32 / float16 / bfloat16 qkv and anchor, float32 tau (nh,) and bias
tables transposed to (nh, R); the stream argument is ignored. Wrapped in plain
``torch.autograd.Function``s (not custom operators: this path exists to check the CUDA code,
not to be traced by torch.compile).
"""
from __future__ import annotations

import torch

from . import load
from .ops import stripe_params, window_params


def module():
    return load("cuda_emu")


class _Stripe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, anchor, tau1, bias1, tau2, bias2, geom, nh):
        out, *state = module().stripe_forward(qkv, anchor, tau1, bias1, tau2, bias2, geom, nh, 0)
        ctx.save_for_backward(qkv, anchor, tau1, bias1, tau2, bias2, *state)
        ctx.geom, ctx.nh = geom, nh
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, anchor, tau1, bias1, tau2, bias2, *state = ctx.saved_tensors
        go = grad_out.to(qkv.dtype).contiguous()
        g = module().stripe_backward(go, qkv, anchor, tau1, bias1, tau2, bias2, *state, ctx.geom, ctx.nh, 0)
        return g[0], g[1], g[2], g[3], g[4], g[5], None, None


class _Window(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, tau, bias, geom, nh):
        out, *state = module().window_forward(qkv, tau, bias, geom, nh, 0)
        ctx.save_for_backward(qkv, tau, bias, *state)
        ctx.geom, ctx.nh = geom, nh
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, tau, bias, *state = ctx.saved_tensors
        go = grad_out.to(qkv.dtype).contiguous()
        g = module().window_backward(go, qkv, tau, bias, *state, ctx.geom, ctx.nh, 0)
        return g[0], g[1], g[2], None, None


def _tau(t):
    return t.reshape(-1).to(torch.float32).contiguous()


def _bias(t):
    return t.t().to(torch.float32).contiguous()  # (R, nh) -> (nh, R); autograd maps the grads back


def _unit(t):
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernels need channel stride 1


def stripe(qkv, anchor, geom, num_heads, scale1, bias1, scale2, bias2):
    qkv, anchor = _unit(qkv), _unit(anchor)
    return _Stripe.apply(qkv, anchor, _tau(scale1), _bias(bias1), _tau(scale2), _bias(bias2),
                         stripe_params(geom), num_heads)


def window(qkv, geom, num_heads, scale, bias):
    return _Window.apply(_unit(qkv), _tau(scale), _bias(bias), window_params(geom), num_heads)
