"""Drop-in patching: run GRL attention modules of any model through grl_kernels.

``patch(model, backend="auto")`` finds, BY STRUCTURE AND PARAMETER NAMES (not by import
path), the attention modules of models built from the published GRL code or a copy of it:

- window attention: a module with ``attn_transform`` (holding ``logit_scale`` (nh, 1, 1)
  and ``cpb_mlp``), attributes ``window_size``, ``num_heads``, ``shift_size``,
  ``attn_drop``, and ``forward(qkv, x_size, table, index, mask)``;
- anchored stripe attention: ``attn_transform1`` and ``attn_transform2``, attributes
  ``stripe_size``, ``stripe_groups``, ``stripe_shift``, ``num_heads``,
  ``anchor_window_down_factor``, and
  ``forward(qkv, anchor, x_size, table, index_a2w, index_w2a, mask_a2w, mask_w2a)``
  (``stripe_size``/``stripe_groups`` are the block's own, already reversed for vertical blocks).

Their ``forward`` is replaced by an instance attribute that computes tau and the bias
table from the module's own parameters and calls :mod:`grl_kernels.functional`; the
passed table/index/mask tensors are not used (the geometry recomputes them from the
module's configuration and ``x_size``; on the first call per geometry the passed
coordinate table, when it has our shape, is compared with ours as a safety check).
Parameters and buffers are untouched, so ``state_dict()`` is unchanged.
``grl_kernels.AnchoredStripeAttention`` / ``WindowAttention`` just get their
``backend`` attribute set. ``unpatch(model)`` restores everything.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from .backends import registry
from .functional import logit_scale_to_tau, stripe_attention, window_attention
from .geometry import stripe_geometry, window_geometry
from .modules import AnchoredStripeAttention, WindowAttention

_MARK = "_grl_kernels_patch"  # instance attribute holding what patch() changed


@dataclass
class PatchEntry:
    name: str  # qualified module name in the model ("" for the model itself)
    kind: str  # "window" or "stripe"
    origin: str  # "published" (forward replaced) or "grl_kernels" (backend attribute set)
    detail: str
    cls: str

    def __str__(self):
        return f"{self.name or '(model)'}: {self.origin} {self.kind} attention [{self.cls}] {self.detail}"


@dataclass
class PatchReport:
    """What :func:`patch` replaced (``entries``) and what it looked at but left alone (``skipped``)."""

    backend: str
    entries: List[PatchEntry] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    def count(self, kind: Optional[str] = None, origin: Optional[str] = None) -> int:
        return sum(1 for e in self.entries if (kind is None or e.kind == kind) and (origin is None or e.origin == origin))

    def __str__(self):
        if not self.entries and not self.skipped:
            return "grl_kernels.patch: no GRL attention modules found"
        lines = [
            f"grl_kernels.patch (backend={self.backend!r}): {len(self.entries)} attention modules "
            f"({self.count('window')} window, {self.count('stripe')} stripe; "
            f"{self.count(origin='published')} published-style forwards replaced, "
            f"{self.count(origin='grl_kernels')} grl_kernels modules set)"
        ]
        lines += [f"  {e}" for e in self.entries]
        lines += [f"  skipped {n or '(model)'}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------- structure
def _has_affine(m: nn.Module, attr: str, num_heads) -> bool:
    t = getattr(m, attr, None)
    if not isinstance(t, nn.Module):
        return False
    ls = getattr(t, "logit_scale", None)
    mlp = getattr(t, "cpb_mlp", None)
    return (
        isinstance(ls, torch.Tensor) and isinstance(mlp, nn.Module) and isinstance(num_heads, int)
        and tuple(ls.shape) == (num_heads, 1, 1)
    )


def _forward_arity(m: nn.Module) -> int:
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return -1
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _kind(m: nn.Module) -> Optional[str]:
    """"window" / "stripe" for published-style attention modules, else None."""
    nh = getattr(m, "num_heads", None)
    if _has_affine(m, "attn_transform1", nh) and _has_affine(m, "attn_transform2", nh) and all(
        hasattr(m, a) for a in ("stripe_size", "stripe_groups", "stripe_shift", "anchor_window_down_factor")
    ):
        return "stripe"
    if _has_affine(m, "attn_transform", nh) and all(hasattr(m, a) for a in ("window_size", "shift_size")):
        return "window"
    return None


def _dropout_p(m: nn.Module) -> float:
    d = getattr(m, "attn_drop", 0.0)
    if isinstance(d, nn.Dropout):
        return float(d.p)
    if isinstance(d, (int, float)):
        return float(d)
    if isinstance(d, nn.Identity) or d is None:
        return 0.0
    return float(getattr(d, "p", 0.0))


def _euclidean(m: nn.Module) -> bool:
    if getattr(m, "euclidean_dist", False):
        return True
    return bool(getattr(getattr(m, "args", None), "euclidean_dist", False))


def _refuse_dropout(m: nn.Module, name: str) -> None:
    p = _dropout_p(m)
    if p > 0 and m.training:
        raise ValueError(
            f"module {name or '(model)'!r} ({type(m).__name__}) has attention dropout p={p} and is in training "
            f"mode: grl_kernels has no attention dropout; call model.eval(), set attn_drop to 0, or unpatch"
        )


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


# ---------------------------------------------------------------- replaced forwards
class _PatchedForward:
    """Callable stored as the module's ``forward`` (an object, not a bound method, so that
    ``copy.deepcopy`` and pickling of a patched model keep it pointing at the right module)."""

    def __init__(self, module: nn.Module, name: str, backend: str):
        self.module = module
        self.name = name
        self.backend = backend
        self._verified = set()

    def _bias(self, transform: nn.Module, coords: torch.Tensor) -> torch.Tensor:
        # published AffineTransform: 16 * sigmoid(cpb_mlp(table)) as an (R, nh) table
        w = next(transform.cpb_mlp.parameters())
        t = transform.cpb_mlp(coords.to(device=w.device, dtype=w.dtype))
        return 16 * torch.sigmoid(t.reshape(-1, self.module.num_heads))

    def _verify_table(self, geom, passed) -> None:
        """Once per geometry: the caller's coordinate table, if it has our shape, must equal ours."""
        if geom in self._verified or not isinstance(passed, torch.Tensor):
            return
        ours = geom.coords_table(passed.device)
        grid = (geom.table_h, geom.table_w) if hasattr(geom, "table_h") else (geom.table_side, geom.table_side)
        shape = tuple(passed.shape)
        # only a table laid out like ours is comparable (a transposed one comes from the published
        # defect on non-square inputs, where the original crashes and our geometry is the fix)
        if (len(shape) >= 3 and shape[-3:] == (*grid, 2)) or shape == tuple(ours.shape):
            # a model cast to low precision holds a rounded table: allow two units of its roundoff
            tol = max(1e-5, 2 * torch.finfo(passed.dtype).eps) if passed.is_floating_point() else 1e-5
            if not torch.allclose(passed.reshape(-1, 2).to(ours.dtype), ours, atol=tol, rtol=tol):
                raise RuntimeError(
                    f"patched module {self.name or '(model)'!r}: the coordinate table passed by the model differs "
                    f"from the one grl_kernels computes for {geom} (different pretrained window/stripe size?); "
                    f"results would differ, so refusing. grl_kernels.unpatch(model) restores the original forward"
                )
        self._verified.add(geom)


class _WindowForward(_PatchedForward):
    def __call__(self, qkv, x_size, table=None, index=None, mask=None):
        m = self.module
        _refuse_dropout(m, self.name)
        ws = _pair(m.window_size)
        geom = window_geometry(tuple(int(v) for v in x_size), ws[0], m.shift_size > 0,
                               _pair(getattr(m, "pretrained_window_size", (0, 0))))
        self._verify_table(geom, table)
        t = m.attn_transform
        bias = self._bias(t, geom.coords_table(qkv.device))
        return window_attention(qkv, geom, m.num_heads, logit_scale_to_tau(t.logit_scale), bias, backend=self.backend)


class _StripeForward(_PatchedForward):
    def __call__(self, qkv, anchor, x_size, table=None, index_a2w=None, index_w2a=None, mask_a2w=None, mask_w2a=None):
        m = self.module
        _refuse_dropout(m, self.name)
        geom = stripe_geometry(
            tuple(int(v) for v in x_size), list(m.stripe_size), list(m.stripe_groups), bool(m.stripe_shift),
            int(m.anchor_window_down_factor), _pair(getattr(m, "pretrained_stripe_size", (0, 0))),
        )
        self._verify_table(geom, table)
        t1, t2 = m.attn_transform1, m.attn_transform2
        coords = geom.coords_table(qkv.device)
        return stripe_attention(
            qkv, anchor, geom, m.num_heads,
            logit_scale_to_tau(t1.logit_scale), self._bias(t1, coords),
            logit_scale_to_tau(t2.logit_scale), self._bias(t2, coords),
            backend=self.backend,
        )


# ---------------------------------------------------------------- public API
def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
    if backend != "auto" and backend not in registry.registered_backends():
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {registry.registered_backends()}")
    return backend


def _published_checks(m: nn.Module, name: str, kind: str) -> str:
    """Refusals (ValueError naming the module) and the detail string of a published module."""
    label = f"module {name or '(model)'!r} ({type(m).__name__})"
    if _euclidean(m):
        raise ValueError(f"{label} uses euclidean_dist=True (an ablation); grl_kernels implements cosine attention only")
    _refuse_dropout(m, name)
    arity = _forward_arity(m)
    want = 8 if kind == "stripe" else 5
    if arity != want:
        raise ValueError(f"{label} looks like GRL {kind} attention but its forward takes {arity} arguments, "
                         f"expected {want}; refusing to replace it")
    if kind == "window":
        ws = _pair(m.window_size)
        if ws[0] != ws[1]:
            raise ValueError(f"{label}: window_size {list(ws)} is not square")
        if m.shift_size not in (0, ws[0] // 2):
            raise ValueError(f"{label}: shift_size {m.shift_size} is neither 0 nor window_size // 2 = {ws[0] // 2}")
        return f"window_size={ws[0]} shift={m.shift_size} heads={m.num_heads}"
    return (f"stripe_size={list(m.stripe_size)} stripe_groups={list(m.stripe_groups)} "
            f"shift={bool(m.stripe_shift)} f={m.anchor_window_down_factor} heads={m.num_heads}")


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Run every GRL attention module of ``model`` through grl_kernels with ``backend``.

    Returns a :class:`PatchReport` (``print(report)`` lists what was replaced). Raises
    ValueError naming the module for what it cannot handle (euclidean_dist=True,
    attention dropout > 0 in training mode); nothing is changed in that case. Patching
    an already patched model just changes the backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = _check_backend(backend)
    report = PatchReport(backend)
    todo = []
    for name, m in model.named_modules():
        if isinstance(m, (AnchoredStripeAttention, WindowAttention)):
            kind = "stripe" if isinstance(m, AnchoredStripeAttention) else "window"
            if m.attn_drop > 0 and m.training:
                raise ValueError(f"module {name or '(model)'!r} ({type(m).__name__}) has attention dropout "
                                 f"{m.attn_drop} in training mode, which grl_kernels does not implement")
            todo.append((name, m, kind, "grl_kernels", None))
            continue
        kind = _kind(m)
        if kind is None:
            continue
        todo.append((name, m, kind, "published", _published_checks(m, name, kind)))
    # every check passed: apply
    for name, m, kind, origin, detail in todo:
        state = m.__dict__.get(_MARK)
        if origin == "grl_kernels":
            if state is None:
                m.__dict__[_MARK] = {"backend": m.backend}
            m.backend = backend
            detail = m.extra_repr()
        else:
            if state is None:
                m.__dict__[_MARK] = {"forward": m.__dict__.get("forward")}
            fwd = _StripeForward if kind == "stripe" else _WindowForward
            m.forward = fwd(m, name, backend)
        report.entries.append(PatchEntry(name, kind, origin, detail, type(m).__name__))
    return report


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch` on every module of ``model``; returns how many modules were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for _, m in model.named_modules():
        state = m.__dict__.pop(_MARK, None)
        if state is None:
            continue
        if "backend" in state:
            m.backend = state["backend"]
        else:
            m.__dict__.pop("forward", None)
            if state.get("forward") is not None:
                m.forward = state["forward"]
        n += 1
    return n


def is_patched(module: nn.Module) -> bool:
    return _MARK in module.__dict__
