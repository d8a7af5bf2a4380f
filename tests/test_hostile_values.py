"""Hostile values on every backend that takes CPU tensors (reference, cpu, the Triton interpreter):
NaN / Inf in qkv or the anchors, zero and below-eps vectors, logit scales past the clamp and
partly masked rows at tau = 100 -- and 64-bit element offsets.

- NaN/Inf: the output is non-finite exactly where the reference's is (for the reference itself:
  exactly the head's channels of the tokens the bad value reaches -- its own token for a query,
  the whole window for a key or anchor, the value's own channel over the window for a value),
  finite values equal; never a hang or a crash.
- Zero rows / rows below F.normalize's eps in q, k and the anchors: the gradient of such a
  vector is dx_hat / eps (~1e12), checked on its own scale (a kernel that returns 0 there, or
  normalizes with another eps, fails).
- tau = 100 with head dim 1 (cos = +-1) and shifted windows: masked logits (-100) are then
  within reach of unmasked ones, so the mask constant matters to O(1).
- 64-bit offsets: a qkv view whose batch stride exceeds 2^31 elements (over an 8 GiB virtual
  storage of which only the used pages are touched) gives the same output as a compact copy;
  and the offset helpers of csrc/include/grl_geometry.h, compiled alone, return exact positions
  on a 2^17 x 2^17 grid.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import grl_kernels as G
from grl_kernels.geometry import stripe_geometry, window_geometry

from fuzz_helpers import cpu_backends

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = pathlib.Path(__file__).resolve().parent.parent

SG = dict(x_size=(8, 16), stripe_size=(4, 4), stripe_groups=(None, None), shift=True, f=2)
NH, D = 2, 4


def _backends(dtype=torch.float32):
    names = ["reference"] + cpu_backends(dtype)
    return [n for n in names if n == "triton"] if IN_INTERPRETER else [n for n in names if n != "triton"]


def _stripe_inputs(B=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = stripe_geometry(SG["x_size"], SG["stripe_size"], SG["stripe_groups"], SG["shift"], SG["f"])
    C = NH * D
    qkv = torch.randn(B, g.H * g.W, 3 * C, generator=gen).to(dtype)
    anchor = torch.randn(B, g.Ha, g.Wa, C, generator=gen).to(dtype)
    params = [torch.tensor([10.0, 100.0]), 16 * torch.rand(g.table_rows, NH, generator=gen),
              torch.tensor([100.0, 3.0]), 16 * torch.rand(g.table_rows, NH, generator=gen)]
    return g, qkv, anchor, params


def _stripe(backend, g, qkv, anchor, params, grad=False):
    qkv, anchor = qkv.clone().requires_grad_(grad), anchor.clone().requires_grad_(grad)
    ps = [p.clone().requires_grad_(grad) for p in params]
    out = G.stripe_attention(qkv, anchor, g, NH, *ps, backend=backend)
    if not grad:
        return out.detach(), None
    grads = torch.autograd.grad(out, [qkv, anchor] + ps, torch.ones_like(out))
    return out.detach(), grads


def _window_tokens(g, token):
    """Image indices of the tokens in the same (rolled) stripe window as ``token``."""
    perm = g.token_permutation().view(g.num_windows, g.n1)
    w = (perm == token).nonzero()[0, 0]
    return perm[w]


def _anchor_window_tokens(g, anchor_index):
    aperm = g.anchor_permutation().view(g.num_windows, g.n2)
    w = (aperm == anchor_index).nonzero()[0, 0]
    return g.token_permutation().view(g.num_windows, g.n1)[w]


# (where, value): the bad value goes to head 1 of token 5 (q, k, v) or of anchor 3
BAD = [("q", math.nan), ("k", math.inf), ("v", -math.inf), ("anchor", math.nan), ("anchor", math.inf),
       ("q", math.inf)]


def _poison(g, qkv, anchor, where, value):
    C = NH * D
    qkv, anchor = qkv.clone(), anchor.clone()
    h, t, a = 1, 5, 3
    if where == "anchor":
        anchor.view(anchor.shape[0], -1, C)[0, a, h * D + 1] = value
        tokens = _anchor_window_tokens(g, a)
    else:
        part = "qkv".index(where)
        qkv[0, t, part * C + h * D + 1] = value
        tokens = torch.tensor([t]) if where == "q" else _window_tokens(g, t)
    expected = torch.zeros(qkv.shape[0], g.H * g.W, C, dtype=torch.bool)
    if where == "v":  # a value reaches only its own channel
        expected[0, tokens, h * D + 1] = True
    else:
        expected[0, tokens, h * D:(h + 1) * D] = True
    return qkv, anchor, expected


@pytest.mark.parametrize("where,value", BAD, ids=[f"{w}-{v}" for w, v in BAD])
def test_nonfinite_inputs_stripe(where, value):
    g, qkv, anchor, params = _stripe_inputs()
    qkv, anchor, expected = _poison(g, qkv, anchor, where, value)
    ref, ref_grads = _stripe("reference", g, qkv, anchor, params, grad=True)
    assert torch.equal(~torch.isfinite(ref), expected)  # where the bad value reaches, nowhere else
    for name in _backends():
        out, grads = _stripe(name, g, qkv, anchor, params, grad=True)
        bad = ~torch.isfinite(out)
        assert torch.equal(bad, ~torch.isfinite(ref)), name
        assert torch.allclose(out[~bad], ref[~bad], rtol=0, atol=2e-5), name
        # every gradient: non-finite exactly where the reference's is, finite values equal to
        # float32 rounding (scaled by max(1, max|ref|); observed <= 2.5e-6)
        for k, (a, e) in enumerate(zip(grads, ref_grads)):
            fin = torch.isfinite(e)
            assert torch.equal(torch.isfinite(a), fin), (name, k)
            if fin.any():
                err = (a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp(min=1)
                assert err <= 1e-5, (name, k, err.item())


@pytest.mark.parametrize("where,value", [("q", math.nan), ("k", math.inf), ("v", math.nan)], ids=["q", "k", "v"])
def test_nonfinite_inputs_window(where, value):
    g = window_geometry((12, 18), 6, True)
    C = NH * D
    qkv = torch.randn(2, g.H * g.W, 3 * C)
    t, h = 7, 0
    qkv[1, t, "qkv".index(where) * C + h * D] = value
    perm = g.token_permutation().view(g.num_windows, g.n)
    w = (perm == t).nonzero()[0, 0]
    expected = torch.zeros(2, g.H * g.W, C, dtype=torch.bool)
    channels = slice(h * D, h * D + 1) if where == "v" else slice(h * D, (h + 1) * D)  # v: its channel only
    expected[1, torch.tensor([t]) if where == "q" else perm[w], channels] = True
    tau, bias = torch.tensor([100.0, 7.0]), 16 * torch.rand(g.table_rows, NH)
    ref = G.window_attention(qkv, g, NH, tau, bias, backend="reference")
    assert torch.equal(~torch.isfinite(ref), expected)
    for name in _backends():
        out = G.window_attention(qkv, g, NH, tau, bias, backend=name)
        bad = ~torch.isfinite(out)
        assert torch.equal(bad, expected), name
        assert torch.allclose(out[~bad], ref[~bad], rtol=0, atol=2e-5), name


def _rowwise_check(a, e, x, d, label, tol):
    """Gradient ``a`` vs ``e``: vectors of ``x`` with norm <= eps on their own scale, others on theirs."""
    v = x.double().reshape(*x.shape[:-1], -1, d)
    tiny = (v.norm(dim=-1, keepdim=True) <= 1e-12).expand_as(v).reshape(x.shape)
    assert tiny.any(), label
    for sel in (tiny, ~tiny):
        diff = (a.double() - e.double())[sel].abs().max()
        scale = e.double()[sel].abs().max().clamp(min=1.0)
        assert diff / scale <= tol, (label, "tiny" if sel is tiny else "normal", (diff / scale).item())
    # the tiny vectors' gradients are huge (dx_hat / eps), not zero
    assert e.double()[tiny].abs().max() > 1e9, label


@pytest.mark.parametrize("kind", ["zero", "below_eps"])
def test_zero_and_below_eps_vectors(kind):
    """q, k and anchor vectors of norm 0 or < eps: gradient dx_hat / eps, on every backend."""
    dtype = torch.float32 if IN_INTERPRETER else torch.float64
    g, qkv, anchor, params = _stripe_inputs(B=1, dtype=torch.float64, seed=3)
    C = NH * D
    f = 0.0 if kind == "zero" else 1e-14
    qkv[0, 2, 0:D] *= f  # a query of head 0
    qkv[0, 9, C + D:C + 2 * D] *= f  # a key of head 1
    qkv[0, 17, C:C + D] *= f  # a key of head 0
    anchor.view(1, -1, C)[0, 4, D:2 * D] *= f  # an anchor of head 1
    qkv, anchor = qkv.to(dtype), anchor.to(dtype)
    params = [p.to(dtype) for p in params]
    ref_out, ref = _stripe("reference", g, qkv.double(), anchor.double(),
                           [p.double() for p in params], grad=True)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for name in [n for n in _backends(dtype) if n != "reference"]:
        out, grads = _stripe(name, g, qkv, anchor, params, grad=True)
        assert (out.double() - ref_out).abs().max() <= tol, name
        _rowwise_check(grads[0], ref[0], qkv, D, (name, "qkv"), tol)
        _rowwise_check(grads[1], ref[1], anchor, D, (name, "anchor"), tol)


@pytest.mark.parametrize("shift", [True, False])
def test_tau_100_head_dim_1_masked_rows(shift):
    """Head dim 1: cos = +-1, so tau = 100 puts masked logits (cos +1: 100 - 100 = 0) above
    unmasked ones (cos -1: -100); every row of the shifted blocks is partly masked and the
    published -100 (not -inf, not -1e4) decides the output to O(1)."""
    dtype = torch.float32 if IN_INTERPRETER else torch.float64
    g = stripe_geometry((8, 8), (4, 4), (None, None), shift, 2)
    gen = torch.Generator().manual_seed(5)
    nh = 2
    qkv = torch.randn(2, 64, 3 * nh, generator=gen, dtype=torch.float64)
    anchor = torch.randn(2, 4, 4, nh, generator=gen, dtype=torch.float64)
    params = [torch.tensor([100.0, 100.0]), torch.zeros(g.table_rows, nh), torch.tensor([100.0, 60.0]),
              torch.zeros(g.table_rows, nh)]
    leaves = [t.to(dtype).requires_grad_() for t in [qkv, anchor] + params]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = G.stripe_attention(ref_leaves[0], ref_leaves[1], g, nh, *ref_leaves[2:], backend="reference")
    ref_g = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    if shift:  # the mask constant matters: -1e4 instead of -100 changes the output by O(1)
        geo = __import__("grl_kernels.geometry", fromlist=["MASK_VALUE"])
        old, geo.MASK_VALUE = geo.MASK_VALUE, -1e4
        try:
            geo._stripe_masks.cache_clear()
            alt = G.stripe_attention(*[t.detach().double() for t in ref_leaves[:2]], g, nh,
                                     *[t.detach() for t in ref_leaves[2:]], backend="reference")
        finally:
            geo.MASK_VALUE = old
            geo._stripe_masks.cache_clear()
        assert (alt - ref).abs().max() > 0.1
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name in [n for n in _backends(dtype) if n != "reference"]:
        out = G.stripe_attention(leaves[0], leaves[1], g, nh, *leaves[2:], backend=name)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1)) <= tol, name
        for k, (a, e) in enumerate(zip(grads, ref_g)):
            err = ((a.double() - e).abs().max() / e.abs().max().clamp(min=1)).item()
            assert err <= tol, (name, k, err)


def test_logit_scale_clamp_at_ln100():
    """tau = exp(min(lambda, ln 100)): 100 past the clamp, with zero gradient there."""
    lam = torch.tensor([math.log(10.0), math.log(100.0) - 0.01, math.log(100.0) + 0.01, 6.0, 50.0],
                       dtype=torch.float64, requires_grad=True)
    from grl_kernels.functional import logit_scale_to_tau

    tau = logit_scale_to_tau(lam)
    assert torch.allclose(tau, torch.tensor([10.0, 100 * math.exp(-0.01), 100.0, 100.0, 100.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(tau.sum(), lam)
    assert torch.allclose(g, torch.tensor([10.0, 100 * math.exp(-0.01), 0.0, 0.0, 0.0], dtype=torch.float64))
    # through the module and every backend: heads past the clamp behave exactly as at it
    m = G.WindowAttention((8, 8), 4, 2, window_shift=True, backend="reference").double()
    qkv = torch.randn(1, 64, 3 * 2 * 3, dtype=torch.float64)
    outs = []
    for v in (math.log(100.0), 7.0):
        with torch.no_grad():
            m.attn_transform.logit_scale.fill_(v)
        for name in _backends(torch.float64) if not IN_INTERPRETER else []:
            m.backend = name
            outs.append(m(qkv, (8, 8)).detach())
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- 64-bit offsets
_HUGE_STRIDE_SCRIPT = textwrap.dedent("""
    import sys, torch, grl_kernels as G
    from grl_kernels.geometry import stripe_geometry, window_geometry
    nh, d = 2, 4
    C = nh * d
    g = stripe_geometry((8, 8), (4, 4), (None, None), True, 2)
    wg = window_geometry((8, 8), 4, True)
    L = 64
    sb = 2 ** 31 + 2 ** 12  # batch stride beyond int32, in elements (8 GiB of virtual storage)
    base = torch.empty(sb + L * 3 * C, dtype=torch.float32)  # untouched pages stay virtual
    huge = base.as_strided((2, L, 3 * C), (sb, 3 * C, 1))
    compact = torch.randn(2, L, 3 * C)
    huge.copy_(compact)  # touches only the used rows
    anc_base = torch.empty(sb + 16 * C, dtype=torch.float32)
    anc = anc_base.as_strided((2, 4, 4, C), (sb, 4 * C, C, 1))
    anc_c = torch.randn(2, 4, 4, C)
    anc.copy_(anc_c)
    ps = [torch.tensor([10.0, 100.0]), torch.rand(g.table_rows, nh), torch.tensor([3.0, 50.0]), torch.rand(g.table_rows, nh)]
    for backend in sys.argv[1:]:
      a = G.stripe_attention(huge, anc, g, nh, *ps, backend=backend)
      b = G.stripe_attention(compact, anc_c, g, nh, *ps, backend=backend)
      assert torch.equal(a, b), ("stripe", (a - b).abs().max().item())
      h2 = huge.detach().requires_grad_()
      a2 = anc.detach().requires_grad_()
      ga = torch.autograd.grad(G.stripe_attention(h2, a2, g, nh, *ps, backend=backend).sum(), [h2, a2])
      c2, e2 = compact.clone().requires_grad_(), anc_c.clone().requires_grad_()
      gb = torch.autograd.grad(G.stripe_attention(c2, e2, g, nh, *ps, backend=backend).sum(), [c2, e2])
      assert all(torch.equal(x, y) for x, y in zip(ga, gb)), "stripe backward"
      wt, wb = torch.tensor([10.0, 100.0]), torch.rand(wg.table_rows, nh)
      a = G.window_attention(huge, wg, nh, wt, wb, backend=backend)
      b = G.window_attention(compact, wg, nh, wt, wb, backend=backend)
      assert torch.equal(a, b), ("window", (a - b).abs().max().item())
      h3 = huge.detach().requires_grad_()
      c3 = compact.clone().requires_grad_()
      ga = torch.autograd.grad(G.window_attention(h3, wg, nh, wt, wb, backend=backend).sum(), h3)[0]
      gb = torch.autograd.grad(G.window_attention(c3, wg, nh, wt, wb, backend=backend).sum(), c3)[0]
      assert torch.equal(ga, gb), "window backward"
      print("OK", backend)
""")


@pytest.mark.skipif(IN_INTERPRETER, reason="main process only")
def test_batch_stride_beyond_int32():
    """In one subprocess, every CPU backend but Triton's interpreter: a 32-bit offset would read
    out of bounds (crash) or wrong rows."""
    backends = ["reference"] + [b for b in cpu_backends(torch.float32) if b != "triton"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _HUGE_STRIDE_SCRIPT] + backends, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    for b in backends:
        assert f"OK {b}" in r.stdout, (b, r.stdout[-2000:])


_HEADER_TEST = r"""
#include <cstdio>
#include <cstdlib>
#include "grl_geometry.h"
int main(int argc, char** argv) {
  // argv: H W sh sw shift_h shift_w down win j i
  int64_t v[10];
  for (int k = 0; k < 10; ++k) v[k] = std::strtoll(argv[k + 1], nullptr, 10);
  grl::StripeGeom g = grl::make_stripe_geom(v[0], v[1], v[2], v[3], v[4], v[5], v[6], 1);
  grl::WindowGeom w = grl::make_window_geom(v[0], v[1], v[2], v[4]);
  std::printf("%lld %lld %lld\n", (long long)grl::stripe_token_position(g, v[7], v[8]),
              (long long)grl::stripe_anchor_position(g, v[7], v[9]), (long long)grl::window_token_position(w, v[7], v[8]));
  return 0;
}
"""


@pytest.mark.skipif(IN_INTERPRETER, reason="main process only")
def test_geometry_header_positions_are_64_bit(tmp_path):
    """The header's position helpers on a 2^17 x 2^17 grid (2^34 tokens): exact, as geometry.py."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "t.cpp"
    src.write_text(_HEADER_TEST)
    exe = tmp_path / "t"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", str(src), "-o", str(exe)],
                   check=True, timeout=120)
    H = W = 2 ** 17
    g = stripe_geometry((H, W), (2 ** 14, 2 ** 13), (None, None), True, 4)
    wg = window_geometry((H, W), 2 ** 14, True)
    tps = []
    for win, j, i in [(g.num_windows - 1, g.n1 - 1, g.n2 - 1), (g.num_windows // 2 + 3, g.n1 // 2 + 7, 12345),
                      (5, 2 ** 26 + 11, 2 ** 22 + 5)]:
        out = subprocess.run([str(exe)] + [str(a) for a in [H, W, g.sh, g.sw, g.shift_h, g.shift_w, g.down, win, j, i]],
                             capture_output=True, text=True, check=True).stdout
        tp, ap, _ = (int(s) for s in out.split())
        assert tp == g.token_position(win, j)
        tps.append(tp)
        assert ap == g.anchor_position(win, i)
        ww, wj = win % wg.num_windows, j % wg.n
        out = subprocess.run([str(exe)] + [str(a) for a in [H, W, wg.ws, wg.ws, wg.shift, wg.shift, 1, ww, wj, 0]],
                             capture_output=True, text=True, check=True).stdout
        assert int(out.split()[2]) == wg.token_position(ww, wj)
    assert max(tps) >= 2 ** 33  # beyond 32 bits


@pytest.mark.skipif(IN_INTERPRETER or os.environ.get("GRL_FUZZ_INTERPRETER", "1") == "0",
                    reason="driver (main process); GRL_FUZZ_INTERPRETER=0 skips it")
def test_hostile_values_triton_interpreter():
    """Runs this file's cases on the Triton backend in a TRITON_INTERPRET=1 subprocess."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    # a subset of 8: each case costs 10-30 s of interpreter time (all 14 pass; GRL_HOSTILE_INTERP_ALL=1)
    subset = [] if os.environ.get("GRL_HOSTILE_INTERP_ALL") == "1" else ["-k", INTERP_SUBSET]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(pathlib.Path(__file__))] + subset
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(r.stdout[-6000:])
    assert r.returncode == 0, f"interpreter run failed (rc {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 5, r.stdout[-2000:]


INTERP_SUBSET = "stripe and (q-nan or anchor-inf) or inputs_window or vectors or masked_rows and True"
