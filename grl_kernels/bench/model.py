"""Whole-model benchmark: GRL-T/S/B inference on an image and one training step,
the reference attention against the fused backends (``grl-kernels bench-model``).

Each backend is selected with :func:`grl_kernels.use_backend` around the model call
(the model's attention modules use the default backend). Low precision runs under
``torch.autocast``. The fused output is checked against the reference output first.
"""
from __future__ import annotations

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
    warmup: int = 1
    max_seconds: float = 20.0
    train: bool = True
    backends: Optional[Sequence[str]] = None
    task: Optional[str] = None


def _autocast(device, dtype):
    if dtype == torch.float32:
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def bench_model(cfg: ModelBenchConfig, show_progress: bool = True) -> List[Dict]:
    _models()
    dev = torch.device(cfg.device)
    names = ["reference"] + [b.name for b in fused_backends(cfg.device, cfg.dtype, cfg.backends)
                             if b.name != "reference"]
    rows: List[Dict] = []
    steps = len(cfg.presets) * len(cfg.sizes) * len(names)
    with Progress(steps, "bench-model", enabled=show_progress) as prog:
        try:
            _bench_presets(cfg, dev, names, rows, prog)
        except KeyboardInterrupt:  # keep what was measured (SIGTERM under grl-kernels, Ctrl-C)
            rows.append({"preset": "(interrupted)", "backend": "-", "status": "error",
                         "note": "interrupted: the remaining runs were not done"})
    return rows


def _bench_presets(cfg: ModelBenchConfig, dev, names, rows: List[Dict], prog: Progress) -> None:
    for preset in cfg.presets:
        torch.manual_seed(0)
        model = build_model(preset, dev, cfg.task)
        nparams = sum(p.numel() for p in model.parameters())
        for size in cfg.sizes:
            x = torch.rand(cfg.batch, 3, size, size, device=dev)
            ref_out = None
            for name in names:
                prog.step(f"{preset} {size}x{size} {name}")
                r = {"preset": preset, "size": size, "batch": cfg.batch, "backend": name, "device": str(dev),
                     "dtype": str(cfg.dtype).replace("torch.", ""), "params_m": nparams / 1e6,
                     "status": "ok", "note": ""}
                try:
                    model.eval()

                    def infer():
                        with torch.no_grad(), use_backend(name), _autocast(dev, cfg.dtype):
                            return model(x)

                    t0 = time.perf_counter()
                    out = infer()
                    r["first_call_s"] = time.perf_counter() - t0
                    if ref_out is None:
                        ref_out = out.float()
                    else:
                        r["max_rel_err"] = errors(out.float(), ref_out)[1]
                        if not r["max_rel_err"] <= MODEL_TOL[cfg.dtype]:
                            r["status"] = "wrong"
                            r["note"] = f"output differs from the reference path: {r['max_rel_err']:.2e}"
                            rows.append(r)
                            continue
                    del out
                    t = time_fn(infer, dev, cfg.reps, cfg.warmup, cfg.max_seconds)
                    r["infer_ms"] = t.median_s * 1e3
                    r["infer_peak_mib"] = peak_memory(infer, dev) / 2 ** 20
                    if cfg.train:
                        model.train()
                        opt = torch.optim.SGD(model.parameters(), lr=1e-9)
                        target = torch.rand_like(ref_out)

                        def step():
                            opt.zero_grad(set_to_none=True)
                            with use_backend(name), _autocast(dev, cfg.dtype):
                                loss = (model(x).float() - target).abs().mean()
                            loss.backward()
                            opt.step()
                            return loss.detach()

                        tt = time_fn(step, dev, cfg.reps, cfg.warmup, cfg.max_seconds)
                        r["train_ms"] = tt.median_s * 1e3
                        r["train_peak_mib"] = peak_memory(step, dev) / 2 ** 20
                        model.zero_grad(set_to_none=True)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
                    r["status"], r["note"] = "error", f"{type(exc).__name__}: {exc}"[:200]
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(r)
            ref = next((q for q in rows if q["preset"] == preset and q["size"] == size
                        and q["backend"] == "reference" and q["status"] == "ok"), None)
            for q in rows:
                if ref and q["preset"] == preset and q["size"] == size and q["status"] == "ok":
                    if "infer_ms" in q and "infer_ms" in ref:
                        q["infer_speedup"] = ref["infer_ms"] / q["infer_ms"]
                    if "train_ms" in q and "train_ms" in ref:
                        q["train_speedup"] = ref["train_ms"] / q["train_ms"]
        del model


MODEL_COLUMNS = [
    ("preset", "preset"), ("size", "size"), ("backend", "backend"), ("infer ms", "infer_ms"),
    ("infer x", "infer_speedup"), ("infer MiB", "infer_peak_mib"), ("train ms", "train_ms"),
    ("train x", "train_speedup"), ("train MiB", "train_peak_mib"), ("err", "max_rel_err"), ("status", "status"),
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
