"""Loading published GRL weights: Lightning checkpoints or plain state_dicts.

Published Lightning files keep the parameters under "model." (the real-world SR one
under "model_g." beside unrelated keys) plus derived buffers (table_*, index_*, mask_*,
relative_*) that this package recomputes; those are dropped. Real weights are matched
strictly by name and shape, with a readable report of what did not match.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

DERIVED_PREFIXES = ("table_", "index_", "mask_", "relative_")
MODEL_PREFIXES = ("model.", "model_g.")


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: List[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, checkpoint, model)
    dropped_derived: List[str] = field(default_factory=list)
    prefix: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors"
            + (f" from prefix {self.prefix!r}" if self.prefix else "")
            + f", dropped {len(self.dropped_derived)} derived buffers"
        ]
        for title, items in (("missing from the checkpoint", self.missing), ("not in the model", self.unexpected)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {k}" for k in items[:20]] + ([f"  ... {len(items) - 20} more"] if len(items) > 20 else [])
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} with a different shape (checkpoint vs model):")
            lines += [f"  {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:20]]
        return "\n".join(lines)


def _read(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # Lightning files may pickle hyper-parameter objects
            raise ValueError(
                f"{path} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
                "If you trust the file, load it yourself with torch.load(path, weights_only=False) and pass the "
                "resulting dict to load_checkpoint."
            ) from exc
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(obj).__name__}")
    for key in ("state_dict", "params_ema", "params"):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def extract_state_dict(source) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """(weights, dropped derived names, prefix used) from a checkpoint or a state_dict."""
    sd = _read(source)
    prefix = ""
    for p in MODEL_PREFIXES:
        if any(k.startswith(p) for k in sd):
            prefix = p
            break
    out, dropped = {}, []
    for k, v in sd.items():
        if prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
        if not isinstance(v, torch.Tensor):
            continue
        if k.rsplit(".", 1)[-1].startswith(DERIVED_PREFIXES):
            dropped.append(k)
            continue
        out[k] = v
    return out, dropped, prefix


def load_checkpoint(model: nn.Module, source: Union[str, os.PathLike, Mapping], strict: bool = True) -> LoadReport:
    """Load published GRL weights into ``model``; returns a :class:`LoadReport`.

    ``strict``: any missing, unexpected or mis-shaped real weight raises ValueError with
    the report (nothing is loaded). Non-strict loads what matches and returns the report.
    """
    weights, dropped, prefix = extract_state_dict(source)
    own = model.state_dict()
    report = LoadReport(dropped_derived=dropped, prefix=prefix)
    usable = {}
    for k, v in weights.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            usable[k] = v
    report.missing = [k for k in own if k not in weights]
    if strict and not report.ok:
        raise ValueError("checkpoint does not match the model:\n" + str(report))
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    return report
