"""Quirks of the published GRL code that the kernels must reproduce, checked against spandrel
0.4.2's copy of it (imported as in tests/test_patching_spandrel.py):

- the logit-scale clamp at ln 100 (logit scales drawn up to 7, past it);
- odd window sizes: the shift is w // 2 (not (w + 1) // 2) and the masks follow it;
- the coordinate tables with pretrained window / stripe sizes: the divisor uses the pretrained
  anchor size pretrained // f (the anchor down factor);
- the -100 mask at taus near 100, where it decides the result.

Each is checked on the tables themselves and end to end: spandrel's GRL patched with every CPU
backend, in float64, against the unpatched published forward (output and every gradient).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import grl_kernels
from grl_kernels.geometry import coords_table, stripe_geometry, window_geometry

from fuzz_helpers import cpu_backends
from test_patching_spandrel import SpandrelGRL, _rel  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def ops(SpandrelGRL):  # noqa: F811
    return importlib.import_module("spandrel.architectures.GRL.__arch.ops")


# (stripe or window size, pretrained size, anchor down factor)
TABLES = [
    ((8, 8), (0, 0), 1), ((8, 8), (16, 16), 1), ((5, 5), (7, 7), 1), ((7, 7), (0, 0), 1),
    ((8, 16), (0, 0), 2), ((8, 16), (16, 32), 2), ((8, 16), (16, 16), 4), ((12, 6), (24, 12), 2),
    ((16, 8), (32, 32), 4), ((6, 6), (12, 12), 3),
]


@pytest.mark.parametrize("size,pretrained,f", TABLES, ids=str)
def test_coordinate_tables_match_published(ops, size, pretrained, f):
    want = ops.get_relative_coords_table_all(list(size), list(pretrained), f).reshape(-1, 2)
    got = coords_table(size, [s // f for s in size], pretrained, f)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # the geometry objects build the same tables
    g = stripe_geometry((size[0] * 2, size[1] * 2), size, (None, None), True, f, pretrained)
    assert torch.allclose(g.coords_table(), want, rtol=0, atol=1e-6)
    if size[0] == size[1] and f == 1:
        wg = window_geometry((size[0] * 2, size[0] * 2), size[0], True, pretrained)
        assert torch.allclose(wg.coords_table(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ws", [3, 5, 6, 7])
def test_window_masks_match_published_odd_windows(ops, ws):
    x_size = (ws * 3, ws * 2)
    g = window_geometry(x_size, ws, True)
    assert g.shift == ws // 2
    want = ops.calculate_mask(x_size, (ws, ws), ws // 2)
    assert torch.equal(g.mask(), want)


@pytest.mark.parametrize("stripe,f", [((5, 5), 1), ((3, 9), 1), ((6, 10), 2), ((12, 4), 4)], ids=str)
def test_stripe_masks_match_published_odd_stripes(ops, stripe, f):
    x_size = (stripe[0] * 2, stripe[1] * 3)
    g = stripe_geometry(x_size, stripe, (None, None), True, f)
    shift = [s // 2 for s in stripe]
    assert torch.equal(g.mask_w2a(), ops.calculate_mask_all(x_size, list(stripe), shift, f, True))
    assert torch.equal(g.mask_a2w(), ops.calculate_mask_all(x_size, list(stripe), shift, f, False))


# spandrel GRL configurations (float64): odd windows and stripes; pretrained sizes with f = 2.
# Two blocks: a shifted window block (odd shift) and both stripe directions.
ODD = dict(upscale=1, img_size=20, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2],
           window_size=5, stripe_size=[5, None], stripe_groups=[None, 2], stripe_shift=True, mlp_ratio=2,
           anchor_window_down_factor=1, upsampler="", local_connection=False, drop_path_rate=0.0)
PRETRAINED = dict(upscale=2, img_size=16, embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[2],
                  window_size=8, stripe_size=[8, None], stripe_groups=[None, 2], stripe_shift=True, mlp_ratio=2,
                  anchor_window_down_factor=2, upsampler="pixelshuffledirect", local_connection=False,
                  pretrained_window_size=[16, 16], pretrained_stripe_size=[16, 32], drop_path_rate=0.0)
# square inputs: the published code crashes on non-square ones with stripe_groups (spec section 6)
CONFIGS = {"odd_window_5": (ODD, (20, 20)), "pretrained_f2": (PRETRAINED, (16, 16))}


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends(torch.float64))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_published_model_float64(SpandrelGRL, config, backend):  # noqa: F811
    """Float64: the same math in another order agrees to ~1e-13; a wrong clamp, shift, table
    or mask constant moves outputs and gradients by O(1e-2) or more. Limit 1e-9."""
    kw, size = CONFIGS[config]
    torch.manual_seed(0)
    model = SpandrelGRL(**kw).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("logit_scale"):  # taus from e^2.5 = 12 to e^7 (clamped to 100)
                p.uniform_(2.5, 7.0)
        lam = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("logit_scale")])
        assert (lam > math.log(100)).any() and (lam < math.log(100)).any()
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    out0, gx0, g0 = _run(model, x)
    report = grl_kernels.patch(model, backend=backend)
    assert len(report) == 2 * kw["depths"][0]
    out1, gx1, g1 = _run(model, x)
    assert _rel(out1, out0) < 1e-9
    assert _rel(gx1, gx0) < 1e-9
    assert set(g1) == set(g0)
    for n in g0:
        assert _rel(g1[n], g0[n]) < 1e-9, n
    # the clamp really was exercised: no gradient reaches a logit scale past ln 100
    for n, p in model.named_parameters():
        if n.endswith("logit_scale"):
            past = p.detach() > math.log(100)
            assert torch.all(g1[n][past] == 0), n
    grl_kernels.unpatch(model)
