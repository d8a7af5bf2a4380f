"""grl_kernels.restore: tiling and blending, the memory model, automatic tiles and out-of-memory
retries (the CLI is tested in tests/test_restore_cli.py, image files in tests/test_restore_io.py)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grl_kernels as G
from grl_kernels.models import GRL, build_preset
from grl_kernels.restore.memory import auto_tile, estimate_memory, live_tensor_peak
from grl_kernels.restore.tiling import blend_window, tile_grid


class Nearest(nn.Module):
    """A stand-in restoration model: x2 nearest upsampling of x * 0.5 + 0.25 (local, exact)."""

    pad_size, upscale, upsampler, in_channels, out_channels = 8, 2, "pixelshuffle", 3, 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape[2:]))
        return F.interpolate(x * 0.5 * self.w + 0.25, scale_factor=2, mode="nearest")


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    d = torch.load(fixtures_dir / "golden_grl_model.pt", weights_only=False)
    m = GRL(**d["kwargs"]).eval()
    m.load_state_dict(d["state_dict"], strict=False)
    return m


def smooth_image(h, w, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, c, max(2, h // 16), max(2, w // 16), generator=g)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]


@pytest.mark.parametrize("h,w,tile,ov", [(50, 70, 16, 4), (64, 64, 32, 8), (33, 100, 24, 12), (20, 20, 64, 8)])
def test_tiles_cover_and_weights_sum_to_one(h, w, tile, ov):
    grid = tile_grid(h, w, tile, ov)
    cover = torch.zeros(h, w)
    for y, x, th, tw in grid:
        assert y + th <= h and x + tw <= w and th == min(tile, h) and tw == min(tile, w)
        cover[y:y + th, x:x + tw] += blend_window(y, x, th, tw, h, w, ov, 1, "cpu")
    assert cover.min() > 0  # every pixel has weight
    win = blend_window(16, 16, 32, 32, 100, 100, 8, 1, "cpu")
    assert 0 < win.min() < 0.02 and win.max() == 1.0  # smooth ramp from ~0 to 1


def test_tiled_equals_untiled_for_a_local_model_and_constant_stays_constant():
    m = Nearest()
    img = torch.rand(3, 50, 70)
    whole = G.restore(m, img)
    tiled = G.restore(m, img, tile=16, overlap=6)
    assert tiled.shape == (3, 100, 140)
    assert (tiled - whole).abs().max() < 1e-6
    assert {c for c in m.calls[1:]} == {(16, 16)}  # every tile the same (pad-multiple) size
    const = torch.full((2, 3, 40, 56), 0.3)
    out = G.restore(m, const, tile=16, overlap=8)
    assert out.shape == (2, 3, 80, 112) and (out - 0.4).abs().max() < 1e-6


def test_tiled_grl_close_to_untiled(golden):
    """GRL sees the whole image (stripes span a quarter of its width, anchors pool all of it), so a
    tile is not a crop of the untiled result: observed max 0.062, mean 0.0099 with 32-px tiles and
    16 px of overlap on this random-weight model. The blend keeps that smooth (no seam jumps)."""
    img = smooth_image(64, 80)
    whole = G.restore(golden, img)
    tiled = G.restore(golden, img, tile=32, overlap=16)
    assert tiled.shape == whole.shape == (3, 128, 160)
    err = (tiled - whole).abs()
    assert err.max() < 0.1 and err.mean() < 0.015, (err.max(), err.mean())


def test_restore_arguments(golden):
    img = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="image must be"):
        G.restore(golden, torch.rand(16, 16))
    with pytest.raises(ValueError, match="channels"):
        G.restore(golden, torch.rand(1, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        G.restore(golden, torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tile"):
        G.restore(golden, img, tile="big")
    with pytest.raises(ValueError, match="overlap"):
        G.restore(golden, img, tile=16, overlap=-1)


def test_auto_tile_fits_the_budget(golden):
    size = (48, 64)
    whole = estimate_memory(golden, size)
    assert auto_tile(golden, size, torch.float32, "cpu", max_memory=4 * whole) is None
    t = auto_tile(golden, size, torch.float32, "cpu", max_memory=whole * 3 // 4)
    assert t is not None and t % golden.pad_size == 0 and t < 64
    t2 = auto_tile(golden, size, torch.float32, "cpu", max_memory=whole // 2)
    assert t2 < t
    with pytest.raises(ValueError, match="too small"):
        auto_tile(golden, size, torch.float32, "cpu", max_memory=1000)
    img = smooth_image(*size)
    out = G.restore(golden, img, tile="auto", max_memory=whole * 3 // 4)
    ref = G.restore(golden, img, tile=t)
    assert torch.equal(out, ref)


class OOMAbove(Nearest):
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[-1] * x.shape[-2] > self.limit:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
        return super().forward(x)


def test_out_of_memory_halves_the_tile():
    m = OOMAbove(20 * 20)
    img = torch.rand(3, 64, 64)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = G.restore(m, img, tile=64)
    assert m.calls[-1] == (16, 16)
    assert (out - G.restore(Nearest(), img)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="smallest tile"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G.restore(OOMAbove(1), img, tile=16)
    bad = OOMAbove(10 ** 9)
    bad.forward = lambda x: (_ for _ in ()).throw(RuntimeError("something else"))
    with pytest.raises(RuntimeError, match="something else"):
        G.restore(bad, img, tile=16)


def _peak(model, x, backend):
    def fn():
        with torch.no_grad(), G.use_backend(backend):
            return model(x)
    fn()
    return live_tensor_peak(fn, list(model.parameters()) + list(model.buffers()) + [x])


MEMORY_CASES = [
    ("golden", "cpu", torch.float32, (64, 96)),
    ("golden", "cpu", torch.bfloat16, (80, 64)),
    ("golden", "reference", torch.float32, (64, 64)),
    ("tiny_x4", "cpu", torch.float32, (64, 64)),
    ("tiny_denoise", "cpu", torch.float32, (64, 64)),
]


def _memory_model(name, golden):
    if name == "golden":
        return golden
    if name == "tiny_x4":  # GRL-S layout (pixelshuffle x4), 2 x 2 blocks
        return build_preset("grl_s", embed_dim=32, depths=[2, 2], num_heads_window=[2, 2], num_heads_stripe=[2, 2]).eval()
    return build_preset("grl_base_denoise_color", embed_dim=36, depths=[2, 2], num_heads_window=[3, 3],
                        num_heads_stripe=[3, 3], mlp_ratio=4).eval()


@pytest.mark.parametrize("name,backend,dtype,size", MEMORY_CASES)
def test_estimate_memory_matches_live_tensor_peak(golden, name, backend, dtype, size):
    m = _memory_model(name, golden).to(dtype)
    try:
        x = torch.rand(1, 3, *size, dtype=dtype)
        measured = _peak(m, x, backend)
        est = estimate_memory(m, size, dtype, backend)
        assert 0.75 * measured <= est <= 1.25 * measured, (est / 2 ** 20, measured / 2 ** 20)
    finally:
        m.float()


# the golden model in a fresh interpreter with the CLI's malloc setting (two torch threads)
_GOLDEN_PROLOGUE = r"""
import json, sys, torch, grl_kernels as G
from grl_kernels import heap
from grl_kernels.models import GRL
from grl_kernels.bench.timing import peak_memory
from grl_kernels.restore.memory import estimate_memory, release_freed_memory_promptly
assert release_freed_memory_promptly()
torch.set_num_threads(2)
d = torch.load(sys.argv[1], weights_only=False)
m = GRL(**d["kwargs"]).eval()
m.load_state_dict(d["state_dict"], strict=False)
"""


def _run_golden_script(body, fixtures_dir, env=None):
    """Runs _GOLDEN_PROLOGUE + body in a fresh interpreter; returns its last line of output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(G.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **(env or {}))
    r = subprocess.run([sys.executable, "-c", _GOLDEN_PROLOGUE + body, str(fixtures_dir / "golden_grl_model.pt")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


_RSS_BODY = r"""
x = torch.rand(1, 3, 128, 128)
def fn():
    with torch.no_grad(), G.use_backend("cpu"):
        return m(x)
fn()
print(min(peak_memory(fn) for _ in range(2)) / estimate_memory(m, (128, 128)))
"""


def test_estimate_memory_matches_process_peak_rss(fixtures_dir):
    """The process's peak resident memory (VmHWM growth, what a user sees) with the CLI's malloc
    setting, in a fresh interpreter."""
    ratio = float(_run_golden_script(_RSS_BODY, fixtures_dir))
    assert 0.75 <= ratio <= 1.25, ratio


_BUDGET_RSS_BODY = r"""
m.set_backend("cpu")
x = torch.rand(3, 256, 256)  # 8 MiB of float32 activations: the model's heap cache would open
fn = lambda: G.restore(m, x, max_memory=1 << 34)  # a budget: planned on live tensors
fn()
heap.block_cache_stats(reset_peak=True)
rss = min(peak_memory(fn) for _ in range(2))
print(json.dumps({"rss": rss, "stats": heap.block_cache_stats(), "heap_cache": m.heap_cache}))
"""


def _budget_run(fixtures_dir, env):
    import json

    return json.loads(_run_golden_script(_BUDGET_RSS_BODY, fixtures_dir, env))


def test_restore_under_budget_keeps_block_cache_at_live_peak(fixtures_dir):
    """Under a memory budget, restore keeps the heap cache when its block cache is there, held
    to the peak of blocks in use (slack 0): the process's peak RSS stays that of prompt release
    (glibc alone, freed blocks unmapped at once), and large blocks are reused, not faulted in
    again. Without the block cache, the heap cache is off under a budget."""
    from grl_kernels.backends.extension import availability
    from grl_kernels.heap import block_cache_available

    if not (availability("cpu")[0] and block_cache_available()):
        pytest.skip("the block cache needs glibc and the compiled CPU extension")
    cached = _budget_run(fixtures_dir, {})
    prompt = _budget_run(fixtures_dir, {"GRL_KERNELS_BLOCK_CACHE": "0"})
    st = cached["stats"]
    assert cached["heap_cache"] and prompt["heap_cache"]  # the model's setting is given back
    assert st["installed"] == 1 and st["hits"] + st["fits"] > 0, st
    assert st["peak_resident_bytes"] <= st["high_water_bytes"], st  # slack 0
    assert prompt["stats"] == {"installed": 0}
    assert cached["rss"] <= 1.15 * prompt["rss"], (cached["rss"] / 2 ** 20, prompt["rss"] / 2 ** 20, st)
