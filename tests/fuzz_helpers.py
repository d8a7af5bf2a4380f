"""Shared pieces of the property-based tests (tests/test_fuzz.py): case strategies, input
builders, the error measure and a statistics recorder.

A drawn case is a plain dict of small ints/flags plus a seed; tensors are made from the seed
with torch's generator (hypothesis shrinks the dict, torch makes the numbers), so an example
is reproducible from its printed dict alone.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

import torch
from hypothesis import strategies as st

import grl_kernels as G
from grl_kernels.backends import registry

LN100 = math.log(100.0)
EPS = 1e-12  # F.normalize's eps

# logit scales lambda (tau = exp(min(lambda, ln 100))): the published init ln 10, values around
# the clamp (just below, exactly at, past it) and small ones; taus therefore span 0.37 .. 100.
LOGIT_SCALES = [-1.0, 0.0, 1.0, math.log(10.0), 3.0, 4.0, LN100 - 1e-3, LN100, LN100 + 0.2, 6.0]


def cpu_backends(dtype: torch.dtype) -> List[str]:
    """Every available non-reference backend that takes CPU tensors of ``dtype`` (generic:
    "cpu" today, an emulated "cuda" or the Triton interpreter when those take CPU tensors)."""
    cpu = torch.device("cpu")
    return [n for n in G.available_backends()
            if n != "reference" and registry._REGISTRY[n].supports(cpu, dtype)]


# ---------------------------------------------------------------------------- strategies
def _head_dims(max_d: int):
    # odd and even, 1 included; small ones (where cos is often +-1) drawn more often
    return st.one_of(st.integers(1, min(8, max_d)), st.integers(1, max_d))


@st.composite
def stripe_cases(draw, max_d: int = 64, max_tokens: int = 256, max_batch: int = 3):
    f = draw(st.sampled_from([1, 2, 4]))
    dims = []
    for _ in range(2):
        k = draw(st.integers(1, 3 if f < 4 else 2))  # anchors per window along this dimension
        s = f * k  # stripe (odd when f = 1 and k = 3)
        nw = draw(st.integers(1, 3))  # windows along this dimension
        use_groups = draw(st.booleans())
        dims.append((s, nw, use_groups))
    H, W = dims[0][0] * dims[0][1], dims[1][0] * dims[1][1]
    if H * W > max_tokens:  # keep examples cheap: fall back to one window per dimension
        dims = [(s, 1, g) for s, _, g in dims]
        H, W = dims[0][0], dims[1][0]
    stripe_size = tuple(None if g else s for s, _, g in dims)
    stripe_groups = tuple(nw if g else None for s, nw, g in dims)
    nh = draw(st.integers(1, 4))
    return dict(
        kind="stripe", B=draw(st.integers(1, max_batch)), x_size=(H, W), stripe_size=stripe_size,
        stripe_groups=stripe_groups, shift=draw(st.booleans()), f=f, nh=nh, d=draw(_head_dims(max_d)),
        qkv_layout=draw(st.sampled_from(["contiguous", "channel_slice", "batch_inner"])),
        anchor_layout=draw(st.sampled_from(["contiguous", "permuted", "channel_slice"])),
        lam1=draw(st.lists(st.sampled_from(LOGIT_SCALES), min_size=nh, max_size=nh)),
        lam2=draw(st.lists(st.sampled_from(LOGIT_SCALES), min_size=nh, max_size=nh)),
        special=draw(st.sampled_from(["none", "none", "zero_rows", "tiny_rows"])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@st.composite
def window_cases(draw, max_d: int = 64, max_tokens: int = 256, max_batch: int = 3):
    ws = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7]))  # mostly not powers of two
    nwh, nww = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    while ws * ws * nwh * nww > max_tokens and (nwh > 1 or nww > 1):
        nwh, nww = max(1, nwh - 1), max(1, nww - 1)
    nh = draw(st.integers(1, 4))
    return dict(
        kind="window", B=draw(st.integers(1, max_batch)), x_size=(ws * nwh, ws * nww), ws=ws,
        shift=draw(st.booleans()), nh=nh, d=draw(_head_dims(max_d)),
        qkv_layout=draw(st.sampled_from(["contiguous", "channel_slice", "batch_inner"])),
        lam1=draw(st.lists(st.sampled_from(LOGIT_SCALES), min_size=nh, max_size=nh)),
        special=draw(st.sampled_from(["none", "none", "zero_rows", "tiny_rows"])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


# ---------------------------------------------------------------------------- inputs
def _layout_qkv(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values as (B, L, 3C) ``x`` in another memory layout."""
    B, L, C3 = x.shape
    if layout == "channel_slice":  # [other | qkv | other] channels of a wider projection
        wide = torch.randn(B, L, C3 + 7, dtype=x.dtype, generator=gen)
        wide[..., 3:3 + C3] = x
        return wide[..., 3:3 + C3]
    if layout == "batch_inner":  # stored (L, B, 3C): batch stride < row stride
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _layout_anchor(a: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    B, Ha, Wa, C = a.shape
    if layout == "permuted":  # stored (B, C, Ha, Wa): channel stride Ha * Wa
        return a.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    if layout == "channel_slice":
        wide = torch.randn(B, Ha, Wa, C + 5, dtype=a.dtype, generator=gen)
        wide[..., 2:2 + C] = a
        return wide[..., 2:2 + C]
    return a


def _special_rows(x: torch.Tensor, special: str, d: int, gen: torch.Generator, rows: int = 2) -> None:
    """Set a few head vectors (last dim chunks of width d) to 0 or to a norm below eps, in place."""
    if special == "none":
        return
    flat = x.view(-1, x.shape[-1] // d, d)
    n = flat.shape[0]
    for _ in range(rows):
        r = int(torch.randint(n, (1,), generator=gen))
        h = int(torch.randint(flat.shape[1], (1,), generator=gen))
        flat[r, h] = 0 if special == "zero_rows" else flat[r, h] * 3e-14


def make_inputs(case: Dict, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Float64 master values (activations already rounded to ``dtype``), in the case's layouts."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, (H, W), nh, d = case["B"], case["x_size"], case["nh"], case["d"]
    C = nh * d
    qkv = torch.randn(B, H * W, 3 * C, dtype=torch.float64, generator=gen)
    _special_rows(qkv, case["special"], d, gen, rows=3)  # lands in q, k or v
    qkv = qkv.to(dtype).double()
    out = dict(qkv=qkv)
    if case["kind"] == "stripe":
        f = case["f"]
        anchor = torch.randn(B, H // f, W // f, C, dtype=torch.float64, generator=gen)
        _special_rows(anchor, case["special"], d, gen)
        out["anchor"] = anchor.to(dtype).double()
        g = G.stripe_geometry(case["x_size"], case["stripe_size"], case["stripe_groups"], case["shift"], f)
        rows = g.table_rows
        out["logit_scale2"] = torch.tensor(case["lam2"], dtype=torch.float64).view(nh, 1, 1)
        out["bias_table2"] = 16 * torch.sigmoid(2 * torch.randn(rows, nh, dtype=torch.float64, generator=gen))
    else:
        rows = (2 * case["ws"] - 1) ** 2
    out["logit_scale1"] = torch.tensor(case["lam1"], dtype=torch.float64).view(nh, 1, 1)
    out["bias_table1"] = 16 * torch.sigmoid(2 * torch.randn(rows, nh, dtype=torch.float64, generator=gen))
    out["grad_out"] = torch.randn(B, H * W, C, dtype=torch.float64, generator=gen)
    return out


PARAMS = ("logit_scale1", "bias_table1", "logit_scale2", "bias_table2")


def run_case(case: Dict, values: Dict[str, torch.Tensor], backend: str, dtype: torch.dtype):
    """Output and gradients of every input through the functional API of ``backend``.

    Activations in ``dtype`` in the case's memory layouts; parameters in ``dtype``, except
    float32 for 16-bit activations (how a mixed-precision model holds them)."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    qkv = _layout_qkv(values["qkv"].to(dtype), case["qkv_layout"], gen).requires_grad_()
    leaves = {"qkv": qkv}
    for k in PARAMS:
        if k in values:
            leaves[k] = values[k].to(pdt).requires_grad_()
    if case["kind"] == "stripe":
        leaves["anchor"] = _layout_anchor(values["anchor"].to(dtype), case["anchor_layout"], gen).requires_grad_()
        out = G.anchored_stripe_attention(
            qkv, leaves["anchor"], case["x_size"], list(case["stripe_size"]), list(case["stripe_groups"]),
            case["shift"], case["nh"], leaves["logit_scale1"], leaves["bias_table1"], leaves["logit_scale2"],
            leaves["bias_table2"], case["f"], backend=backend,
        )
    else:
        out = G.grl_window_attention(qkv, case["x_size"], case["ws"], case["shift"], case["nh"],
                                     leaves["logit_scale1"], leaves["bias_table1"], backend=backend)
    assert out.dtype == dtype and out.shape == values["grad_out"].shape
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], values["grad_out"].to(dtype))
    res = {"out": out.detach()}
    res.update({k: g for k, g in zip(names, grads)})
    for k, g in zip(names, grads):
        assert g.shape == leaves[k].shape, k
    return res


# ---------------------------------------------------------------------------- errors
def _scaled(a: torch.Tensor, e: torch.Tensor, floor: float = 1.0, weight=None) -> float:
    """max |a - e| * weight / max(floor, max |e|): absolute for O(1) tensors, relative for large
    ones. A gradient that is zero in exact arithmetic (one anchor per window, head dim 1) is
    then measured absolutely: it must come out near zero, not just match the reference's noise."""
    if a.numel() == 0:
        return 0.0
    diff = (a - e).abs()
    if not torch.isfinite(diff).all():
        return math.inf
    if weight is not None:
        diff = diff * weight
    return (diff.max() / e.abs().max().clamp(min=floor)).item()


def _vector_norms(x: torch.Tensor, d: int) -> torch.Tensor:
    """Norm of the head vector (last-dim chunk of width d) of every element of ``x``."""
    v = x.double().reshape(*x.shape[:-1], -1, d)
    return v.norm(dim=-1, keepdim=True).expand_as(v).reshape(x.shape)


def _normalized_weight(k: str, x: torch.Tensor, d: int) -> torch.Tensor:
    """min(1, |x|) for elements of normalized vectors (q, k, anchors), 1 for v.

    The gradient through x_hat = x / |x| carries a factor 1 / |x|, so rounding noise of any
    implementation is amplified by it (with head dim 1 the exact gradient is 0 and the result
    is that noise alone); errors of a short vector are therefore counted in units of 1 / |x|."""
    w = _vector_norms(x, d).clamp(max=1.0)
    if k == "qkv":  # (B, L, [q | k | v]): v is not normalized
        w = w.clone()
        w[..., 2 * (x.shape[-1] // 3):] = 1.0
    return w


def errors(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], values, case) -> Dict[str, float]:
    """Scaled error of every tensor (see _scaled and _normalized_weight). The gradient of a
    vector with norm <= eps is dx_hat / eps (~1e12): those vectors are measured on their own
    scale (floor 1 / eps: where dx_hat is zero in exact arithmetic, its rounding noise is
    multiplied by 1e12 in any implementation) and reported as "<name>@tiny", the rest on theirs
    (floor 1), so neither hides an error of the other."""
    errs = {}
    for k, e in want.items():
        a = got[k].detach().double()
        e = e.detach().double()
        if k in ("qkv", "anchor"):
            x = values[k]
            tiny = _vector_norms(x, case["d"]) <= EPS
            w = _normalized_weight(k, x, case["d"])
            errs[k] = _scaled(a[~tiny], e[~tiny], weight=w[~tiny])
            if tiny.any():
                errs[k + "@tiny"] = _scaled(a[tiny], e[tiny], 1.0 / EPS)
        elif k.startswith("logit_scale"):
            # d lambda = tau * sum(dS * cos): its rounding noise grows with tau, so it is
            # measured against max(1, tau) (tau = exp(min(lambda, ln 100)))
            tau = values[k].clamp(max=LN100).exp().max().item()
            errs[k] = _scaled(a, e, floor=max(1.0, tau))
        else:
            errs[k] = _scaled(a, e)
    return errs


# ---------------------------------------------------------------------------- statistics
class Stats:
    """Worst errors per (backend, dtype, kind, tensor); written as JSON when GRL_FUZZ_STATS names a file."""

    def __init__(self):
        self.count: Dict[str, int] = {}
        self.worst: Dict[str, Dict[str, float]] = {}
        self.where: Dict[str, Dict[str, str]] = {}

    def add(self, key: str, errs: Dict[str, float], ratios: Optional[Dict[str, float]] = None, case=None) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        w = self.worst.setdefault(key, {})
        at = self.where.setdefault(key, {})
        for k, v in list(errs.items()) + [("ratio_" + k, v) for k, v in (ratios or {}).items()]:
            if v > w.get(k, -1.0):
                w[k] = v
                at[k] = repr(case)

    def dump(self) -> None:
        path = os.environ.get("GRL_FUZZ_STATS")
        if not path:
            return
        old = {}
        if os.path.exists(path):
            with open(path) as fh:
                old = json.load(fh)
        old.update({k: dict(examples=self.count[k], worst=self.worst[k], where=self.where[k]) for k in self.count})
        with open(path, "w") as fh:
            json.dump(old, fh, indent=1, sort_keys=True)
