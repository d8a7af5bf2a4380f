"""``grl_kernels.restore``: run a restoration model on an image tensor, whole or in tiles."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch

from ..heap import COMPILED_MAX_FIT, block_cache_available, heap_cache
from .memory import auto_tile, is_out_of_memory
from .tiling import model_geometry, round_tile, run_tiled, tile_count


def _model_param(model):
    m = getattr(model, "_orig_mod", model)
    for p in m.parameters():
        return p
    return None


def resolve_tile(model, size, tile, overlap: int, dtype, device, max_memory=None, batch: int = 1,
                 backend=None) -> Optional[int]:
    """The tile side used for an image of ``size`` = (H, W): None (whole image) or a pad multiple."""
    pad = model_geometry(model)[0]
    if tile is None:
        return None
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile must be None, a positive int or 'auto', got {tile!r}")
        return auto_tile(model, size, dtype, device, max_memory=max_memory, overlap=overlap, batch=batch,
                         backend=backend)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ValueError(f"tile must be None, a positive int or 'auto', got {tile!r}")
    t = round_tile(tile, pad)
    return None if t >= max(size) else t


def restore(model, image: torch.Tensor, *, tile: Union[None, int, str] = None, overlap: int = 32,
            dtype: Optional[torch.dtype] = None, device=None, max_memory: Optional[int] = None,
            on_tile: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Restore ``image``, a (C, H, W) or (B, C, H, W) float tensor in [0, 1], with ``model``.

    ``tile``: None (the whole image at once), a side in pixels (rounded down to a multiple of the
    model's pad size) or ``"auto"`` (the largest that fits ``max_memory`` bytes, default most of the
    device's free memory; see :func:`grl_kernels.estimate_memory`). Tiles overlap by ``overlap``
    pixels (at most half a tile) and are blended with a raised-cosine window. On out-of-memory the
    tile is halved and the image restarted; a ValueError when even the smallest tile fails.
    ``dtype``/``device``: where and in which dtype the model runs (default: those of its
    parameters; the model is moved there). The result has the input's rank, device and dtype,
    (.., C_out, H * scale, W * scale), not clamped. ``on_tile(done, total)`` reports progress.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4):
        raise ValueError(f"image must be (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating tensor in [0, 1], got {image.dtype}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    pad, scale, cin, cout = model_geometry(model)
    x = image if image.dim() == 4 else image.unsqueeze(0)
    if x.shape[1] != cin:
        raise ValueError(f"image has {x.shape[1]} channels, the model expects {cin}")
    p = _model_param(model)
    device = torch.device(device) if device is not None else (p.device if p is not None else x.device)
    dtype = dtype or (p.dtype if p is not None else torch.float32)
    if p is not None and (p.device != device or p.dtype != dtype):
        model.to(device=device, dtype=dtype)
    H, W = x.shape[2:]
    t = resolve_tile(model, (H, W), tile, overlap, dtype, device, max_memory, batch=x.shape[0])
    xd = x.to(device=device, dtype=dtype)

    def fn(inp):
        return model(inp)

    # the heap cache (grl_kernels.heap) spans all tiles, so that blocks freed by one tile are
    # reused by the next. A memory budget counts live tensors: under one only its block cache
    # runs, held to the peak of blocks in use (glibc's heap would add its fragmentation), and the
    # model's own cache is off where the block cache is not available
    m = getattr(model, "_orig_mod", model)
    cache = getattr(m, "heap_cache", None)
    budgeted = tile == "auto" or max_memory is not None
    on_cpu = device.type == "cpu"
    if budgeted and cache is not None and not (on_cpu and block_cache_available()):
        m.heap_cache = False
    try:
        with heap_cache(enabled=bool(getattr(m, "heap_cache", False)) and on_cpu, bounded=budgeted,
                        max_fit=COMPILED_MAX_FIT if m is not model else None):  # a CompiledGRL
            while True:
                try:
                    with torch.no_grad():
                        if t is None:
                            out = fn(xd).float()
                            if on_tile:
                                on_tile(1, 1)
                        else:
                            out = run_tiled(fn, xd, t, overlap, scale, cout, on_tile)
                    break
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                    if not is_out_of_memory(exc):
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    current = t if t is not None else round_tile(max(H, W), pad)
                    if current <= pad:
                        raise ValueError(f"out of memory even with the smallest tile ({pad} px): {exc}") from None
                    t = round_tile(current // 2, pad)
                    warnings.warn(f"out of memory with tiles of {current} px; retrying with {t} px", RuntimeWarning)
    finally:
        if cache is not None:
            m.heap_cache = cache
    out = out.to(device=image.device, dtype=image.dtype)
    return out if image.dim() == 4 else out[0]
