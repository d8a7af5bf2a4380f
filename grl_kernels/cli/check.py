"""``grl-kernels check``: every available backend against the reference path.

For each backend, device it handles here, dtype it supports and case: run forward and
backward on random inputs (qkv a strided channel slice, as in GRL) and compare the
output and the gradients of qkv, anchor, tau and bias tables with the float64 reference
on the same rounded inputs (see :mod:`grl_kernels.bench.compare`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..backends import registry
from ..bench.cases import Case, Inputs, call_backend, full_check_cases, make_inputs, quick_check_cases
from ..bench.compare import errors, tolerance
from ..reference import stripe_attention_reference, window_attention_reference


@dataclass
class Row:
    """One line of the check table."""

    backend: str
    device: str
    dtype: str
    case: str
    fwd_abs: float = float("nan")
    fwd_rel: float = float("nan")
    bwd_abs: float = float("nan")
    bwd_rel: float = float("nan")
    worst_grad: str = ""
    param_rel: float = float("nan")  # worst gradient of tau / bias tables
    worst_param: str = ""
    param_tol: Optional[float] = None  # None: reported, not judged (low precision)
    tol: float = float("nan")  # limit on fwd_rel
    bwd_tol: float = float("nan")  # limit on bwd_rel
    status: str = "PASS"  # PASS / FAIL / ERROR / SKIP
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")

    def as_dict(self) -> Dict:
        return dict(self.__dict__)


class _Ref:
    stripe = staticmethod(stripe_attention_reference)
    window = staticmethod(window_attention_reference)


def _run(backend, case: Case, inp: Inputs, gout: torch.Tensor, backward: bool):
    out = call_backend(backend, case, inp)
    grads = {}
    if backward:
        leaves = inp.leaves()
        names = list(leaves)
        gs = torch.autograd.grad(out, [leaves[n] for n in names], gout.to(out.device, out.dtype), allow_unused=True)
        grads = {n: g for n, g in zip(names, gs)}
    return out, grads


def check_one(backend, case: Case, dtype: torch.dtype, device: str, backward: bool = True, seed: int = 0) -> Row:
    """Compare ``backend`` with the float64 reference on one case (never raises)."""
    name = getattr(backend, "name", "?")
    ftol, btol, ptol = tolerance(dtype)
    row = Row(name, device, str(dtype).replace("torch.", ""), case.name, tol=ftol, bwd_tol=btol, param_tol=ptol)
    t0 = time.perf_counter()
    try:
        src = make_inputs(case, torch.float32, "cpu", seed=seed)
        inp = make_inputs(case, dtype, device, source=src, requires_grad=backward)
        truth_in = make_inputs(case, torch.float64, "cpu", source=inp, requires_grad=backward)
        gen = torch.Generator().manual_seed(seed + 1)
        gout = torch.randn(case.batch, case.H * case.W, case.channels, generator=gen, dtype=torch.float64)
        ref_out, ref_grads = _run(_Ref, case, truth_in, gout, backward)
        out, grads = _run(backend, case, inp, gout, backward)
        if out.dtype != dtype or out.shape != ref_out.shape:
            raise AssertionError(f"output is {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(ref_out.shape)}")
        row.fwd_abs, row.fwd_rel = errors(out, ref_out)
        worst, worst_p = -1.0, -1.0
        for n, g in grads.items():
            if g is None:
                raise AssertionError(f"no gradient for {n}")
            a, r = errors(g, ref_grads[n])
            if n.startswith(("scale", "bias")):
                if r > worst_p:
                    worst_p, row.param_rel, row.worst_param = r, r, n
            elif r > worst:
                worst, row.bwd_abs, row.bwd_rel, row.worst_grad = r, a, r, n
        ok = row.fwd_rel <= row.tol
        if backward:
            ok = ok and row.bwd_rel <= row.bwd_tol and (row.param_tol is None or row.param_rel <= row.param_tol)
        row.status = "PASS" if ok else "FAIL"
    except Exception as exc:  # a crash is a failed row, reported, not a traceback
        row.status, row.note = "ERROR", f"{type(exc).__name__}: {exc}"[:200]
    row.seconds = time.perf_counter() - t0
    return row


_DTYPE_ORDER = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _devices_here() -> List[str]:
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def plan(backends: Optional[Sequence[str]] = None, quick: bool = True, devices: Optional[Sequence[str]] = None,
         dtypes: Optional[Sequence[torch.dtype]] = None, cases: Optional[List[Case]] = None):
    """[(backend object, device, dtype, case)] to check, and notes about what is skipped."""
    notes = []
    names = list(backends) if backends else [n for n, ok, _ in registry.backend_info()]
    devs = list(devices) if devices else _devices_here()
    cs = cases if cases is not None else (quick_check_cases() if quick else full_check_cases())
    work = []
    for n in names:
        if n not in registry._REGISTRY:
            raise ValueError(f"--backend: unknown backend {n!r}; registered: {registry.registered_backends()}")
        b = registry._REGISTRY[n]
        ok, why = b.availability()
        if not ok:
            notes.append(f"backend {n}: not available ({why})")
            continue
        for dev in devs:
            if dev not in b.devices:
                continue
            wanted = dtypes or [t for t in _DTYPE_ORDER if t in b.dtypes]
            for dt in wanted:
                if dt not in b.dtypes:
                    continue
                if dt == torch.float64 and (n == "reference" or (quick and not dtypes)):
                    continue  # the float64 reference is the ground truth; other float64 rows with --full
                for c in cs:
                    work.append((b, dev, dt, c))
    return work, notes


def run_checks(work, backward: bool = True, progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Rows for ``work``; an interruption (Ctrl-C, or SIGTERM under ``grl-kernels``) ends the run
    early with an ERROR row saying how much was not run, keeping the rows already computed."""
    rows = []
    try:
        for b, dev, dt, c in work:
            if progress:
                progress(f"{b.name} {dev} {str(dt).replace('torch.', '')} {c.name}")
            rows.append(check_one(b, c, dt, dev, backward))
    except KeyboardInterrupt:
        rows.append(Row("-", "-", "-", "(interrupted)", status="ERROR",
                        note=f"interrupted: {len(work) - len(rows)} of {len(work)} checks not run"))
    return rows
