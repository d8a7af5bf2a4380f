"""Whole-model benchmark (``grl-kernels bench-model``): GRL-T/S/B inference on an image and
one training step, for these runs of the same weights:

- ``published``: the published network (spandrel's copy, when installed), eager; with
  ``compile``, also ``published+compile`` (``torch.compile``, inference only);
- ``reference`` and each fused backend: our model, eager; with ``compile``, ``<backend>+compile``;
- with ``optimize``, ``optimize()``: :func:`grl_kernels.optimize` with its own dtype choice.

Each backend is selected with :func:`grl_kernels.use_backend` around the model call (the
model's attention modules use the default backend). Low precision runs under
``torch.autocast`` (``optimize()`` converts the weights instead). Every output is checked
against the first run's before timing. Ratios: over our reference-attention model (``x ref``),
over the published model eager and compiled (``x pub``, ``x pub-c``); peak memory of inference
over the published model's (``MiB/pub``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..backends import use_backend
from .compare import errors
from .progress import Progress
from .runner import fused_backends
from .timing import peak_memory, time_fn

PRESET_ALIASES = {"GRL-T": "grl_t", "GRL-S": "grl_s", "GRL-B": "grl_b", "T": "grl_t", "S": "grl_s", "B": "grl_b"}

# model-level tolerance of a fused backend vs the reference (relative to the output's max):
# float32 errors of 1e-6 per attention call grow through tens of residual blocks; 1e-3 bounds
# that with margin. Under autocast both paths round differently at every layer: 5e-2.
MODEL_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _models():
    try:
        from .. import models
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            f"the whole-model benchmark needs grl_kernels.models, which cannot be imported here ({exc})"
        ) from exc
    return models


def build_model(preset: str, device, task: Optional[str] = None):
    models = _models()
    name = PRESET_ALIASES.get(preset, preset)
    return models.build_preset(name, task=task).to(device)


@dataclass
class ModelBenchConfig:
    presets: Sequence[str] = ("GRL-T", "GRL-S", "GRL-B")
    sizes: Sequence[int] = (256, 512)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch: int = 1
    reps: int = 3
    warmup: int = 1          # calls before timing, after the first (checked) call
    max_seconds: float = 20.0
    train: bool = True
    backends: Optional[Sequence[str]] = None
    task: Optional[str] = None
    published: bool = True   # spandrel's copy of the published network, eager (when installed)
    reference: bool = True   # our model with the reference attention
    compile: bool = False    # torch.compile variants: published+compile, <backend>+compile
    optimize: bool = False   # grl_kernels.optimize(model) (its dtype choice, compiled when compile)


def _autocast(device, dtype):
    if dtype == torch.float32:
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass
class Variant:
    """One way of running the model: which network, which backend, compiled or not."""

    name: str
    kind: str                      # "published" | "ours" | "optimize"
    backend: Optional[str] = None  # ours: the attention backend
    compiled: bool = False

    @property
    def trains(self) -> bool:
        return not self.compiled and self.kind != "optimize"


def variants(cfg: ModelBenchConfig) -> List[Variant]:
    """The runs of one (preset, size): published first (the ratios' baseline), then ours."""
    from .published import spandrel_available

    out: List[Variant] = []
    if cfg.published and spandrel_available():
        out.append(Variant("published", "published"))
        if cfg.compile:
            out.append(Variant("published+compile", "published", compiled=True))
    names = (["reference"] if cfg.reference else []) + [b.name for b in fused_backends(cfg.device, cfg.dtype, cfg.backends)
                                                        if b.name != "reference"]
    out += [Variant(n, "ours", backend=n) for n in names]
    if cfg.compile:
        out += [Variant(f"{n}+compile", "ours", backend=n, compiled=True) for n in names if n != "reference"]
    if cfg.optimize:
        out.append(Variant("optimize()" if cfg.compile else "optimize(compile=False)", "optimize",
                           compiled=cfg.compile))
    return out


def bench_model(cfg: ModelBenchConfig, show_progress: bool = True) -> List[Dict]:
    _models()
    dev = torch.device(cfg.device)
    runs = variants(cfg)
    rows: List[Dict] = []
    steps = len(cfg.presets) * len(cfg.sizes) * len(runs)
    with Progress(steps, "bench-model", enabled=show_progress) as prog:
        try:
            _bench_presets(cfg, dev, runs, rows, prog)
        except KeyboardInterrupt:  # keep what was measured (SIGTERM under grl-kernels, Ctrl-C)
            rows.append({"preset": "(interrupted)", "backend": "-", "status": "error",
                         "note": "interrupted: the remaining runs were not done"})
    return rows


def _runner(v: Variant, model, published, cfg: ModelBenchConfig, dev):
    """(module to call, input dtype, autocast dtype) of a variant; compiles where asked."""
    if v.kind == "published":
        net = published
    elif v.kind == "optimize":
        from ..optimize import optimize

        net = optimize(copy.deepcopy(model), dtype="auto", compile=v.compiled)
        dt = next(getattr(net, "_orig_mod", net).parameters()).dtype
        return net, dt, torch.float32
    else:
        net = model
    if v.compiled:
        torch._dynamo.reset()
        net = torch.compile(net, dynamic=False)
    return net, torch.float32, cfg.dtype


def _bench_presets(cfg: ModelBenchConfig, dev, runs: List[Variant], rows: List[Dict], prog: Progress) -> None:
    for preset in cfg.presets:
        torch.manual_seed(0)
        model = build_model(preset, dev, cfg.task)
        published = None
        if any(v.kind == "published" for v in runs):
            from .published import build_published

            published = build_published(_models().preset_kwargs(PRESET_ALIASES.get(preset, preset), cfg.task)).to(dev)
            published.load_state_dict(model.state_dict(), strict=True)  # the same weights
        nparams = sum(p.numel() for p in model.parameters())
        for size in cfg.sizes:
            x = torch.rand(cfg.batch, 3, size, size, device=dev)
            ref_out = None
            for v in runs:
                prog.step(f"{preset} {size}x{size} {v.name}")
                r = {"preset": preset, "size": size, "batch": cfg.batch, "backend": v.name, "device": str(dev),
                     "dtype": str(cfg.dtype).replace("torch.", ""), "params_m": nparams / 1e6,
                     "status": "ok", "note": ""}
                try:
                    net, in_dtype, ac_dtype = _runner(v, model, published, cfg, dev)
                    r["dtype"] = str(in_dtype if v.kind == "optimize" else cfg.dtype).replace("torch.", "")
                    xin = x.to(in_dtype)
                    net.eval()

                    def infer():
                        with torch.no_grad(), use_backend(v.backend or "auto"), _autocast(dev, ac_dtype):
                            return net(xin)

                    t0 = time.perf_counter()
                    out = infer()
                    r["first_call_s"] = time.perf_counter() - t0
                    if ref_out is None:
                        ref_out = out.float()
                    else:
                        r["max_rel_err"] = errors(out.float(), ref_out)[1]
                        tol = MODEL_TOL[in_dtype if v.kind == "optimize" else cfg.dtype]
                        if not r["max_rel_err"] <= tol:
                            r["status"] = "wrong"
                            r["note"] = f"output differs from the first run's ({runs[0].name}): {r['max_rel_err']:.2e}"
                            rows.append(r)
                            continue
                    del out
                    t = time_fn(infer, dev, cfg.reps, cfg.warmup, cfg.max_seconds)
                    r["infer_ms"] = t.median_s * 1e3
                    r["infer_peak_mib"] = peak_memory(infer, dev) / 2 ** 20
                    if cfg.train and v.trains:
                        _train(r, net, v, x, ref_out, cfg, dev)
                    del net
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
                    r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:200]
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(r)
            _ratios([q for q in rows if q["preset"] == preset and q.get("size") == size])
        del model, published


def _train(r: Dict, net, v: Variant, x, ref_out, cfg: ModelBenchConfig, dev) -> None:
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-9)
    target = torch.rand_like(ref_out)

    def step():
        opt.zero_grad(set_to_none=True)
        with use_backend(v.backend or "auto"), _autocast(dev, cfg.dtype):
            loss = (net(x).float() - target).abs().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    tt = time_fn(step, dev, cfg.reps, max(1, cfg.warmup), cfg.max_seconds)
    r["train_ms"] = tt.median_s * 1e3
    r["train_peak_mib"] = peak_memory(step, dev) / 2 ** 20
    net.zero_grad(set_to_none=True)
    net.eval()


def _ratios(group: List[Dict]) -> None:
    """Speed-ups over the reference attention, the published eager and compiled runs; memory vs published."""
    ok = {q["backend"]: q for q in group if q["status"] == "ok"}
    for q in ok.values():
        for base, key in (("reference", "infer_speedup"), ("published", "x_published"),
                          ("published+compile", "x_published_compiled")):
            if base in ok and "infer_ms" in ok[base] and "infer_ms" in q:
                q[key] = ok[base]["infer_ms"] / q["infer_ms"]
        if "reference" in ok and "train_ms" in q and "train_ms" in ok["reference"]:
            q["train_speedup"] = ok["reference"]["train_ms"] / q["train_ms"]
        if "published" in ok and "train_ms" in q and "train_ms" in ok["published"]:
            q["train_x_published"] = ok["published"]["train_ms"] / q["train_ms"]
        pub_mib = ok.get("published", {}).get("infer_peak_mib")
        if pub_mib and q.get("infer_peak_mib") is not None:
            q["peak_vs_published"] = q["infer_peak_mib"] / pub_mib


MODEL_COLUMNS = [
    ("preset", "preset"), ("size", "size"), ("run", "backend"), ("dtype", "dtype"), ("infer ms", "infer_ms"),
    ("x ref", "infer_speedup"), ("x pub", "x_published"), ("x pub-c", "x_published_compiled"),
    ("infer MiB", "infer_peak_mib"), ("MiB/pub", "peak_vs_published"), ("first s", "first_call_s"),
    ("train ms", "train_ms"), ("train x pub", "train_x_published"), ("train MiB", "train_peak_mib"),
    ("err", "max_rel_err"), ("status", "status"),
]


def model_table_rows(rows: List[Dict]):
    headers = [h for h, _ in MODEL_COLUMNS]
    out = []
    for r in rows:
        line = [r.get(k) for _, k in MODEL_COLUMNS]
        if r.get("note"):
            line[-1] = f"{r['status']} ({r['note']})"
        out.append(line)
    return headers, out
