"""Geometry of GRL's window and anchored-stripe attention, in one place.

Every backend derives its index math from the small integer parameters held by
:class:`StripeGeometry` and :class:`WindowGeometry` (sizes, shifts, down factor);
the materialized tables (coordinate table, relative indices, region ids, -100
masks) exist for the reference path and for tests, and are cached per
(configuration, device).

Conventions (see GRL_ATTENTION_SPEC.md sections 1-3):
- tokens are row-major on the (H, W) grid, anchors on the (H // f, W // f) grid;
- partition = roll by (-shift) then cut into windows row-major, tokens row-major
  inside a window; window n of the tokens pairs with window n of the anchors;
- relative index of the stripe stages uses raw anchor-grid positions (not x f).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

MASK_VALUE = -100.0  # the published constant; -inf would change the numbers

# torch.compile traces through the lru_cache wrappers below and warns once per function;
# that is safe here: every cached function is pure in its (frozen, hashable) arguments.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function at 'geometry.py")


def _pair(value, name: str) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must have 2 entries (height, width), got {value!r}")
        return tuple(value)
    return (value, value)


def stripe_info(
    stripe_size: Sequence[Optional[int]],
    stripe_groups: Sequence[Optional[int]],
    stripe_shift: bool,
    x_size: Sequence[int],
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Stripe and shift sizes per dimension (spec section 1).

    g is None: stripe s, shift s // 2; g an int: stripe D // g, shift 0 if g == 1
    else D // (2 g). The shift is zero unless ``stripe_shift`` is true.
    """
    stripe, shift = [], []
    for s, g, d in zip(stripe_size, stripe_groups, x_size):
        if g is None:
            if s is None:
                raise ValueError("stripe_size and stripe_groups cannot both be None in one dimension")
            st, sh = int(s), int(s) // 2
        else:
            st = int(d) // int(g)
            sh = 0 if int(g) == 1 else int(d) // (2 * int(g))
        stripe.append(st)
        shift.append(sh if stripe_shift else 0)
    return (stripe[0], stripe[1]), (shift[0], shift[1])


def log_spaced_coords(n: int, p: int, divisor: float) -> torch.Tensor:
    """Values n..p divided by ``divisor``, times 8, then sign(t) log2(|t|+1) / log2(8)."""
    t = torch.arange(n, p + 1, dtype=torch.float32)
    t = t / divisor * 8
    return torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / math.log2(8)


def coords_table(
    stripe: Sequence[int], anchor: Sequence[int], pretrained: Sequence[int] = (0, 0), down_factor: int = 1
) -> torch.Tensor:
    """Coordinate table (s_h + a_h - 1, s_w + a_w - 1, 2), flattened to (R, 2) float32.

    Per dimension p = s - 1 - (s - a) // 2 and n = -(a - 1) - (s - a) // 2; the values
    n..p are divided by p (or by the p of ``pretrained`` sizes when those are > 0).
    """
    axes = []
    for dim in range(2):
        s, a = int(stripe[dim]), int(anchor[dim])
        p = s - 1 - (s - a) // 2
        n = -(a - 1) - (s - a) // 2
        if pretrained[0] > 0:
            ps = int(pretrained[dim])
            pa = ps // down_factor
            divisor = ps - 1 - (ps - pa) // 2
        else:
            divisor = p
        if divisor == 0:  # a 1-wide table has the single value 0; avoid 0/0
            divisor = 1
        axes.append(log_spaced_coords(n, p, divisor))
    gh, gw = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([gh, gw], dim=-1).reshape(-1, 2).contiguous()


def region_ids_1d(size: int, window: int, shift: int) -> torch.Tensor:
    """Band of every position along one dimension, with the Python-slice quirk.

    Band 0 is assigned to [0:-window], then 1 to [-window:-shift], then 2 to [-shift:],
    later assignments overwriting earlier ones. For shift == 0, "-0" is 0: [-s:-0] is
    empty and [-0:] covers the whole dimension, so every position is band 2.
    """
    band = torch.zeros(size, dtype=torch.int64)
    band[slice(0, -window)] = 0
    band[slice(-window, -shift)] = 1
    band[slice(-shift, None)] = 2
    return band


def region_band(pos: int, size: int, window: int, shift: int) -> int:
    """Scalar version of :func:`region_ids_1d` (the formula kernels use)."""
    if shift == 0:
        return 2
    if pos >= size - shift:
        return 2
    if pos >= size - window:
        return 1
    return 0


def _partition_ids(grid: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(Hg, Wg) -> (num_windows, wh * ww), windows row-major, positions row-major."""
    hg, wg = grid.shape
    return grid.reshape(hg // wh, wh, wg // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


@dataclass(frozen=True)
class StripeGeometry:
    """Everything about one anchored-stripe block at one input size.

    All fields are plain ints/bools: a kernel needs nothing else.
    """

    H: int
    W: int
    sh: int  # stripe height (tokens)
    sw: int  # stripe width (tokens)
    shift_h: int  # cyclic shift of the token grid (0 when not shifted)
    shift_w: int
    down: int  # anchor down factor f
    shifted: bool  # block's stripe_shift: masks are applied only when true
    pretrained_h: int = 0
    pretrained_w: int = 0

    # ---- derived sizes -------------------------------------------------
    @property
    def ah(self) -> int:
        return self.sh // self.down

    @property
    def aw(self) -> int:
        return self.sw // self.down

    @property
    def anchor_shift_h(self) -> int:
        return self.shift_h // self.down

    @property
    def anchor_shift_w(self) -> int:
        return self.shift_w // self.down

    @property
    def Ha(self) -> int:
        return self.H // self.down

    @property
    def Wa(self) -> int:
        return self.W // self.down

    @property
    def n1(self) -> int:
        return self.sh * self.sw

    @property
    def n2(self) -> int:
        return self.ah * self.aw

    @property
    def windows_h(self) -> int:
        return self.H // self.sh

    @property
    def windows_w(self) -> int:
        return self.W // self.sw

    @property
    def num_windows(self) -> int:
        return self.windows_h * self.windows_w

    @property
    def table_h(self) -> int:
        return self.sh + self.ah - 1

    @property
    def table_w(self) -> int:
        return self.sw + self.aw - 1

    @property
    def table_rows(self) -> int:
        return self.table_h * self.table_w

    # ---- scalar index math (mirrored by every kernel) -------------------
    def token_position(self, window: int, j: int) -> int:
        """Row-major image index of token j of window ``window`` (shift undone)."""
        wy, wx = divmod(window, self.windows_w)
        y, x = divmod(j, self.sw)
        return ((wy * self.sh + y + self.shift_h) % self.H) * self.W + (wx * self.sw + x + self.shift_w) % self.W

    def anchor_position(self, window: int, i: int) -> int:
        wy, wx = divmod(window, self.windows_w)
        u, v = divmod(i, self.aw)
        return ((wy * self.ah + u + self.anchor_shift_h) % self.Ha) * self.Wa + (
            wx * self.aw + v + self.anchor_shift_w
        ) % self.Wa

    def w2a_index(self, j: int, i: int) -> int:
        y, x = divmod(j, self.sw)
        u, v = divmod(i, self.aw)
        return (y - u + self.ah - 1) * self.table_w + (x - v + self.aw - 1)

    def a2w_index(self, i: int, j: int) -> int:
        y, x = divmod(j, self.sw)
        u, v = divmod(i, self.aw)
        return (u - y + self.sh - 1) * self.table_w + (v - x + self.sw - 1)

    # ---- materialized tables (cached) ---------------------------------
    def coords_table(self, device=None) -> torch.Tensor:
        return _stripe_table(self, _dev(device))

    def index_w2a(self, device=None) -> torch.Tensor:
        """(N1, N2) int64: table row of token j -> anchor i (stage 2)."""
        return _stripe_index(self, _dev(device))[1]

    def index_a2w(self, device=None) -> torch.Tensor:
        """(N2, N1) int64: table row of anchor i -> token j (stage 1)."""
        return _stripe_index(self, _dev(device))[0]

    def token_region_ids(self, device=None) -> torch.Tensor:
        """(num_windows, N1) region id of every token of every window."""
        return _stripe_regions(self, _dev(device))[0]

    def anchor_region_ids(self, device=None) -> torch.Tensor:
        """(num_windows, N2) region id of every anchor of every window."""
        return _stripe_regions(self, _dev(device))[1]

    def mask_w2a(self, device=None) -> Optional[torch.Tensor]:
        """(num_windows, N1, N2) of 0 / -100, or None when the block is not shifted."""
        return _stripe_masks(self, _dev(device))[1] if self.shifted else None

    def mask_a2w(self, device=None) -> Optional[torch.Tensor]:
        """(num_windows, N2, N1) of 0 / -100, or None when the block is not shifted."""
        return _stripe_masks(self, _dev(device))[0] if self.shifted else None

    def token_permutation(self, device=None) -> torch.Tensor:
        """(num_windows * N1,) image index of each partitioned token."""
        return _stripe_perm(self, _dev(device))[0]

    def anchor_permutation(self, device=None) -> torch.Tensor:
        return _stripe_perm(self, _dev(device))[1]


@dataclass(frozen=True)
class WindowGeometry:
    """One (shifted or not) square-window attention block at one input size."""

    H: int
    W: int
    ws: int  # window size
    shift: int  # ws // 2 on shifted blocks, else 0
    pretrained: int = 0

    @property
    def shifted(self) -> bool:
        return self.shift > 0

    @property
    def n(self) -> int:
        return self.ws * self.ws

    @property
    def windows_h(self) -> int:
        return self.H // self.ws

    @property
    def windows_w(self) -> int:
        return self.W // self.ws

    @property
    def num_windows(self) -> int:
        return self.windows_h * self.windows_w

    @property
    def table_side(self) -> int:
        return 2 * self.ws - 1

    @property
    def table_rows(self) -> int:
        return self.table_side ** 2

    def token_position(self, window: int, j: int) -> int:
        wy, wx = divmod(window, self.windows_w)
        y, x = divmod(j, self.ws)
        return ((wy * self.ws + y + self.shift) % self.H) * self.W + (wx * self.ws + x + self.shift) % self.W

    def rel_index(self, j1: int, j2: int) -> int:
        y1, x1 = divmod(j1, self.ws)
        y2, x2 = divmod(j2, self.ws)
        return (y1 - y2 + self.ws - 1) * self.table_side + (x1 - x2 + self.ws - 1)

    def coords_table(self, device=None) -> torch.Tensor:
        return _window_table(self, _dev(device))

    def index(self, device=None) -> torch.Tensor:
        """(N, N) int64 table row of query j1 -> key j2."""
        return _window_index(self, _dev(device))

    def region_ids(self, device=None) -> torch.Tensor:
        """(num_windows, N) region id of every token of every window."""
        return _window_regions(self, _dev(device))

    def mask(self, device=None) -> Optional[torch.Tensor]:
        """(num_windows, N, N) of 0 / -100, or None when not shifted."""
        return _window_mask(self, _dev(device)) if self.shifted else None

    def token_permutation(self, device=None) -> torch.Tensor:
        return _window_perm(self, _dev(device))


def _dev(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def stripe_geometry(
    x_size: Sequence[int],
    stripe_size: Sequence[Optional[int]],
    stripe_groups: Sequence[Optional[int]],
    stripe_shift: bool,
    anchor_window_down_factor: int = 1,
    pretrained_stripe_size: Sequence[int] = (0, 0),
) -> StripeGeometry:
    """Build (and check) the geometry of one stripe block at size ``x_size``.

    ``stripe_size``/``stripe_groups`` are the block's own (already reversed for
    vertical stripes). Raises ValueError naming what does not divide.
    """
    H, W = (int(v) for v in x_size)
    f = int(anchor_window_down_factor)
    if f < 1:
        raise ValueError(f"anchor_window_down_factor must be a positive int, got {anchor_window_down_factor!r}")
    (sh, sw), (th, tw) = stripe_info(stripe_size, stripe_groups, bool(stripe_shift), (H, W))
    for name, s, d in (("height", sh, H), ("width", sw, W)):
        if s < 1:
            raise ValueError(
                f"x_size {tuple(x_size)}: stripe {name} {s} from stripe_size={list(stripe_size)}, "
                f"stripe_groups={list(stripe_groups)} is empty; the {name} must be at least the group count"
            )
        if d % s:
            raise ValueError(
                f"x_size {name} {d} must be divisible by the stripe {name} {s} "
                f"(stripe_size={list(stripe_size)}, stripe_groups={list(stripe_groups)})"
            )
        if s % f:
            raise ValueError(
                f"stripe {name} {s} must be divisible by anchor_window_down_factor {f} "
                f"(x_size={tuple(x_size)}, stripe_size={list(stripe_size)}, stripe_groups={list(stripe_groups)})"
            )
    p = _pair(pretrained_stripe_size, "pretrained_stripe_size")
    return _stripe_geometry_cached(H, W, sh, sw, th, tw, f, bool(stripe_shift), int(p[0] or 0), int(p[1] or 0))


@lru_cache(maxsize=1024)
def _stripe_geometry_cached(H, W, sh, sw, th, tw, f, shifted, ph, pw) -> StripeGeometry:
    return StripeGeometry(H, W, sh, sw, th, tw, f, shifted, ph, pw)


def window_geometry(x_size: Sequence[int], window_size, window_shift: bool, pretrained_window_size=(0, 0)) -> WindowGeometry:
    H, W = (int(v) for v in x_size)
    ws = _pair(window_size, "window_size")
    if ws[0] != ws[1]:
        raise ValueError(f"window_size must be square, got {tuple(ws)}")
    w = int(ws[0])
    if w < 1:
        raise ValueError(f"window_size must be >= 1, got {w}")
    for name, d in (("height", H), ("width", W)):
        if d % w:
            raise ValueError(f"x_size {name} {d} must be divisible by window_size {w}")
    pw = _pair(pretrained_window_size, "pretrained_window_size")
    return _window_geometry_cached(H, W, w, w // 2 if window_shift else 0, int(pw[0] or 0))


@lru_cache(maxsize=1024)
def _window_geometry_cached(H, W, w, shift, pretrained) -> WindowGeometry:
    return WindowGeometry(H, W, w, shift, pretrained)


# ---------------------------------------------------------------------------
# cached materializations (reference path and tests only)
# ---------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _stripe_table(g: StripeGeometry, device: torch.device) -> torch.Tensor:
    return coords_table((g.sh, g.sw), (g.ah, g.aw), (g.pretrained_h, g.pretrained_w), g.down).to(device)


@lru_cache(maxsize=256)
def _stripe_index(g: StripeGeometry, device: torch.device):
    y = torch.arange(g.sh).repeat_interleave(g.sw)  # token rows, (N1,)
    x = torch.arange(g.sw).repeat(g.sh)
    u = torch.arange(g.ah).repeat_interleave(g.aw)  # anchor rows, (N2,)
    v = torch.arange(g.aw).repeat(g.ah)
    w2a = (y[:, None] - u[None, :] + g.ah - 1) * g.table_w + (x[:, None] - v[None, :] + g.aw - 1)
    a2w = (u[:, None] - y[None, :] + g.sh - 1) * g.table_w + (v[:, None] - x[None, :] + g.sw - 1)
    return a2w.to(device), w2a.to(device)


def _grid_ids(size_h, size_w, win_h, win_w, shift_h, shift_w) -> torch.Tensor:
    bh = region_ids_1d(size_h, win_h, shift_h)
    bw = region_ids_1d(size_w, win_w, shift_w)
    return _partition_ids(3 * bh[:, None] + bw[None, :], win_h, win_w)


@lru_cache(maxsize=256)
def _stripe_regions(g: StripeGeometry, device: torch.device):
    tok = _grid_ids(g.H, g.W, g.sh, g.sw, g.shift_h, g.shift_w)
    anc = _grid_ids(g.Ha, g.Wa, g.ah, g.aw, g.anchor_shift_h, g.anchor_shift_w)
    return tok.to(device), anc.to(device)


def _mask_from_ids(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    diff = a[:, :, None] != b[:, None, :]
    return torch.zeros(diff.shape, dtype=torch.float32, device=a.device).masked_fill_(diff, MASK_VALUE)


@lru_cache(maxsize=64)
def _stripe_masks(g: StripeGeometry, device: torch.device):
    tok, anc = _stripe_regions(g, device)
    return _mask_from_ids(anc, tok), _mask_from_ids(tok, anc)


def _perm(H, W, wh, ww, th, tw) -> torch.Tensor:
    idx = torch.arange(H * W).reshape(H, W)
    idx = torch.roll(idx, shifts=(-th, -tw), dims=(0, 1))
    return _partition_ids(idx, wh, ww).reshape(-1)


@lru_cache(maxsize=256)
def _stripe_perm(g: StripeGeometry, device: torch.device):
    tok = _perm(g.H, g.W, g.sh, g.sw, g.shift_h, g.shift_w)
    anc = _perm(g.Ha, g.Wa, g.ah, g.aw, g.anchor_shift_h, g.anchor_shift_w)
    return tok.to(device), anc.to(device)


@lru_cache(maxsize=256)
def _window_table(g: WindowGeometry, device: torch.device) -> torch.Tensor:
    pre = (g.pretrained, g.pretrained)
    return coords_table((g.ws, g.ws), (g.ws, g.ws), pre, 1).to(device)


@lru_cache(maxsize=256)
def _window_index(g: WindowGeometry, device: torch.device) -> torch.Tensor:
    y = torch.arange(g.ws).repeat_interleave(g.ws)
    x = torch.arange(g.ws).repeat(g.ws)
    idx = (y[:, None] - y[None, :] + g.ws - 1) * g.table_side + (x[:, None] - x[None, :] + g.ws - 1)
    return idx.to(device)


@lru_cache(maxsize=256)
def _window_regions(g: WindowGeometry, device: torch.device) -> torch.Tensor:
    return _grid_ids(g.H, g.W, g.ws, g.ws, g.shift, g.shift).to(device)


@lru_cache(maxsize=64)
def _window_mask(g: WindowGeometry, device: torch.device) -> torch.Tensor:
    ids = _window_regions(g, device)
    return _mask_from_ids(ids, ids)


@lru_cache(maxsize=256)
def _window_perm(g: WindowGeometry, device: torch.device) -> torch.Tensor:
    return _perm(g.H, g.W, g.ws, g.ws, g.shift, g.shift).to(device)
