"""Tiled inference: a grid of overlapping tiles, run one by one, blended with a smooth window.

Tiles are squares of side ``tile`` (a multiple of the model's pad size, or the whole side when
the image is smaller). Along each axis they start every ``tile - overlap`` pixels, the last one
flush with the far edge. Each tile's output is weighted by a separable window that is 1 inside
and rises smoothly (raised cosine) from near 0 to 1 across the ``overlap`` pixels of each edge
that faces another tile (edges on the image border keep weight 1); the image is the weighted sum
divided by the sum of the weights, so the weights of overlapping tiles always sum to one and a
constant output stays constant.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def model_geometry(model) -> Tuple[int, int, int, int]:
    """(pad size, scale, in channels, out channels) of a GRL model (compiled or not)."""
    m = getattr(model, "_orig_mod", model)
    pad = int(getattr(m, "pad_size", 1) or 1)
    scale = int(getattr(m, "upscale", 1)) if getattr(m, "upsampler", "") else 1
    cin = int(getattr(m, "in_channels", 3))
    cout = int(getattr(m, "out_channels", cin) or cin)
    return pad, scale, cin, cout


def round_tile(tile: int, pad: int) -> int:
    """``tile`` rounded down to a multiple of ``pad`` (at least ``pad``)."""
    return max(pad, (int(tile) // pad) * pad)


def axis_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Tile starts along one axis of ``size`` pixels (tiles of ``min(tile, size)``)."""
    if tile >= size:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def tile_grid(h: int, w: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """(top, left, height, width) of every tile, row-major."""
    th, tw = min(tile, h), min(tile, w)
    return [(y, x, th, tw) for y in axis_starts(h, tile, overlap) for x in axis_starts(w, tile, overlap)]


def effective_overlap(tile: int, overlap: int) -> int:
    """The overlap actually used: at most half a tile, so that tiles still advance."""
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    return min(int(overlap), tile // 2)


def _ramp(n: int, ramp: int, low_edge: bool, high_edge: bool, device) -> torch.Tensor:
    """1-D window of length n: raised-cosine ramps of ``ramp`` samples on the edges that face a tile."""
    w = torch.ones(n, dtype=torch.float64, device=device)
    r = min(ramp, n // 2)
    if r > 0:
        t = (torch.arange(r, dtype=torch.float64, device=device) + 0.5) / r  # in (0, 1), never 0
        up = 0.5 - 0.5 * torch.cos(math.pi * t)
        if low_edge:
            w[:r] = up
        if high_edge:
            w[n - r:] = up.flip(0)
    return w


def blend_window(top: int, left: int, th: int, tw: int, h: int, w: int, ramp: int, scale: int,
                 device) -> torch.Tensor:
    """(th*scale, tw*scale) weights of a tile at (top, left) in an (h, w) image."""
    wy = _ramp(th * scale, ramp * scale, top > 0, top + th < h, device)
    wx = _ramp(tw * scale, ramp * scale, left > 0, left + tw < w, device)
    return (wy[:, None] * wx[None, :]).float()


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: int,
              out_channels: int, on_tile: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Run ``fn`` over the tiles of x (B, C, H, W) and blend the outputs into (B, Cout, H*s, W*s), float32.

    ``on_tile(done, total)`` is called after each tile. The result stays on x's device; each
    tile goes through ``fn`` on its own.
    """
    B, _, H, W = x.shape
    ov = effective_overlap(tile, overlap)
    grid = tile_grid(H, W, tile, ov)
    if len(grid) == 1:
        out = fn(x).float()
        if on_tile:
            on_tile(1, 1)
        return out
    out = torch.zeros(B, out_channels, H * scale, W * scale, dtype=torch.float32, device=x.device)
    wsum = torch.zeros(1, 1, H * scale, W * scale, dtype=torch.float32, device=x.device)
    for i, (y0, x0, th, tw) in enumerate(grid):
        y = fn(x[:, :, y0:y0 + th, x0:x0 + tw]).float()
        win = blend_window(y0, x0, th, tw, H, W, ov, scale, x.device)
        ys, xs = y0 * scale, x0 * scale
        out[:, :, ys:ys + th * scale, xs:xs + tw * scale].addcmul_(y, win)
        wsum[:, :, ys:ys + th * scale, xs:xs + tw * scale] += win
        del y
        if on_tile:
            on_tile(i + 1, len(grid))
    return out.div_(wsum)


def tile_count(h: int, w: int, tile: Optional[int], overlap: int) -> int:
    if tile is None:
        return 1
    return len(tile_grid(h, w, tile, effective_overlap(tile, overlap)))
