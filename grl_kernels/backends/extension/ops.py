"""The compiled kernels as torch custom operators (``torch.ops.grl_kernels.*``).

Registering them with ``torch.library.custom_op`` (real kernels + shape-only "fake"
kernels + autograd) makes the "cpu" and "cuda" backends traceable by ``torch.compile``
(fullgraph) and differentiable; the ops dispatch on the device of ``qkv``.

Convention of both compiled modules (see csrc/cpu/grl_cpu_binding.cpp, csrc/cuda/grl_cuda_binding.cpp):
    stripe_forward(qkv, anchor, tau1, bias1, tau2, bias2, geom, nh) -> [out, *state]
    stripe_backward(grad_out, qkv, anchor, tau1, bias1, tau2, bias2, *state, geom, nh)
        -> [d_qkv, d_anchor, d_tau1, d_bias1, d_tau2, d_bias2]
    window_forward(qkv, tau, bias, geom, nh) -> [out, *state]
    window_backward(grad_out, qkv, tau, bias, *state, geom, nh) -> [d_qkv, d_tau, d_bias]
with tau (nh,) and bias tables transposed to (nh, R), contiguous in the accumulation dtype
(float32, or float64 for float64 CPU inputs). The CPU state is (Z, stat1) for stripes and
nothing for windows; the CUDA state is (Z, stat1, stat2, |q|, |k|, |a|) / (stat, |q|, |k|),
with stat the softmax rows' (max logit, 1 / sum) pairs (csrc/cuda/grl_cuda.h).
The ops return a fixed number of tensors, padding with empty ones.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from ...geometry import StripeGeometry, WindowGeometry
from . import load

STRIPE_STATE = 6  # state slots of stripe_fwd (CPU uses 2, CUDA 6)
WINDOW_STATE = 3  # state slots of window_fwd (CPU uses 0, CUDA 3)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stripe_params(g: StripeGeometry) -> List[int]:
    return [g.H, g.W, g.sh, g.sw, g.shift_h, g.shift_w, g.down, int(bool(g.shifted))]


def window_params(g: WindowGeometry) -> List[int]:
    return [g.H, g.W, g.ws, g.shift]


def _call(name: str, ref: Tensor, *args):
    """Run kernel `name` of the module for ref's device (CUDA: under its device, on torch's stream)."""
    if ref.device.type == "cpu":
        return getattr(load("cpu"), name)(*args)
    ext = load("cuda")
    with torch.cuda.device(ref.device):
        return getattr(ext, name)(*args, torch.cuda.current_stream(ref.device).cuda_stream)


def _pad(tensors, n: int, ref: Tensor) -> List[Tensor]:
    tensors = list(tensors)
    return tensors + [ref.new_empty(0) for _ in range(n - len(tensors))]


def _used(ref: Tensor, kind: str) -> int:
    if kind == "stripe":
        return 2 if ref.device.type == "cpu" else STRIPE_STATE
    return 0 if ref.device.type == "cpu" else WINDOW_STATE


# ---------------------------------------------------------------------------- stripe
@torch.library.custom_op("grl_kernels::stripe_fwd", mutates_args=())
def stripe_fwd(
    qkv: Tensor, anchor: Tensor, tau1: Tensor, bias1: Tensor, tau2: Tensor, bias2: Tensor, geom: List[int], num_heads: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, *state = _call("stripe_forward", qkv, qkv, anchor, tau1, bias1, tau2, bias2, geom, num_heads)
    return tuple([out] + _pad(state, STRIPE_STATE, tau1))


@stripe_fwd.register_fake
def _stripe_fwd_fake(qkv, anchor, tau1, bias1, tau2, bias2, geom, num_heads):
    H, W, sh, sw, _, _, f, _ = geom
    B, L, C3 = qkv.shape
    C = C3 // 3
    d, nw, n1, n2 = C // num_heads, (H // sh) * (W // sw), sh * sw, (sh // f) * (sw // f)
    st = tau1.new_empty
    state = [st(B, nw, num_heads, n2, d), st(B, nw, num_heads, n2, 2)]  # Z, stage-1 rows' (max, 1 / sum)
    if qkv.device.type != "cpu":
        state += [st(B, nw, num_heads, n1, 2), st(B, L, num_heads), st(B, L, num_heads),
                  st(B, (H // f) * (W // f), num_heads)]
    return tuple([qkv.new_empty(B, L, C)] + _pad(state, STRIPE_STATE, tau1))


@torch.library.custom_op("grl_kernels::stripe_bwd", mutates_args=())
def stripe_bwd(
    grad_out: Tensor, qkv: Tensor, anchor: Tensor, tau1: Tensor, bias1: Tensor, tau2: Tensor, bias2: Tensor,
    state: List[Tensor], geom: List[int], num_heads: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    used = state[: _used(qkv, "stripe")]
    res = _call("stripe_backward", qkv, grad_out, qkv, anchor, tau1, bias1, tau2, bias2, *used, geom, num_heads)
    return tuple(res)


@stripe_bwd.register_fake
def _stripe_bwd_fake(grad_out, qkv, anchor, tau1, bias1, tau2, bias2, state, geom, num_heads):
    B, L, C3 = qkv.shape
    return (qkv.new_empty(B, L, C3), anchor.new_empty(anchor.shape), tau1.new_empty(tau1.shape),
            bias1.new_empty(bias1.shape), tau2.new_empty(tau2.shape), bias2.new_empty(bias2.shape))


def _stripe_setup(ctx, inputs, output):
    qkv, anchor, tau1, bias1, tau2, bias2, geom, num_heads = inputs
    ctx.save_for_backward(qkv, anchor, tau1, bias1, tau2, bias2, *output[1:])
    ctx.geom, ctx.num_heads = geom, num_heads


def _stripe_backward(ctx, grad_out, *_state_grads):
    qkv, anchor, tau1, bias1, tau2, bias2, *state = ctx.saved_tensors
    go = grad_out.to(qkv.dtype).contiguous()
    g = stripe_bwd(go, qkv, anchor, tau1, bias1, tau2, bias2, state, ctx.geom, ctx.num_heads)
    return g[0], g[1], g[2], g[3], g[4], g[5], None, None


stripe_fwd.register_autograd(_stripe_backward, setup_context=_stripe_setup)


# ---------------------------------------------------------------------------- window
@torch.library.custom_op("grl_kernels::window_fwd", mutates_args=())
def window_fwd(
    qkv: Tensor, tau: Tensor, bias: Tensor, geom: List[int], num_heads: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out, *state = _call("window_forward", qkv, qkv, tau, bias, geom, num_heads)
    return tuple([out] + _pad(state, WINDOW_STATE, tau))


@window_fwd.register_fake
def _window_fwd_fake(qkv, tau, bias, geom, num_heads):
    H, W, ws, _ = geom
    B, L, C3 = qkv.shape
    state = []
    if qkv.device.type != "cpu":
        nw = (H // ws) * (W // ws)
        state = [tau.new_empty(B, nw, num_heads, ws * ws, 2), tau.new_empty(B, L, num_heads),
                 tau.new_empty(B, L, num_heads)]
    return tuple([qkv.new_empty(B, L, C3 // 3)] + _pad(state, WINDOW_STATE, tau))


@torch.library.custom_op("grl_kernels::window_bwd", mutates_args=())
def window_bwd(
    grad_out: Tensor, qkv: Tensor, tau: Tensor, bias: Tensor, state: List[Tensor], geom: List[int], num_heads: int
) -> Tuple[Tensor, Tensor, Tensor]:
    used = state[: _used(qkv, "window")]
    return tuple(_call("window_backward", qkv, grad_out, qkv, tau, bias, *used, geom, num_heads))


@window_bwd.register_fake
def _window_bwd_fake(grad_out, qkv, tau, bias, state, geom, num_heads):
    return qkv.new_empty(qkv.shape), tau.new_empty(tau.shape), bias.new_empty(bias.shape)


def _window_setup(ctx, inputs, output):
    qkv, tau, bias, geom, num_heads = inputs
    ctx.save_for_backward(qkv, tau, bias, *output[1:])
    ctx.geom, ctx.num_heads = geom, num_heads


def _window_backward(ctx, grad_out, *_state_grads):
    qkv, tau, bias, *state = ctx.saved_tensors
    g = window_bwd(grad_out.to(qkv.dtype).contiguous(), qkv, tau, bias, state, ctx.geom, ctx.num_heads)
    return g[0], g[1], g[2], None, None


window_fwd.register_autograd(_window_backward, setup_context=_window_setup)


# ---------------------------------------------------------------------------- entry points
def _tau(t: Tensor, acc) -> Tensor:
    return t.reshape(-1).to(acc).contiguous()


def _bias(t: Tensor, acc) -> Tensor:
    return t.t().to(acc).contiguous()  # (R, nh) -> (nh, R); autograd maps the grads back


def stripe(qkv, anchor, geom: StripeGeometry, num_heads: int, scale1, bias1, scale2, bias2) -> Tensor:
    acc = acc_dtype(qkv.dtype)
    outs = torch.ops.grl_kernels.stripe_fwd(
        qkv, anchor, _tau(scale1, acc), _bias(bias1, acc), _tau(scale2, acc), _bias(bias2, acc),
        stripe_params(geom), num_heads,
    )
    return outs[0]


def window(qkv, geom: WindowGeometry, num_heads: int, scale, bias) -> Tensor:
    acc = acc_dtype(qkv.dtype)
    outs = torch.ops.grl_kernels.window_fwd(qkv, _tau(scale, acc), _bias(bias, acc), window_params(geom), num_heads)
    return outs[0]


# ---------------------------------------------------------------------------- CPU instruction-set path
def cpu_path() -> str:
    """Which instruction-set copy of the CPU kernels runs, chosen at run time from the CPU's
    features (e.g. ``"avx512bf16: AVX-512 float32 register tiles + AVX512-BF16 ..."``)."""
    fn = getattr(load("cpu"), "cpu_path", None)
    return fn() if fn is not None else "unknown (a build from before the run-time ISA choice)"


def set_cpu_isa(name: str) -> str:
    """Force the CPU kernels onto 'baseline', 'avx2', 'avx512bf16' or 'amx' (at most what the CPU
    supports; RuntimeError otherwise), or back to 'auto'. For tests and A/B timings."""
    return load("cpu").set_cpu_isa(name)

