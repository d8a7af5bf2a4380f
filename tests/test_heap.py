"""grl_kernels.heap (freed blocks kept in the C heap during inference calls) and the model's
banded upsampler tail: same outputs, fewer page faults, memory given back.

Page faults are counted with getrusage (minor faults of this process): a 64 MiB block that glibc
serves by mmap is faulted in page by page (16384 faults) every time it is allocated and touched.
"""
import os
import resource
import subprocess
import sys

import pytest
import torch

from grl_kernels import heap
from grl_kernels.models import GRL

BLOCK = 64 * 2 ** 20  # above glibc's largest mmap threshold (32 MiB): always mmap outside the cache
PAGES = BLOCK // 4096

pytestmark = pytest.mark.skipif(not heap.supported(), reason="glibc heap cache not supported here")


def _faults(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _touch():
    t = torch.empty(BLOCK // 4)
    t.fill_(1.0)
    del t


def _check_reuse_and_give_back():
    _touch()
    outside = _faults(_touch)
    assert outside > PAGES // 2, f"outside the cache a 64 MiB block should be mmapped and faulted in: {outside}"
    with heap.heap_cache():
        assert heap.active()
        _touch()  # the first uses grow the heap (the first reuse may still fault when brk had to move)
        _touch()
        inside = min(_faults(_touch) for _ in range(3))
        with heap.heap_cache():  # nested: no change (min of 3 as above: CI once saw one full re-fault)
            inside_nested = min(_faults(_touch) for _ in range(3))
        assert heap.active()
    assert not heap.active()
    assert inside < PAGES // 20, f"inside the cache the freed block should be reused: {inside} faults"
    assert inside_nested < PAGES // 20, inside_nested
    after = _faults(_touch)
    assert after > PAGES // 2, f"after the scope, mmap (and so page faults) should be back: {after}"


def test_heap_cache_reuses_blocks_and_gives_them_back():
    # in a fresh interpreter: after other tests the heap may hold a free, resident chunk of 64 MiB
    # (served without faults even outside the cache), or this thread may have moved to a non-main
    # arena (which maps blocks above 64 MiB whatever M_MMAP_MAX says)
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_heap; test_heap._check_reuse_and_give_back()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_heap_cache_returns_memory_to_the_system():
    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    before = rss()
    with heap.heap_cache():
        blocks = [torch.ones(BLOCK // 4) for _ in range(4)]
        del blocks
        held = rss()
    after = rss()
    assert held - before > 2 * BLOCK, "the freed blocks should stay resident inside the cache"
    assert after - before < BLOCK // 2, f"leaving the cache should give them back: {(after - before) / 2**20:.0f} MiB kept"


def test_heap_cache_disabled_by_env():
    code = ("from grl_kernels import heap\n"
            "with heap.heap_cache():\n    assert not heap.active()\n"
            "assert not heap.supported()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "GRL_KERNELS_HEAP_CACHE": "0"})


def _tiny(**kw):
    base = dict(embed_dim=16, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=8,
                stripe_size=[8, None], stripe_groups=[None, 2], anchor_window_down_factor=2, upscale=1,
                upsampler="")
    base.update(kw)
    torch.manual_seed(0)
    return GRL(**base).eval()


def test_model_output_same_with_and_without_heap_cache():
    m = _tiny(upscale=2, upsampler="pixelshuffledirect")
    m.HEAP_CACHE_MIN_BYTES = 0  # take the cached path at this small size
    x = torch.rand(1, 3, 24, 32)
    with torch.no_grad():
        assert m._use_heap_cache(x)
        cached = m(x)
        m.heap_cache = False
        plain = m(x)
    assert torch.equal(cached, plain)
    assert not m._use_heap_cache(x)
    m.heap_cache = True
    with torch.enable_grad():
        assert not m._use_heap_cache(x)  # autograd calls keep the default allocator behaviour


@pytest.mark.parametrize("upsampler,scale", [("pixelshuffle", 4), ("pixelshuffle", 2), ("pixelshuffle", 3),
                                             ("nearest+conv", 4)])
def test_banded_upsampler_tail_matches_unbanded(upsampler, scale):
    """The tail in bands of a few rows (each with its halo) gives the unbanded output: every
    band boundary is inside the image, so a halo one row too small changes rows near them."""
    m = _tiny(upscale=scale, upsampler=upsampler)
    feats = torch.randn(1, 16, 37, 21)  # odd height: a short last band
    with torch.no_grad():
        m.tail_band_bytes = 0
        full = m._tail(feats)
        per_row = 64 * scale * scale * 21 * 4
        m.tail_band_bytes = 3 * per_row  # bands of 3-5 rows: many boundaries
        banded = m._tail(feats)
    assert banded.shape == full.shape == (1, 3, 37 * scale, 21 * scale)
    assert ((banded - full).abs().max() / full.abs().max()).item() <= 1e-5  # oneDNN picks its blocking by size: ~1e-6 apart; a short halo is ~1e-1
    with torch.enable_grad():  # autograd calls are never banded
        assert torch.equal(m._tail(feats).detach(), full)


# ---------------------------------------------------------------- the block cache of large blocks
_BLOCK_CACHE_CHECKS = r"""
import json, resource, threading, torch
from grl_kernels import heap
from grl_kernels.backends.extension import load
load("cpu")
MiB = 2 ** 20
def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def touch(mib):
    t = torch.empty(mib * MiB // 4)
    t.fill_(1.0)
    return t
out = {"before": heap.block_cache_stats()}
with heap.heap_cache(max_fit=2.0):  # as compiled calls (the default, exact sizes, below)
    s0 = heap.block_cache_stats(reset_peak=True)
    a = touch(64)
    out["first_faults"] = 0  # mapped with MAP_POPULATE: counted as faults, but in one call
    del a
    out["reuse_faults"] = faults(lambda: touch(64))  # same size: the cached block, no page faults
    s1 = heap.block_cache_stats()
    b = touch(40)  # smaller, but more than half of the cached 64 MiB block: that one, whole
    s2a = heap.block_cache_stats()
    del b
    b = touch(24)  # less than half: 64 cached + 24 new > the 64 MiB high-water mark -> 64 cut to 24
    s2 = heap.block_cache_stats()
    keep = touch(16)  # allocated inside, freed after the scope
    del b
    small = torch.empty(1000)  # below the minimum: the default allocator
    # two threads allocating and freeing at once
    def work():
        for _ in range(50):
            t = touch(2)
            t.add_(1)
    th = [threading.Thread(target=work) for _ in range(2)]
    [t.start() for t in th]
    [t.join() for t in th]
    s3 = heap.block_cache_stats()
s4 = heap.block_cache_stats()
del keep
s5 = heap.block_cache_stats()
with heap.heap_cache():  # default (exact sizes): a 40 MiB request does not take a cached 64 MiB block
    a = touch(64)
    del a
    heap.block_cache_stats(reset_peak=True)
    b = touch(40)
    out["exact"] = heap.block_cache_stats()
    del b
with heap.heap_cache():  # growing a cached block: only the difference is new
    heap.block_cache_stats(reset_peak=True)
    a = touch(32)
    a_ptr = a.data_ptr()
    del a
    b = touch(48)
    b.fill_(2.0)
    s6 = heap.block_cache_stats()
    out["grown_ok"] = bool((b == 2.0).all())
    del b
out.update(s0=s0, s1=s1, s2a=s2a, s2=s2, s3=s3, s4=s4, s5=s5, s6=s6)
print("RESULT " + json.dumps(out))
"""


def _run_checks(env=None):
    r = subprocess.run([sys.executable, "-c", _BLOCK_CACHE_CHECKS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    import json

    return json.loads(line[len("RESULT "):])


def _have_cpu_extension():
    from grl_kernels.backends.extension import availability

    return availability("cpu")[0]


@pytest.mark.skipif(not _have_cpu_extension(), reason="compiled CPU extension not available")
def test_block_cache_reuses_bounds_and_gives_back():
    """Large blocks inside a scope: reused by size without faults; cached bytes never push the
    resident total past the high-water mark of bytes in use; all unmapped after the scope."""
    r = _run_checks()
    MiB = 2 ** 20
    assert r["before"] == {"installed": 0}  # nothing is installed before the first scope
    s1, s2, s3, s4, s5 = (r[k] for k in ("s1", "s2", "s3", "s4", "s5"))
    assert s1["installed"] == 1 and s1["depth"] == 1
    assert s1["hits"] == 1 and s1["maps"] == 1, s1  # the second 64 MiB block was the first one
    assert r["reuse_faults"] < 64 * MiB // 4096 // 20, r["reuse_faults"]
    # a 40 MiB request takes the cached 64 MiB block whole (counted at 64 MiB): no new mapping
    s2a = r["s2a"]
    assert s2a["fits"] == 1 and s2a["maps"] == 1 and s2a["resizes"] == 0, s2a
    assert s2a["cached_bytes"] == 0 and s2a["in_use_bytes"] == 64 * MiB, s2a
    # a 24 MiB request: the cached 64 MiB block is cut to 24 MiB (its tail unmapped) rather than
    # a new one mapped
    assert s2["resizes"] == 1 and s2["maps"] == 1 and s2["cached_bytes"] == 0 and s2["in_use_bytes"] == 24 * MiB, s2
    assert s2["high_water_bytes"] == 64 * MiB and s2["peak_resident_bytes"] == 64 * MiB, s2
    assert s3["peak_resident_bytes"] <= s3["high_water_bytes"], s3
    assert s3["hits"] >= 90, s3  # the threads' 2 MiB blocks come back from the cache
    assert s4["depth"] == 0 and s4["cached_bytes"] == 0 and s4["in_use_bytes"] == 16 * MiB, s4
    assert s5["in_use_bytes"] == 0 and s5["unmaps"] == s4["unmaps"] + 1, s5
    s6 = r["s6"]  # 32 MiB cached, 48 MiB asked for with no room for both: the 32 MiB block grows
    assert s6["maps"] == 1 and s6["resizes"] == 1 and s6["mapped_bytes"] == 32 * MiB + 16 * MiB, s6
    assert s6["peak_resident_bytes"] <= s6["high_water_bytes"] * 1.1 + 1, s6
    assert r["grown_ok"]
    ex = r["exact"]  # exact sizes: 64 cached + 40 > the 64 MiB mark -> the 64 MiB block cut to 40
    assert ex["fits"] == 0 and ex["resizes"] == 1 and ex["in_use_bytes"] == 40 * MiB, ex


@pytest.mark.skipif(not _have_cpu_extension(), reason="compiled CPU extension not available")
def test_block_cache_disabled_by_env():
    r = _run_checks({"GRL_KERNELS_BLOCK_CACHE": "0"})
    assert r["s1"] == {"installed": 0}


# The backwards' qkv gradient (written whole by the kernels) is advised for transparent huge pages
# (advise_huge_pages, csrc/cpu/grl_cpu_common.h). A 50 MiB gradient (window 8 at 256 x 256, 2 heads
# of 32) is a fresh mmap each call: about 12800 faults of 4 KiB, or a few dozen of 2 MiB.
_HUGEPAGE_CHECK = r"""
import resource, torch
from grl_kernels.backends import cpu_backend
from grl_kernels.geometry import window_geometry
torch.set_num_threads(1)
g = window_geometry((256, 256), 8, True)
qkv = torch.randn(1, 256 * 256, 3 * 64, requires_grad=True)
tau = (torch.rand(2) + 1).requires_grad_()
bias = torch.rand(g.table_rows, 2).requires_grad_()
out = cpu_backend.window(qkv, g, 2, tau, bias)
go = torch.randn_like(out)
torch.autograd.grad(out, [qkv, tau, bias], go, retain_graph=True)  # warm-up
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.autograd.grad(out, [qkv, tau, bias], go, retain_graph=True)
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _backward_faults(env):
    r = subprocess.run([sys.executable, "-c", _HUGEPAGE_CHECK], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return int(next(ln for ln in r.stdout.splitlines() if ln.startswith("FAULTS ")).split()[1])


@pytest.mark.skipif(not _have_cpu_extension(), reason="compiled CPU extension not available")
@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode here")
def test_backward_gradient_on_huge_pages():
    pages = 256 * 256 * 3 * 64 * 4 // 4096  # 4 KiB pages of the qkv gradient
    advised = _backward_faults({})
    plain = _backward_faults({"GRL_KERNELS_HUGEPAGES": "0"})
    assert plain > pages * 0.9, f"without the advice the gradient is faulted in 4 KiB at a time: {plain}"
    assert advised < pages // 4, f"advised, the gradient should fault in 2 MiB at a time: {advised} of {pages} pages"
