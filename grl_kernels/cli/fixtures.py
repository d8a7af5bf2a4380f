"""Checks of the reference path (and every float32 CPU backend) against the fixtures
produced by the published GRL code (GRL_ATTENTION_SPEC.md section 7).

Fixture files: golden_stripe_attention.pt (anchored-stripe module state, inputs,
output, output gradient and all gradients) and golden_grl_model.pt (a small GRL's
kwargs, state_dict, input and output). The whole-model fixture needs
``grl_kernels.models``; without it that row is skipped with a note.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional

import torch

from ..backends import registry
from ..bench.compare import errors
from .check import Row

# The fixtures are float32 results of the published code; ours follows the same order of
# operations, so differences are float32 rounding: measured ~1e-6 relative for the
# attention (outputs and gradients) and ~1e-6 for the model. 1e-4 is generous for
# rounding yet far below any semantic error (wrong shift/mask/index give > 1e-2).
FIXTURE_TOL = 1e-4


def default_fixture_dir() -> Optional[str]:
    """The fixture folder: $GRL_FIXTURES, else ../shared/reference next to the repository,
    else the copy in the repository's tests/fixtures; None when none exists (installed package)."""
    env = os.environ.get("GRL_FIXTURES")
    if env and os.path.isdir(env):
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cand in (os.path.join(repo, "..", "shared", "reference"), os.path.join(repo, "shared", "reference"),
                 os.path.join(repo, "tests", "fixtures")):
        if os.path.isfile(os.path.join(cand, "golden_stripe_attention.pt")):
            return os.path.normpath(cand)
    return None


def _stripe_fixture_rows(path: str, backends: List[str]) -> List[Row]:
    from ..modules import AnchoredStripeAttention

    data = torch.load(path, map_location="cpu", weights_only=False)
    rows = []
    for k, c in enumerate(data["cases"]):
        size, groups = list(c["stripe_size"]), list(c["stripe_groups"])
        if c.get("stripe_type", "H") == "W":  # vertical blocks reverse the model's configuration
            size, groups = size[::-1], groups[::-1]
        label = f"fixture stripe #{k} {c['x_size'][0]}x{c['x_size'][1]} {c.get('stripe_type', 'H')}"
        for name in backends:
            row = Row(name, "cpu", "float32", label, tol=FIXTURE_TOL, bwd_tol=FIXTURE_TOL, param_tol=FIXTURE_TOL)
            t0 = time.perf_counter()
            try:
                m = AnchoredStripeAttention(
                    c["x_size"], size, groups, c["stripe_shift"], c["num_heads"],
                    anchor_window_down_factor=c["anchor_window_down_factor"], backend=name,
                )
                m.load_state_dict(c["state_dict"])
                qkv = c["qkv"].clone().requires_grad_(True)
                anchor = c["anchor"].clone().requires_grad_(True)
                out = m(qkv, anchor, tuple(c["x_size"]))
                out.backward(c["grad_output"])
                row.fwd_abs, row.fwd_rel = errors(out, c["output"])
                grads = {"qkv": (qkv.grad, c["grad_qkv"]), "anchor": (anchor.grad, c["grad_anchor"])}
                params = dict(m.named_parameters())
                worst = -1.0
                for gn, (g, e) in grads.items():
                    a, r = errors(g, e)
                    if r > worst:
                        worst, row.bwd_abs, row.bwd_rel, row.worst_grad = r, a, r, gn
                worst = -1.0
                for pn, e in c["grad_params"].items():
                    r = errors(params[pn].grad, e)[1]
                    if r > worst:
                        worst, row.param_rel, row.worst_param = r, r, pn
                row.status = "PASS" if max(row.fwd_rel, row.bwd_rel, row.param_rel) <= row.tol else "FAIL"
            except Exception as exc:  # noqa: BLE001
                row.status, row.note = "ERROR", f"{type(exc).__name__}: {exc}"[:200]
            row.seconds = time.perf_counter() - t0
            rows.append(row)
    return rows


def _model_fixture_rows(path: str, backends: List[str]) -> List[Row]:
    label = "fixture GRL model 40x44 x2"
    try:
        from .. import models
        GRL = models.GRL
    except Exception as exc:  # noqa: BLE001
        return [Row("reference", "cpu", "float32", label, status="SKIP", note=f"grl_kernels.models not available ({exc})")]
    data = torch.load(path, map_location="cpu", weights_only=False)
    rows = []
    for name in backends:
        row = Row(name, "cpu", "float32", label, tol=FIXTURE_TOL, bwd_tol=FIXTURE_TOL, param_tol=FIXTURE_TOL)
        t0 = time.perf_counter()
        try:
            model = GRL(**data["kwargs"])
            missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
            if missing:
                raise AssertionError(f"state_dict misses {len(missing)} keys, e.g. {missing[:3]}")
            model.eval()
            from ..backends import use_backend

            with torch.no_grad(), use_backend(name):
                out = model(data["input"])
            row.fwd_abs, row.fwd_rel = errors(out, data["output"])
            row.status = "PASS" if row.fwd_rel <= row.tol else "FAIL"
            row.note = "forward only"
        except Exception as exc:  # noqa: BLE001
            row.status, row.note = "ERROR", f"{type(exc).__name__}: {exc}"[:200]
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    return rows


def fixture_rows(folder: str, backends: Optional[List[str]] = None, quick: bool = True) -> List[Row]:
    """Rows for the fixtures in ``folder``; the reference always, other CPU float32 backends too."""
    if backends is None:
        backends = [n for n in registry.available_backends()
                    if registry._REGISTRY[n].supports(torch.device("cpu"), torch.float32)]
    if "reference" not in backends:
        backends = ["reference"] + list(backends)
    rows = []
    p = os.path.join(folder, "golden_stripe_attention.pt")
    if os.path.exists(p):
        rows += _stripe_fixture_rows(p, backends)
    else:
        rows.append(Row("reference", "cpu", "float32", "fixture stripe", status="SKIP", note=f"{p} not found"))
    p = os.path.join(folder, "golden_grl_model.pt")
    if os.path.exists(p):
        rows += _model_fixture_rows(p, backends)
    else:
        rows.append(Row("reference", "cpu", "float32", "fixture GRL model", status="SKIP", note=f"{p} not found"))
    return rows
