"""A model of the peak memory of GRL inference, free-memory queries, and the automatic tile size.

:func:`estimate_memory` counts the bytes of the tensors alive at the two peaks of an eager
no-grad forward (see docs/restore.md for the derivation), with L = B * H_pad * W_pad tokens,
C = embed_dim, e = bytes per element:

* body, inside a block: the stage input and the block input stay alive (2 L C; conv_first's
  output is computed again for the long residual instead of kept) while the attention holds one
  qkv half (1.5 L C; the halves are computed one after the other) and both halves of its
  output (L C): 4.5 L C; CAB (GRL-B) holds the attention branch's output and its own conv
  outputs (2.25 L C) on top of the 2 L C; the MLP holds the fc1 output (GELU in place,
  r L C for mlp_ratio r) and fc2's (L C). Residuals are added in place without autograd. The reference backend adds its materialized windows and attention
  maps; the fused backends only small per-call geometry tables.
* tail: the upsampler. A pixel-shuffle step holds its conv output and the shuffled copy
  (2 * 4 * 64 channels at the step's input resolution), so x4 'pixelshuffle' peaks at
  2048 L elements at the last step, more than the body of GRL-S or GRL-B; the model runs it in
  row bands when large (``GRL.tail_bands``): then one band's share of that, plus the output.

The estimate matches the peak of live tensor storage; the process's resident memory follows it
when glibc serves large blocks by mmap (:func:`release_freed_memory_promptly`, which the command
line calls; glibc's default heap keeps and fragments freed blocks, adding 50-90 %).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

from .tiling import effective_overlap, model_geometry, round_tile, tile_count

_MIB = 2 ** 20


def _geom(model):
    m = getattr(model, "_orig_mod", model)
    for attr in ("embed_dim", "layers", "pad_size"):
        if not hasattr(m, attr):
            raise TypeError(f"estimate_memory needs a grl_kernels.models.GRL model, got {type(m).__name__}")
    return m


def _mlp_ratio(m) -> float:
    for blk in m.layers[0].blocks:
        return blk.mlp.fc1.out_features / blk.mlp.fc1.in_features
    return 0.0


def _reference_attention_elems(m, L: int) -> float:
    """Elements the reference path materializes per token at its peak (windows, maps, softmax)."""
    blk = m.layers[0].blocks[0].attn
    hw, hs = blk.window_attn.num_heads, blk.stripe_attn.num_heads
    n_w = m.window_size ** 2
    ss = [s if s is not None else 0 for s in m.stripe_size]
    n1 = max(1, ss[0] or 64) * max(1, ss[1] or 64)
    f = m.anchor_window_down_factor
    n2 = max(1, n1 // (f * f))
    # window: bias + logits + softmax (3 maps of n_w per token and head) and the q,k,v windows
    window = 3 * hw * n_w + 1.5 * m.embed_dim
    stripe = 3 * hs * n2 + 1.5 * m.embed_dim
    return max(window, stripe)


def _element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(model, size: Sequence[int], dtype=torch.float32, backend: Optional[str] = None,
                    batch: int = 1) -> int:
    """Peak bytes of an eager no-grad forward of ``model`` on a (batch, C, H, W) image, ``size`` = (H, W).

    Above the memory of the loaded model and of the input. ``backend``: the attention backend
    ('reference' materializes attention maps; fused backends and None/'auto' do not).
    """
    m = _geom(model)
    H, W = (int(s) for s in size)
    if H <= 0 or W <= 0:
        raise ValueError(f"size must be positive (H, W), got {tuple(size)}")
    pad, scale, cin, cout = model_geometry(m)
    Hp, Wp = math.ceil(H / pad) * pad, math.ceil(W / pad) * pad
    L = batch * Hp * Wp
    C = m.embed_dim
    r = _mlp_ratio(m)
    f = m.anchor_window_down_factor
    # the stage input and the block input (conv_first's output is not kept for the long
    # residual: GRL._body computes it again at the end)
    held = 2 * C if sum(len(s.blocks) for s in m.layers) > 1 else C
    anchors = 1.5 * C / (f * f)
    if getattr(m.layers[0].blocks[0].attn.qkv, "proj_type", "linear") == "linear":
        attn = held + 2.5 * C + anchors  # one qkv half at a time (1.5C) and both attention outputs (C)
    else:
        attn = held + 4 * C + anchors  # qkv (3C) and both attention outputs (C); freed before cat + proj
    if backend == "reference":
        attn = held + 3 * C + _reference_attention_elems(m, L)
    cab = getattr(m.layers[0].blocks[0], "local_connection", False)
    # after the branches, the block's tail (projection, norms, residuals, MLP) runs in token chunks
    # (EfficientMixAttnTransformerBlock._inference_forward): the attention outputs (C), CAB's
    # output (C) and one chunk's temporaries, at most max(2, r + 1) C per chunk row (concatenation
    # and projection; MLP hidden and fc2 output)
    frac = m.layers[0].blocks[0].chunk_rows(L, _element_size(dtype)) / L
    keep = 2 * C if cab else C
    if frac >= 1:  # one chunk: the branches are freed after the concatenation, CAB's output after its sum
        chunk = held + max(keep + C, (r + 1) * C)
    else:
        chunk = held + keep + frac * max(2 * C, (r + 1) * C)
    body = max(attn, chunk)
    if cab:
        # CAB while the attention outputs wait: conv outputs C/4 and C (GELU and the channel-attention product in place)
        body = max(body, held + 2.25 * C)
    nf = 64
    if m.upsampler == "pixelshuffle":
        steps = [4] * int(round(math.log2(scale))) if scale & (scale - 1) == 0 else [9]
        res, tail = 1, C + nf
        for k in steps:
            tail = max(tail, (nf + k * nf) * res, 2 * k * nf * res)
            res *= k
        tail = max(tail, (nf + cout) * res, 2 * cout * res)
    elif m.upsampler == "pixelshuffledirect":
        tail = C + 2 * scale * scale * cout
    elif m.upsampler == "nearest+conv":
        tail = max(2 * 4 * nf, 2 * 16 * nf, 16 * (nf + cout))
    else:
        tail = 3 * C + 2 * cout
    tail += C / (scale * scale) if m.upsampler else 0  # the body output, early in the tail
    plan = m.tail_bands(batch, Hp, Wp, _element_size(dtype)) if hasattr(m, "tail_bands") else None
    if plan is not None:  # banded upsampler: the chain's tensors of one band, plus the whole output twice
        band, radius = plan
        frac = min(1.0, (band + 2 * radius) / Hp)
        tail = 2 * C / (scale * scale) + frac * tail + 2 * cout
    per_token = max(body, tail) + 2 * cin  # + the padded and normalized input
    return int(per_token * L * _element_size(dtype))


# ---------------------------------------------------------------- free memory
def _cgroup_free() -> Optional[int]:
    for limit_f, used_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                lim = f.read().strip()
            with open(used_f) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 1 << 60:
            return max(0, int(lim) - used)
    return None


def free_memory(device) -> int:
    """Bytes free for tensors on ``device``: CUDA's free memory plus what its cache holds unused;
    on the CPU MemAvailable of /proc/meminfo (and the cgroup's limit, when lower)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = 8 * 2 ** 30
    cg = _cgroup_free()
    return min(avail, cg) if cg is not None else avail


def default_budget(device) -> int:
    """Most of the free memory: 80 % on the CPU, 90 % on CUDA."""
    device = torch.device(device)
    return int(free_memory(device) * (0.9 if device.type == "cuda" else 0.8))


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes."""
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    mult = 1
    if s and s[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(s[-1]) + 1)
        s = s[:-1]
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"memory size must look like 4G, 512M or a number of bytes, got {text!r}") from None
    if v <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(v * mult)


def full_image_bytes(model, size, batch: int, dtype) -> int:
    """Buffers of tiled inference that span the whole image: the input in the compute dtype, the
    float32 output accumulator, the weight sum and the returned copy."""
    _, scale, cin, cout = model_geometry(model)
    H, W = size
    return int(batch * cin * H * W * _element_size(dtype) + (2 * batch * cout + 1) * H * W * scale * scale * 4)


def auto_tile(model, size, dtype, device, max_memory: Optional[int] = None, overlap: int = 32, batch: int = 1,
              backend: Optional[str] = None) -> Optional[int]:
    """Largest tile side (a pad-size multiple) whose estimated peak fits ``max_memory``; None when the
    whole image fits untiled. ValueError when even the smallest tile does not fit."""
    budget = default_budget(device) if max_memory is None else int(max_memory)
    pad, scale, cin, cout = model_geometry(model)
    H, W = size
    whole = estimate_memory(model, (H, W), dtype, backend, batch) + batch * cin * H * W * _element_size(dtype)
    if whole <= budget:
        return None
    fixed = full_image_bytes(model, size, batch, dtype)
    top = round_tile(max(H, W), pad)
    t = top
    while t >= pad:
        th, tw = min(t, H), min(t, W)
        tile_extra = 2 * batch * cout * th * tw * scale * scale * 4  # the tile's float32 output and the window
        if fixed + estimate_memory(model, (th, tw), dtype, backend, batch) + tile_extra <= budget:
            return t
        t -= pad
    need = fixed + estimate_memory(model, (min(pad, H), min(pad, W)), dtype, backend, batch)
    raise ValueError(f"memory budget of {budget / _MIB:.0f} MiB is too small: the smallest tile ({pad} px) "
                     f"needs about {need / _MIB:.0f} MiB for this {H}x{W} image")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def release_freed_memory_promptly(threshold: int = 128 << 10) -> bool:
    """Serve allocations above ``threshold`` bytes (128 KiB) by mmap (glibc ``mallopt``), so freed activations go
    back to the OS at once instead of staying in a fragmented heap: the process's peak resident
    memory then equals the peak of live tensors (the default dynamic threshold adds 50-90 % on
    GRL). Process-wide; returns False where glibc is not available. See :func:`grl_kernels.heap.release_promptly`."""
    from ..heap import release_promptly

    return release_promptly(threshold)


# ---------------------------------------------------------------- measuring
def live_tensor_peak(fn, ignore=()) -> int:
    """Peak bytes of tensor storage created by ``fn()`` and alive at once (its result included).

    Counts every storage an op returns that was not alive before, except those of ``ignore``
    (e.g. ``model.parameters()``, whose views ops also return). Blind to memory a C++ op
    allocates and frees inside itself (the fused kernels allocate none of size).
    """
    from ..bench.timing import LiveStorage

    mode = LiveStorage(ignore)
    with mode:
        out = fn()
    del out
    return int(mode.peak)
