"""The attention microbenchmark behind ``grl-kernels bench``.

For every case and implementation (fused backends from the registry plus the
baselines of :mod:`grl_kernels.bench.baselines`): check the forward output against
the float64 reference on the same inputs, then time the forward (no_grad, inference)
and the forward+backward, measure their peak memory, and derive GFLOP/s and GB/s
(:mod:`grl_kernels.bench.counts`) as fractions of the ceilings measured in the same run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..backends import registry
from . import baselines as BL
from .cases import Case, call_backend, make_inputs
from .compare import errors, tolerance
from .counts import bytes_moved, flops
from .progress import Progress
from .timing import peak_memory, time_fn


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    reps: int = 10
    warmup: int = 2
    max_seconds: float = 5.0  # per timed measurement
    backward: bool = True
    backends: Optional[Sequence[str]] = None  # None: every available fused backend for device/dtype
    baselines: Sequence[str] = ("reference", "compile", "flex")
    quick: bool = False


def fused_backends(device: str, dtype: torch.dtype, names: Optional[Sequence[str]] = None) -> List:
    """Registry backends (other than "reference") that run ``dtype`` on ``device`` here."""
    out = []
    for n in registry.available_backends() if names is None else names:
        if n not in registry._REGISTRY:
            raise ValueError(f"--backend: unknown backend {n!r}; registered: {registry.registered_backends()}")
        if n == "reference" and names is None:
            continue
        b = registry._REGISTRY[n]
        if b.availability()[0] and b.supports(torch.device(device), dtype):
            out.append(b)
    return out


def _impls(cfg: BenchConfig):
    impls = []
    for name in cfg.baselines:
        if name == "flex" and BL.flex_available():
            continue
        impls.append(BL.make_baselines([name])[0])
    have = {i.name for i in impls}
    impls += [b for b in fused_backends(cfg.device, cfg.dtype, cfg.backends) if b.name not in have]
    return impls


def _supports_backward(impl, device) -> bool:
    return impl.supports_backward(device) if isinstance(impl, BL.Baseline) else True


def bench_case(case: Case, impls, cfg: BenchConfig, progress: Optional[Progress] = None) -> List[Dict]:
    dev = cfg.device
    src = make_inputs(case, torch.float32, "cpu", seed=0)
    inp = make_inputs(case, cfg.dtype, dev, source=src, requires_grad=True)
    truth = make_inputs(case, torch.float64, dev, source=inp)
    with torch.no_grad():
        expected = call_backend(BL.ReferenceBaseline(), case, truth)
    gout = torch.randn(case.batch, case.H * case.W, case.channels, device=dev).to(cfg.dtype)
    leaves = list(inp.leaves().values())
    ftol = tolerance(cfg.dtype)[0]
    rows = []
    for impl in impls:
        if progress:
            progress.step(f"{impl.name}: {case.describe()}")
        r = {"case": case.name, "geometry": case.describe(), "impl": impl.name, "device": dev,
             "dtype": str(cfg.dtype).replace("torch.", ""), "status": "ok", "note": ""}
        try:
            t_first = time.perf_counter()
            with torch.no_grad():
                out = call_backend(impl, case, inp)
            r["first_call_s"] = time.perf_counter() - t_first  # includes compilation for compiled impls
            _, rel = errors(out, expected)
            r["max_rel_err"] = rel
            if not rel <= ftol:
                r["status"], r["note"] = "wrong", f"output differs from the reference: rel err {rel:.2e} > {ftol:.0e}"
                rows.append(r)
                continue

            def fwd():
                with torch.no_grad():
                    return call_backend(impl, case, inp)

            t = time_fn(fwd, dev, cfg.reps, cfg.warmup, cfg.max_seconds)
            r["fwd_ms"], r["fwd_min_ms"] = t.median_s * 1e3, t.min_s * 1e3
            r["fwd_peak_mib"] = peak_memory(fwd, dev) / 2 ** 20
            r["fwd_gflops"] = flops(case) / t.median_s / 1e9
            r["fwd_gbps"] = bytes_moved(case, cfg.dtype) / t.median_s / 1e9
            if cfg.backward and _supports_backward(impl, dev):
                def fwd_bwd():
                    o = call_backend(impl, case, inp)
                    return torch.autograd.grad(o, leaves, gout, allow_unused=True)

                try:  # a failing backward keeps the forward numbers
                    tb = time_fn(fwd_bwd, dev, cfg.reps, cfg.warmup, cfg.max_seconds)
                    r["fwdbwd_ms"], r["fwdbwd_min_ms"] = tb.median_s * 1e3, tb.min_s * 1e3
                    r["fwdbwd_peak_mib"] = peak_memory(fwd_bwd, dev) / 2 ** 20
                    r["fwdbwd_gflops"] = flops(case, True) / tb.median_s / 1e9
                    r["fwdbwd_gbps"] = bytes_moved(case, cfg.dtype, True) / tb.median_s / 1e9
                except Exception as exc:  # noqa: BLE001
                    r["note"] = f"backward failed: {type(exc).__name__}: {exc}"[:200]
            elif cfg.backward:
                r["note"] = "forward only on this device"
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
            r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:200]
        rows.append(r)
    # speed-ups relative to the reference path of the same case
    ref = next((x for x in rows if x["impl"] == "reference" and x["status"] == "ok"), None)
    for x in rows:
        if ref is not None and x["status"] == "ok":
            x["fwd_speedup"] = ref["fwd_ms"] / x["fwd_ms"]
            if "fwdbwd_ms" in x and "fwdbwd_ms" in ref:
                x["fwdbwd_speedup"] = ref["fwdbwd_ms"] / x["fwdbwd_ms"]
    return rows


def run_bench(cases: Sequence[Case], cfg: BenchConfig, show_progress: bool = True) -> List[Dict]:
    impls = _impls(cfg)
    rows: List[Dict] = []
    with Progress(len(cases) * len(impls), "bench", enabled=show_progress) as prog:
        try:
            for c in cases:
                rows += bench_case(c, impls, cfg, prog)
        except KeyboardInterrupt:  # keep what was measured (SIGTERM under grl-kernels, Ctrl-C)
            rows.append({"case": "(interrupted)", "geometry": "(interrupted)", "impl": "-", "status": "error",
                         "note": "interrupted: the remaining cases were not run"})
    return rows


def add_ceiling_fractions(rows: List[Dict], ceilings: Dict) -> None:
    for r in rows:
        for k in ("fwd", "fwdbwd"):
            if f"{k}_gflops" in r:
                r[f"{k}_flops_frac"] = r[f"{k}_gflops"] / ceilings["matmul_gflops"]
                r[f"{k}_bw_frac"] = r[f"{k}_gbps"] / ceilings["copy_gbps"]


TABLE_COLUMNS = [
    ("case", "geometry"), ("impl", "impl"), ("fwd ms", "fwd_ms"), ("fwd x", "fwd_speedup"),
    ("fwd MiB", "fwd_peak_mib"), ("fwd GF/s", "fwd_gflops"), ("fwd GB/s", "fwd_gbps"),
    ("f+b ms", "fwdbwd_ms"), ("f+b x", "fwdbwd_speedup"), ("f+b MiB", "fwdbwd_peak_mib"),
    ("f+b GF/s", "fwdbwd_gflops"), ("%peak F", "fwd_flops_frac"), ("%peak BW", "fwd_bw_frac"),
    ("err", "max_rel_err"), ("status", "status"),
]


def table_rows(rows: List[Dict]):
    headers = [h for h, _ in TABLE_COLUMNS]
    out = []
    for r in rows:
        line = []
        for h, k in TABLE_COLUMNS:
            v = r.get(k)
            if k.endswith("_frac") and v is not None:
                v = f"{100 * v:.1f}%"
            if k == "status" and r.get("note"):
                v = f"{v} ({r['note']})"
            line.append(v)
        out.append(line)
    return headers, out
