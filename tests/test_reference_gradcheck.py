"""float64 gradcheck of the reference attentions on tiny geometries (every differentiable input)."""
import pytest
import torch

import grl_kernels as G
from grl_kernels.geometry import stripe_geometry, window_geometry

STRIPE_CASES = [
    # x_size, stripe_size, stripe_groups, shift, f, heads, d
    ((8, 8), [4, None], [None, 2], True, 2, 2, 3),  # horizontal, published-style groups, shifted
    ((8, 8), [None, 4], [2, None], True, 2, 1, 4),  # vertical (reversed config)
    ((8, 12), [4, 4], [None, None], False, 2, 2, 2),  # unshifted, non-square
    ((8, 8), [None, None], [4, 4], True, 2, 1, 2),  # anchor shift t // f == 0 quirk
]


@pytest.mark.parametrize("case", STRIPE_CASES)
def test_gradcheck_stripe(case):
    x_size, ss, sg, shift, f, nh, d = case
    g = stripe_geometry(x_size, ss, sg, shift, f)
    C = nh * d
    dt = torch.float64
    qkv = torch.randn(1, g.H * g.W, 3 * C, dtype=dt, requires_grad=True)
    anchor = torch.randn(1, g.Ha, g.Wa, C, dtype=dt, requires_grad=True)
    s1 = (torch.rand(nh, dtype=dt) * 5 + 1).requires_grad_()
    s2 = (torch.rand(nh, dtype=dt) * 5 + 1).requires_grad_()
    b1 = (torch.rand(g.table_rows, nh, dtype=dt) * 16).requires_grad_()
    b2 = (torch.rand(g.table_rows, nh, dtype=dt) * 16).requires_grad_()

    def fn(qkv, anchor, s1, b1, s2, b2):
        return G.stripe_attention(qkv, anchor, g, nh, s1, b1, s2, b2, backend="reference")

    assert torch.autograd.gradcheck(fn, (qkv, anchor, s1, b1, s2, b2), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ws,x_size,shift,nh,d", [(4, (8, 8), True, 2, 3), (4, (8, 12), False, 1, 4), (2, (6, 4), True, 1, 2)])
def test_gradcheck_window(ws, x_size, shift, nh, d):
    g = window_geometry(x_size, ws, shift)
    C = nh * d
    dt = torch.float64
    qkv = torch.randn(2, g.H * g.W, 3 * C, dtype=dt, requires_grad=True)
    s = (torch.rand(nh, dtype=dt) * 5 + 1).requires_grad_()
    b = (torch.rand(g.table_rows, nh, dtype=dt) * 16).requires_grad_()

    def fn(qkv, s, b):
        return G.window_attention(qkv, g, nh, s, b, backend="reference")

    assert torch.autograd.gradcheck(fn, (qkv, s, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_modules_parameters():
    """Through the modules: logit scales (clamp/exp) and the position MLPs get gradients too."""
    m = G.AnchoredStripeAttention((8, 8), [4, None], [None, 2], True, 1, anchor_window_down_factor=2).double()
    w = G.WindowAttention((8, 8), 4, 1, window_shift=True).double()
    qkv = torch.randn(1, 64, 6, dtype=torch.float64, requires_grad=True)
    anchor = torch.randn(1, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    params = [m.attn_transform1.logit_scale, m.attn_transform2.cpb_mlp[2].weight, w.attn_transform.logit_scale]

    def fn(qkv, anchor, *ps):
        return m(qkv, anchor, (8, 8)) + w(qkv, (8, 8))

    assert torch.autograd.gradcheck(fn, (qkv, anchor, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
