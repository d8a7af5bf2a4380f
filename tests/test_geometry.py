"""Properties of the geometry module on many random configurations."""
import math
import random

import pytest
import torch

from grl_kernels.geometry import (
    MASK_VALUE,
    coords_table,
    region_band,
    region_ids_1d,
    stripe_geometry,
    stripe_info,
    window_geometry,
)


def _random_stripe_configs(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        f = rng.choice([1, 2, 4])
        dims, ss, sg = [], [], []
        for _ in range(2):
            if rng.random() < 0.5:  # fixed stripe size
                s = f * rng.randint(1, 4)
                dims.append(s * rng.randint(1, 4))
                ss.append(s)
                sg.append(None)
            else:  # stripe groups
                g = rng.randint(1, 4)
                dims.append(g * f * rng.randint(1, 4))
                ss.append(rng.choice([None, 8]))
                sg.append(g)
        out.append(((dims[0], dims[1]), ss, sg, rng.random() < 0.6, f))
    return out


def _img_mask_ids(D0, D1, s, t):
    """Region ids built the literal way: assign 3x3 slice pairs in order, later ones overwrite."""
    img = torch.zeros(D0, D1, dtype=torch.int64)
    cnt = 0
    for h in (slice(0, -s[0]), slice(-s[0], -t[0]), slice(-t[0], None)):
        for w in (slice(0, -s[1]), slice(-s[1], -t[1]), slice(-t[1], None)):
            img[h, w] = cnt
            cnt += 1
    return img


def test_stripe_info_rules():
    assert stripe_info([8, None], [None, 4], True, (64, 128)) == ((8, 32), (4, 16))
    assert stripe_info([8, None], [None, 4], False, (64, 128)) == ((8, 32), (0, 0))
    assert stripe_info([None, 8], [4, None], True, (64, 128)) == ((16, 8), (8, 4))  # vertical block
    assert stripe_info([None, None], [1, 2], True, (32, 32)) == ((32, 16), (0, 8))  # g == 1 -> shift 0
    assert stripe_info([64, 64], [None, None], True, (128, 128)) == ((64, 64), (32, 32))


def test_region_ids_t0_quirk():
    assert region_ids_1d(8, 4, 0).tolist() == [2] * 8
    assert region_ids_1d(8, 4, 2).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert region_ids_1d(4, 4, 2).tolist() == [1, 1, 2, 2]
    for size, s, t in [(8, 4, 0), (8, 4, 2), (12, 4, 1), (6, 6, 3), (16, 8, 4)]:
        assert [region_band(p, size, s, t) for p in range(size)] == region_ids_1d(size, s, t).tolist()


def test_coords_table_published_window_values():
    # window 8: values -7..7 divided by 7, x8, log-spaced; corners are +-log2(9)/log2(8)
    t = coords_table((8, 8), (8, 8))
    assert t.shape == (15 * 15, 2)
    corner = math.log2(9) / 3
    assert torch.allclose(t[0], torch.tensor([-corner, -corner])) and torch.allclose(t[-1], torch.tensor([corner, corner]))
    center = t.reshape(15, 15, 2)[7, 7]
    assert torch.equal(center, torch.zeros(2))
    v = 3 / 7 * 8
    assert math.isclose(t.reshape(15, 15, 2)[10, 7, 0].item(), math.log2(v + 1) / 3, rel_tol=1e-5)  # float32 log2


@pytest.mark.parametrize("cfg", _random_stripe_configs(60))
def test_stripe_geometry_properties(cfg):
    x_size, ss, sg, shift, f = cfg
    g = stripe_geometry(x_size, ss, sg, shift, f)
    H, W = x_size
    assert g.H % g.sh == 0 and g.W % g.sw == 0 and g.sh % f == 0 and g.sw % f == 0
    # windows tile the image exactly once (tokens and anchors)
    perm = g.token_permutation()
    assert torch.equal(perm.sort().values, torch.arange(H * W))
    aperm = g.anchor_permutation()
    assert torch.equal(aperm.sort().values, torch.arange(g.Ha * g.Wa))
    # the scalar formulas every kernel uses agree with the materialized tables
    for n in range(g.num_windows):
        for j in range(0, g.n1, max(1, g.n1 // 7)):
            assert g.token_position(n, j) == perm[n * g.n1 + j].item()
        for i in range(0, g.n2, max(1, g.n2 // 5)):
            assert g.anchor_position(n, i) == aperm[n * g.n2 + i].item()
    w2a, a2w = g.index_w2a(), g.index_a2w()
    assert w2a.shape == (g.n1, g.n2) and a2w.shape == (g.n2, g.n1)
    R = g.table_rows
    assert g.coords_table().shape == (R, 2)
    assert 0 <= int(w2a.min()) and int(w2a.max()) < R and 0 <= int(a2w.min()) and int(a2w.max()) < R
    for j in range(0, g.n1, max(1, g.n1 // 5)):
        for i in range(0, g.n2, max(1, g.n2 // 3)):
            assert g.w2a_index(j, i) == w2a[j, i].item() and g.a2w_index(i, j) == a2w[i, j].item()
    # masks: present only when shifted, 0/-100, the two stages transposes of each other
    if not shift:
        assert g.mask_w2a() is None and g.mask_a2w() is None
        return
    m21, m12 = g.mask_w2a(), g.mask_a2w()
    assert m21.shape == (g.num_windows, g.n1, g.n2)
    assert set(m21.unique().tolist()) <= {0.0, MASK_VALUE}
    assert torch.equal(m12, m21.transpose(1, 2))
    # region ids equal the literal slice-assignment construction on the rolled grid
    ids = _img_mask_ids(H, W, (g.sh, g.sw), (g.shift_h, g.shift_w))
    part = ids.reshape(H // g.sh, g.sh, W // g.sw, g.sw).permute(0, 2, 1, 3).reshape(-1, g.n1)
    assert torch.equal(part, g.token_region_ids())
    aids = _img_mask_ids(g.Ha, g.Wa, (g.ah, g.aw), (g.anchor_shift_h, g.anchor_shift_w))
    apart = aids.reshape(g.Ha // g.ah, g.ah, g.Wa // g.aw, g.aw).permute(0, 2, 1, 3).reshape(-1, g.n2)
    assert torch.equal(apart, g.anchor_region_ids())


@pytest.mark.parametrize("ws,H,W,shift", [(4, 8, 12, True), (8, 16, 16, True), (4, 4, 8, False), (6, 12, 18, True), (3, 9, 6, True)])
def test_window_geometry_properties(ws, H, W, shift):
    g = window_geometry((H, W), ws, shift)
    perm = g.token_permutation()
    assert torch.equal(perm.sort().values, torch.arange(H * W))
    for n in range(g.num_windows):
        for j in range(g.n):
            assert g.token_position(n, j) == perm[n * g.n + j].item()
    idx = g.index()
    assert int(idx.min()) == 0 and int(idx.max()) == g.table_rows - 1
    assert torch.equal(idx + idx.T, torch.full_like(idx, g.table_rows - 1))  # r(a,b) + r(b,a) = R - 1
    m = g.mask()
    if not shift:
        assert m is None
        return
    assert torch.equal(m, m.transpose(1, 2))  # query/key symmetric
    assert torch.all(m.diagonal(dim1=1, dim2=2) == 0)
    assert (m != 0).any()  # shifted windows at the border do mix regions


def test_t0_anchor_quirk_geometry():
    # 16x16 image, stripe groups 4 -> stripe 4, shift 2; f = 4 -> anchor stripe 1, anchor shift 0
    g = stripe_geometry((16, 16), [None, None], [4, 4], True, 4)
    assert (g.shift_h, g.anchor_shift_h) == (2, 0)
    assert torch.all(g.anchor_region_ids() == 8)  # band 2 in both dimensions everywhere
    # tokens of the first window (band 0) are masked from its anchor; the last window's are not all
    m = g.mask_w2a()
    assert torch.all(m[0] == MASK_VALUE)


def test_geometry_cached():
    a = stripe_geometry((32, 32), [8, None], [None, 4], True, 4)
    b = stripe_geometry((32, 32), [8, None], [None, 4], True, 4)
    assert a is b and a.index_w2a() is b.index_w2a()


@pytest.mark.parametrize(
    "args,match",
    [
        (((30, 32), [8, None], [None, 4], True, 4), "divisible by the stripe height"),
        (((36, 32), [6, None], [None, 4], True, 4), "divisible by anchor_window_down_factor"),
        (((32, 36), [8, None], [None, 4], True, 4), "divisible by anchor_window_down_factor"),
        (((2, 32), [None, None], [4, 4], True, 1), "empty"),
    ],
)
def test_stripe_geometry_errors(args, match):
    with pytest.raises(ValueError, match=match):
        stripe_geometry(*args)
