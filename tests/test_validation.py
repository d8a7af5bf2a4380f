"""Bad input gives a ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

import grl_kernels as G


def _stripe(C=8, nh=2, f=4):
    return G.AnchoredStripeAttention((32, 32), [8, None], [None, 4], True, nh, anchor_window_down_factor=f)


def _inputs(B=1, H=32, W=32, C=8, f=4, dtype=torch.float32):
    return torch.randn(B, H * W, 3 * C, dtype=dtype), torch.randn(B, H // f, W // f, C, dtype=dtype)


def test_ok_baseline():
    qkv, a = _inputs()
    assert _stripe()(qkv, a, (32, 32)).shape == (1, 1024, 8)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, a: (q, a, (32, 64)), ValueError, "qkv has 1024 tokens but x_size"),
        (lambda q, a: (q[0], a, (32, 32)), ValueError, "qkv must have 3 dimensions"),
        (lambda q, a: (q, a[0], (32, 32)), ValueError, "anchor must have 4 dimensions"),
        (lambda q, a: (q, a[:, :4], (32, 32)), ValueError, r"anchor must have shape .*\(1, 8, 8, 8\)"),
        (lambda q, a: (q[..., :23], a, (32, 32)), ValueError, "not divisible by 3"),
        (lambda q, a: (q, a.double(), (32, 32)), TypeError, "anchor has dtype torch.float64 but qkv"),
        (lambda q, a: (q.int(), a, (32, 32)), TypeError, "qkv must be a floating tensor"),
        (lambda q, a: (q.numpy(), a, (32, 32)), TypeError, "qkv must be a torch.Tensor"),
        (lambda q, a: (q, a, 32), TypeError, "x_size must be a pair"),
        (lambda q, a: (q, a, (32.0, 32)), TypeError, "x_size must be a pair"),
        (lambda q, a: (q, a.to("meta"), (32, 32)), ValueError, "anchor is on meta but qkv is on cpu"),
    ],
)
def test_stripe_bad_input(mutate, exc, match):
    qkv, a = _inputs()
    with pytest.raises(exc, match=match):
        _stripe()(*mutate(qkv, a))


def test_size_not_divisible_by_stripe():
    m = G.AnchoredStripeAttention((32, 32), [8, None], [None, 4], True, 2, anchor_window_down_factor=4)
    qkv, a = _inputs(H=36, W=32)
    with pytest.raises(ValueError, match="x_size height 36 must be divisible by the stripe height 8"):
        m(qkv, a, (36, 32))


def test_size_not_divisible_by_anchor_factor():
    m = G.AnchoredStripeAttention((24, 32), [None, None], [2, 4], False, 2, anchor_window_down_factor=8)
    qkv, a = _inputs(H=24, W=32, f=8)
    with pytest.raises(ValueError, match="divisible by anchor_window_down_factor 8"):
        m(qkv, a, (24, 32))


def test_channels_not_divisible_by_heads():
    m = G.AnchoredStripeAttention((32, 32), [8, None], [None, 4], True, 3, anchor_window_down_factor=4)
    qkv, a = _inputs(C=8)
    with pytest.raises(ValueError, match="C = 8 must be divisible by num_heads = 3"):
        m(qkv, a, (32, 32))
    w = G.WindowAttention((32, 32), 8, 3)
    with pytest.raises(ValueError, match="num_heads = 3"):
        w(qkv, (32, 32))


def test_window_bad_input():
    w = G.WindowAttention((32, 32), 8, 2, window_shift=True)
    qkv, _ = _inputs()
    assert w(qkv, (32, 32)).shape == (1, 1024, 8)
    with pytest.raises(ValueError, match="x_size height 36 must be divisible by window_size 8"):
        w(torch.randn(1, 36 * 32, 24), (36, 32))
    with pytest.raises(ValueError, match="qkv has 1024 tokens"):
        w(qkv, (16, 16))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_heads=0), TypeError, "num_heads must be a positive int"),
        (dict(stripe_size=[8, None], stripe_groups=[None, None]), ValueError, "each dimension needs a size or a group count"),
        (dict(stripe_size=[8, -1]), ValueError, "stripe_size entries must be positive"),
        (dict(stripe_size="8"), TypeError, "stripe_size must be a pair"),
        (dict(anchor_window_down_factor=0), ValueError, "anchor_window_down_factor must be a positive int"),
        (dict(attn_drop=1.5), ValueError, "attn_drop must be in"),
        (dict(backend=3), TypeError, "backend must be None or a backend name"),
    ],
)
def test_stripe_constructor_errors(kwargs, exc, match):
    base = dict(input_resolution=(32, 32), stripe_size=[8, None], stripe_groups=[None, 4], stripe_shift=True, num_heads=2)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        G.AnchoredStripeAttention(**base)


def test_window_constructor_errors():
    with pytest.raises(ValueError, match="window_size must be a positive int or a square pair"):
        G.WindowAttention((32, 32), (8, 4), 2)


def test_functional_bias_shape_checked():
    g = G.stripe_geometry((32, 32), [8, None], [None, 4], True, 4)
    qkv, a = _inputs()
    s = torch.ones(2)
    b = torch.zeros(g.table_rows, 2)
    G.stripe_attention(qkv, a, g, 2, s, b, s, b)
    with pytest.raises(ValueError, match=r"bias1 must have shape \(" + str(g.table_rows) + r", 2\)"):
        G.stripe_attention(qkv, a, g, 2, s, b[:-1], s, b)
    with pytest.raises(ValueError, match=r"scale2 must have shape \(2,\)"):
        G.stripe_attention(qkv, a, g, 2, s, b, torch.ones(3), b)
