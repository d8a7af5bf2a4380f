"""Attention cases shared by ``grl-kernels check`` and ``grl-kernels bench``.

A :class:`Case` is one attention call: the branch (stripe or window), image size,
batch, heads and head dim, and the block configuration exactly as a GRL block
holds it (stripe_size / stripe_groups already reversed for vertical blocks).
``make_inputs`` builds the backend-interface arguments for it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from ..geometry import stripe_geometry, window_geometry


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "stripe" or "window"
    H: int
    W: int
    heads: int
    head_dim: int
    batch: int = 1
    # stripe blocks: the block's own configuration
    stripe_size: Tuple[Optional[int], Optional[int]] = (8, 8)
    stripe_groups: Tuple[Optional[int], Optional[int]] = (None, None)
    shifted: bool = False
    down: int = 1
    # window blocks
    window_size: int = 8

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def geometry(self):
        if self.kind == "stripe":
            return stripe_geometry((self.H, self.W), self.stripe_size, self.stripe_groups, self.shifted, self.down)
        return window_geometry((self.H, self.W), self.window_size, self.shifted)

    def with_batch(self, batch: int) -> "Case":
        return replace(self, batch=int(batch))

    def describe(self) -> str:
        """Short geometry string, e.g. ``stripe 64x64 s8x16 shift f4 h2x16``."""
        g = self.geometry()
        sh = "shift" if self.shifted else "noshift"
        if self.kind == "stripe":
            geo = f"s{g.sh}x{g.sw} {sh} f{g.down}"
        else:
            geo = f"w{g.ws} {sh}"
        return f"{self.kind} B{self.batch} {self.H}x{self.W} {geo} h{self.heads}x{self.head_dim}"

    def as_dict(self) -> Dict:
        return {
            "name": self.name, "kind": self.kind, "H": self.H, "W": self.W, "batch": self.batch,
            "heads": self.heads, "head_dim": self.head_dim, "stripe_size": list(self.stripe_size),
            "stripe_groups": list(self.stripe_groups), "shifted": self.shifted, "down": self.down,
            "window_size": self.window_size, "describe": self.describe(),
        }


def _stripe(name, H, W, heads, d, size, groups, shifted, f, vertical=False, batch=1) -> Case:
    """A stripe case from the MODEL's stripe_size/groups; vertical blocks reverse them (spec sec. 1)."""
    size, groups = tuple(size), tuple(groups)
    if vertical:
        size, groups = size[::-1], groups[::-1]
    return Case(name, "stripe", H, W, heads, d, batch, size, groups, shifted, f)


def _window(name, H, W, heads, d, ws, shifted, batch=1) -> Case:
    return Case(name, "window", H, W, heads, d, batch, window_size=ws, shifted=shifted)


# Published presets: window 8, stripe_size [8, None], stripe_groups [None, 4], f = 4.
# GRL-T: branch C = 32 (2 heads x 16), GRL-S: 64 (2 x 32), GRL-B: 90 (3 x 30).
PUB = dict(size=(8, None), groups=(None, 4), f=4)


def published_cases(H: int = 64, W: int = 64) -> List[Case]:
    out = []
    for preset, heads, d in (("T", 2, 16), ("S", 2, 32), ("B", 3, 30)):
        for vertical in (False, True):
            for shifted in (False, True):
                tag = f"GRL-{preset} stripe {'V' if vertical else 'H'}{' shifted' if shifted else ''}"
                out.append(_stripe(tag, H, W, heads, d, PUB["size"], PUB["groups"], shifted, PUB["f"], vertical))
        for shifted in (False, True):
            out.append(_window(f"GRL-{preset} window{' shifted' if shifted else ''}", H, W, heads, d, 8, shifted))
    return out


def odd_cases() -> List[Case]:
    """Geometries that exercise the quirks: t=0 anchor shift, non-square, f=2, head dim 30, big stripes."""
    return [
        # stripe_groups on a small image: width shift 16 // 8 = 2 < f = 4, so the anchor shift
        # t // f is 0 and every anchor column is band 2 (spec sec. 2, the "-0" quirk)
        _stripe("anchor shift t//f=0 (groups, small)", 16, 16, 2, 16, (8, None), (None, 4), True, 4),
        _stripe("non-square vertical shifted", 32, 48, 2, 30, (8, None), (None, 4), True, 4, vertical=True),
        _stripe("fixture-like W f2 d30", 48, 32, 3, 30, (16, 16), (None, None), False, 2, vertical=True),
        _stripe("stripe 16x16 shifted f2 batch 2", 32, 32, 3, 30, (16, 16), (None, None), True, 2, batch=2),
        _stripe("groups both dims shifted", 24, 40, 1, 24, (None, None), (3, 5), True, 2),
        _window("window 12 shifted non-square d30", 24, 36, 3, 30, 12, True),
        _window("window 4 shifted batch 2", 16, 20, 2, 8, 4, True, batch=2),
    ]


def quick_check_cases() -> List[Case]:
    """A small subset for ``check --quick``: one of each kind of quirk at small sizes."""
    pub = [c for c in published_cases(32, 48) if c.name.startswith("GRL-B") or c.name.startswith("GRL-T stripe V")]
    odd = odd_cases()
    return pub + [odd[0], odd[1], odd[2], odd[4], odd[5]]


def full_check_cases() -> List[Case]:
    return published_cases(64, 64) + published_cases(32, 64) + odd_cases()


def bench_cases(quick: bool = False, size: Optional[Tuple[int, int]] = None, batch: int = 1) -> List[Case]:
    """Benchmark geometries: the published GRL-B blocks (and GRL-S) plus an SR fine-tune stripe."""
    if quick:
        H, W = size or (64, 64)
        cs = [
            _stripe("GRL-B stripe H shifted", H, W, 3, 30, PUB["size"], PUB["groups"], True, 4),
            _window("GRL-B window shifted", H, W, 3, 30, 8, True),
        ]
    else:
        H, W = size or (128, 128)
        cs = [
            _stripe("GRL-B stripe H shifted", H, W, 3, 30, PUB["size"], PUB["groups"], True, 4),
            _stripe("GRL-B stripe V", H, W, 3, 30, PUB["size"], PUB["groups"], False, 4, vertical=True),
            _window("GRL-B window shifted", H, W, 3, 30, 8, True),
            _stripe("GRL-S stripe H shifted", H, W, 2, 32, PUB["size"], PUB["groups"], True, 4),
            _window("GRL-S window shifted", H, W, 2, 32, 8, True),
            _stripe("SR stripe 64x64 shifted", H, W, 3, 30, (64, 64), (None, None), True, 4),
            _window("SR window 32 shifted", H, W, 3, 30, 32, True),
        ]
    return [c.with_batch(batch) for c in cs]


_SPEC_RE = re.compile(r"^(stripe|window):(.*)$")


def parse_case(spec: str) -> Case:
    """Parse a ``--geometry`` string.

    ``stripe:HxW,size=8xNone,groups=Nonex4,shift=1,f=4,heads=3,dim=30[,vertical=1][,batch=2]``
    ``window:HxW,ws=8,shift=1,heads=3,dim=30[,batch=2]``
    (size/groups are the MODEL's; ``vertical=1`` reverses them like a vertical block).
    """
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise ValueError(f"geometry {spec!r}: expected 'stripe:HxW,...' or 'window:HxW,...'")
    kind, rest = m.group(1), m.group(2)
    parts = [p for p in rest.split(",") if p]
    if not parts or "x" not in parts[0]:
        raise ValueError(f"geometry {spec!r}: the first field must be the image size HxW")
    try:
        H, W = (int(v) for v in parts[0].split("x"))
    except ValueError:
        raise ValueError(f"geometry {spec!r}: bad image size {parts[0]!r}") from None
    opts = {}
    for p in parts[1:]:
        if "=" not in p:
            raise ValueError(f"geometry {spec!r}: expected key=value, got {p!r}")
        k, v = p.split("=", 1)
        opts[k.strip()] = v.strip()

    def pair(v):
        a, b = v.split("x")
        return tuple(None if e.lower() == "none" else int(e) for e in (a, b))

    known = {"size", "groups", "shift", "f", "heads", "dim", "vertical", "batch", "ws"}
    bad = set(opts) - known
    if bad:
        raise ValueError(f"geometry {spec!r}: unknown keys {sorted(bad)}; known: {sorted(known)}")
    def positive(key, default):
        text = opts.get(key, str(default))
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise ValueError(f"geometry {spec!r}: {key} must be an int >= 1, got {text!r}")
        return value

    if H < 1 or W < 1:
        raise ValueError(f"geometry {spec!r}: the image size HxW needs H >= 1 and W >= 1, got {parts[0]!r}")
    heads, dim = positive("heads", 3), positive("dim", 30)
    shifted = opts.get("shift", "1") not in ("0", "false", "False")
    batch = positive("batch", 1)
    if kind == "stripe":
        case = _stripe(spec, H, W, heads, dim, pair(opts.get("size", "8xNone")), pair(opts.get("groups", "Nonex4")),
                       shifted, positive("f", 4), opts.get("vertical", "0") not in ("0", "false", "False"), batch)
    else:
        case = _window(spec, H, W, heads, dim, positive("ws", 8), shifted, batch)
    case.geometry()  # raises ValueError on sizes that do not divide
    return case


@dataclass
class Inputs:
    """Backend-interface arguments of one case (leaf tensors, for gradients)."""

    qkv: torch.Tensor
    anchor: Optional[torch.Tensor]
    scale1: torch.Tensor
    bias1: torch.Tensor
    scale2: Optional[torch.Tensor] = None
    bias2: Optional[torch.Tensor] = None
    qkv_base: Optional[torch.Tensor] = field(default=None, repr=False)  # the leaf qkv slices

    def leaves(self) -> Dict[str, torch.Tensor]:
        d = {"qkv": self.qkv_base if self.qkv_base is not None else self.qkv}
        if self.anchor is not None:
            d["anchor"] = self.anchor
        d["scale1"], d["bias1"] = self.scale1, self.bias1
        if self.scale2 is not None:
            d["scale2"], d["bias2"] = self.scale2, self.bias2
        return d


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed: int = 0, strided: bool = True,
                requires_grad: bool = False, source: Optional[Inputs] = None) -> Inputs:
    """Random inputs of ``case``; or, with ``source``, the same values converted to dtype/device.

    qkv is a strided channel slice ``big[..., 3C:]`` of a (B, H*W, 6C) tensor when ``strided``
    (as in GRL's mixed attention); tau in [5, 30] and bias tables 16 * sigmoid(N(0, 1)).
    """
    g = case.geometry()
    B, C, L = case.batch, case.channels, case.H * case.W
    if source is None:
        gen = torch.Generator().manual_seed(seed)
        big = torch.randn(B, L, 6 * C, generator=gen)
        anchor = torch.randn(B, g.Ha, g.Wa, C, generator=gen) if case.kind == "stripe" else None
        rows = g.table_rows
        taus = [torch.exp(torch.empty(case.heads).uniform_(math.log(5), math.log(30), generator=gen)) for _ in range(2)]
        biases = [16 * torch.sigmoid(torch.randn(rows, case.heads, generator=gen)) for _ in range(2)]
    else:
        big = torch.cat([torch.zeros_like(source.qkv), source.qkv.detach()], dim=-1)
        anchor = None if source.anchor is None else source.anchor.detach()
        taus = [source.scale1.detach(), source.scale2.detach() if source.scale2 is not None else None]
        biases = [source.bias1.detach(), source.bias2.detach() if source.bias2 is not None else None]

    def leaf(t, dt):
        if t is None:
            return None
        return t.to(device=device, dtype=dt).clone().requires_grad_(requires_grad)

    # parameters (tau, bias) stay float32 like the module parameters; activations take ``dtype``
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if strided:
        base = leaf(big, dtype)
        qkv = base[..., 3 * C:]
    else:
        base = leaf(big[..., 3 * C:], dtype)
        qkv = base
    if case.kind == "stripe":
        return Inputs(qkv, leaf(anchor, dtype), leaf(taus[0], pdt), leaf(biases[0], pdt), leaf(taus[1], pdt),
                      leaf(biases[1], pdt), qkv_base=base)
    return Inputs(qkv, None, leaf(taus[0], pdt), leaf(biases[0], pdt), qkv_base=base)


def call_backend(backend, case: Case, inp: Inputs) -> torch.Tensor:
    """Run ``backend`` (a registry Backend or any object with .stripe/.window) on ``inp``."""
    g = case.geometry()
    if case.kind == "stripe":
        return backend.stripe(inp.qkv, inp.anchor, g, case.heads, inp.scale1, inp.bias1, inp.scale2, inp.bias2)
    return backend.window(inp.qkv, g, case.heads, inp.scale1, inp.bias1)
