"""torch.compile(fullgraph=True) of the modules on the reference path traces and matches eager."""
import torch

import grl_kernels as G


def test_compile_fullgraph_reference_modules():
    s = G.AnchoredStripeAttention(32, [8, None], [None, 4], True, 2, anchor_window_down_factor=4, backend="reference")
    w = G.WindowAttention(32, 8, 2, window_shift=True, backend="reference")

    def both(qkv, anchor):
        return s(qkv[..., :48], anchor, (32, 16)) + w(qkv[..., 48:], (32, 16))

    qkv = torch.randn(2, 512, 96)
    anchor = torch.randn(2, 8, 4, 16)
    eager = both(qkv, anchor)
    compiled = torch.compile(both, fullgraph=True)(qkv, anchor)
    # inductor fuses and reorders float32 reductions: agreement to float32 rounding of O(1) values
    assert (compiled - eager).abs().max().item() < 1e-5
