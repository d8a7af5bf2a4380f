"""csrc/include/grl_geometry.h (shared by the CPU and CUDA kernels) against grl_kernels/geometry.py.

The compiled module materializes the header's index math; every table must equal the
Python geometry exactly: token/anchor partition (roll + windows), region ids (with the
shift-0 quirk), and the stage-1 / stage-2 / window relative indices.
"""

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import extension
from grl_kernels.backends.extension.ops import stripe_params, window_params
from grl_kernels.geometry import stripe_geometry, window_geometry

from test_cpu_kernels import _require_cpu_extension  # noqa: F401,E402  (fail, not skip, without the extension)

STRIPES = [
    ((32, 64), (8, None), (None, 4), True, 4),  # GRL preset, horizontal
    ((64, 32), (None, 8), (4, None), True, 4),  # vertical
    ((16, 16), (8, None), (None, 4), True, 4),  # anchor shift 2 // 4 = 0 quirk
    ((16, 24), (None, None), (1, 3), True, 2),  # g = 1: zero shift while shifted
    ((24, 40), (8, 8), (None, None), False, 2),
    ((48, 32), (16, 16), (None, None), True, 1),
]
WINDOWS = [((16, 24), 8, True), ((16, 24), 8, False), ((12, 18), 6, True), ((9, 9), 3, True)]


@pytest.mark.parametrize("cfg", STRIPES, ids=str)
def test_stripe_tables_match_python(cfg):
    g = stripe_geometry(*cfg)
    ext = extension.load("cpu")
    tpos, apos, tid, aid, w2a, a2w = ext.stripe_tables(stripe_params(g))
    assert torch.equal(tpos.reshape(-1), g.token_permutation())
    assert torch.equal(apos.reshape(-1), g.anchor_permutation())
    assert torch.equal(tid, g.token_region_ids())
    assert torch.equal(aid, g.anchor_region_ids())
    assert torch.equal(w2a, g.index_w2a())
    assert torch.equal(a2w, g.index_a2w())
    assert int(w2a.max()) < g.table_rows and int(a2w.min()) >= 0


@pytest.mark.parametrize("cfg", WINDOWS, ids=str)
def test_window_tables_match_python(cfg):
    g = window_geometry(*cfg)
    pos, rid, idx = extension.load("cpu").window_tables(window_params(g))
    assert torch.equal(pos.reshape(-1), g.token_permutation())
    assert torch.equal(rid, g.region_ids())
    assert torch.equal(idx, g.index())
