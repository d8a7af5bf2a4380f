"""Keep freed blocks in the C heap for the length of an inference call (glibc only).

Why: on Linux, PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives them back with ``munmap`` when
freed, and it trims the heap's free top above its trim threshold. Each new block is then
faulted in page by page on first touch (about 1 us per 4 KiB page here). A GRL forward at
256x256 allocates and frees the same few (L, C)-sized tensors in every block: measured on
GRL-T, 440 000 page faults per forward, a quarter of its time (``benchmarks/results``).

What: inside :func:`heap_cache`, ``mallopt`` makes every block come from the heap
(``M_MMAP_MAX`` 0) and stops automatic trimming (``M_TRIM_THRESHOLD`` 2 GiB), so a block freed
by one transformer block is reused by the next without new faults. On leaving the outermost
scope, mmap is allowed again and ``malloc_trim(0)`` gives the cached memory back to the system,
so the process's memory after the call is what it was. The cost: peak memory grows by the
heap's fragmentation (measured below). A side effect outlives the scope: once thresholds are
set, glibc stops adapting them, so on exit they are set to the values its own adaptation
reaches in any process that frees tensors of 32 MiB or more (mmap threshold 32 MiB, trim
threshold 64 MiB); setting glibc's lower initial defaults back would make every later
allocation of the process slower than it would otherwise be.

Large blocks (1 MiB and up): where the compiled CPU extension is loaded or installed prebuilt,
the scope also opens its block cache (csrc/cpu/grl_cpu_block_cache.cpp), which serves them
instead of glibc: freed blocks are kept for reuse (a request takes a cached block of its size,
or, in compiled calls, the smallest cached one of up to twice its size, whole), new ones are mapped with their
pages filled in one call, and when in-use plus cached bytes would pass the scope's high-water
mark of bytes in use plus ``BLOCK_CACHE_SLACK`` (10 %), the cached block closest in size is cut
or grown instead (its resident pages reused) and others are unmapped, least recently freed
first. The heap then holds only the small blocks, and the peak resident memory follows the
live tensors' peak: GRL-B at 256x256, float32, 2 cores, 234 MiB RSS for 208 MiB of live
tensors, against 345-390 MiB with large blocks in glibc's heap, at the same speed (1.2 GB of
its 11.8 GB of large allocations per forward newly faulted in). ``GRL_KERNELS_BLOCK_CACHE=0``
leaves large blocks to glibc, as before.

Nested and concurrent scopes share one count: only the outermost entry and exit touch the
allocator. Elsewhere (non-glibc, ``GRL_KERNELS_HEAP_CACHE=0``) the scope does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# what glibc's own dynamic thresholds converge to once blocks of 32 MiB or more have been freed
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice that for trimming); its default mmap count
_SETTLED_MMAP_THRESHOLD = 32 * 2 ** 20
_SETTLED_TRIM_THRESHOLD = 64 * 2 ** 20
_GLIBC_DEFAULT_MMAP_MAX = 65536
_CACHE_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int

_lock = threading.Lock()
_depth = 0
# the thresholds set on leaving the outermost scope: the settled ones, or what the process chose
# through release_promptly (e.g. grl-kernels restore under a memory budget)
_exit_thresholds = [_SETTLED_MMAP_THRESHOLD, _SETTLED_TRIM_THRESHOLD]
_libc = []  # [CDLL or None], resolved on first use
# the block cache serves requests of at least this many bytes; cached bytes may exceed the
# high-water mark of bytes in use by this fraction
BLOCK_CACHE_MIN_BYTES = 1 << 20
BLOCK_CACHE_SLACK = 0.1
# a request may take a cached block of up to this many times its size, whole: 1 (exact sizes)
# by default; compiled graphs (grl_kernels.optimize) ask for COMPILED_MAX_FIT, see heap_cache
BLOCK_CACHE_MAX_FIT = 1.0
COMPILED_MAX_FIT = 2.0
_block_cache = []  # the extension module of the scope that opened it, while open
_bounded = [False]  # the outermost open scope's choice


def _glibc():
    if not _libc:
        lib = None
        try:
            cand = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            cand.gnu_get_libc_version  # glibc only: musl and others have other allocators
            cand.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            cand.malloc_trim.argtypes = [ctypes.c_size_t]
            lib = cand
        except (OSError, AttributeError):
            lib = None
        _libc.append(lib)
    return _libc[0]


def supported() -> bool:
    """True where the heap cache takes effect (glibc, not disabled by GRL_KERNELS_HEAP_CACHE=0)."""
    return os.environ.get("GRL_KERNELS_HEAP_CACHE", "1") != "0" and _glibc() is not None


def _block_cache_module():
    """The loaded (or prebuilt, then loaded) CPU extension, or None: never builds it here."""
    if os.environ.get("GRL_KERNELS_BLOCK_CACHE", "1") == "0":
        return None
    try:
        from .backends.extension import loaded_without_building
    except ImportError:  # pragma: no cover - partial installs
        return None
    mod = loaded_without_building("cpu")
    return mod if mod is not None and hasattr(mod, "block_cache_enter") else None


def block_cache_stats(reset_peak: bool = False) -> dict:
    """Counters of the block cache ({'installed': 0} before its first scope): bytes in use,
    cached, high-water and peak resident; hits, maps, unmaps. ``reset_peak`` restarts the peak
    and the counters."""
    mod = _block_cache_module()
    return dict(mod.block_cache_stats(reset_peak)) if mod is not None else {"installed": 0}


def block_cache_available() -> bool:
    """True where a :func:`heap_cache` scope also opens the block cache (glibc, the compiled CPU
    extension loaded or installed prebuilt, neither cache disabled by its environment variable)."""
    return supported() and _block_cache_module() is not None


def active() -> bool:
    """True while some thread is inside a :func:`heap_cache` scope that took effect."""
    return _depth > 0


@contextlib.contextmanager
def heap_cache(enabled: bool = True, *, bounded: bool = False, max_fit: Optional[float] = None):
    """Inside the scope, freed blocks stay in the heap for reuse; on exit they go back to the system.

    ``max_fit``: a request may take a cached block of up to this many times its size, whole
    (default :data:`BLOCK_CACHE_MAX_FIT`, 1: exact sizes). A compiled GRL graph allocates a few
    sizes in turn (GRL-T bfloat16: 4-16 MiB): with exact sizes the cache cut and regrew blocks,
    182-232 MiB mapped again per forward for a 56 MiB high-water mark (~100 ms of 650), with 2
    60 MiB. Eager GRL-B float32 allocates many sizes: there 2 raised the peak RSS from 232 to
    288 MiB (0.36 -> 0.47 of the published network's), so eager calls keep exact sizes.

    ``bounded``: for runs planned on a memory budget (which counts live tensors): only the block
    cache, its resident bytes held to the high-water mark of blocks in use (no slack, and cached
    blocks reused for requests of their exact size only, so no block is bigger than its tensor),
    and glibc's settings left as they are (its heap would add its fragmentation); where the block
    cache is not available such a scope does nothing. Only the outermost scope's choice counts."""
    global _depth
    if max_fit is not None and (isinstance(max_fit, bool) or not isinstance(max_fit, (int, float)) or not max_fit >= 1):
        raise ValueError(f"max_fit must be a number >= 1 or None, got {max_fit!r}")
    lib = _glibc() if enabled and supported() else None
    mod = _block_cache_module() if lib is not None else None
    if lib is None or (bounded and mod is None):
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _bounded[:] = [bounded]
            if not bounded:
                lib.mallopt(_M_MMAP_MAX, 0)
                lib.mallopt(_M_TRIM_THRESHOLD, _CACHE_TRIM_THRESHOLD)
            fit = float(BLOCK_CACHE_MAX_FIT if max_fit is None else max_fit)
            if mod is not None and mod.block_cache_enter(BLOCK_CACHE_MIN_BYTES, *((0.0, 1.0) if bounded else (BLOCK_CACHE_SLACK, fit))):
                _block_cache.append(mod)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _block_cache:
                    _block_cache.pop().block_cache_exit()
                if not _bounded[0]:
                    lib.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
                    lib.mallopt(_M_MMAP_THRESHOLD, _exit_thresholds[0])
                    lib.mallopt(_M_TRIM_THRESHOLD, _exit_thresholds[1])
                    lib.malloc_trim(0)


def release_promptly(threshold: int = 128 << 10) -> bool:
    """Process-wide: serve blocks above ``threshold`` bytes by mmap and trim the heap above twice
    that, so freed memory goes back to the system at once and the process's peak resident memory
    equals the peak of live tensors (glibc's default dynamic thresholds add 50-90 % on GRL, by
    fragmentation). Heap-cache scopes restore this setting when they end. Returns False where
    glibc is not available. Used by ``grl-kernels restore`` under a memory budget."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 < threshold <= _SETTLED_MMAP_THRESHOLD:
        raise ValueError(f"threshold must be an int of bytes in (0, {_SETTLED_MMAP_THRESHOLD}], got {threshold!r}")
    lib = _glibc()
    if lib is None:
        return False
    with _lock:
        _exit_thresholds[:] = [threshold, 2 * threshold]
        if _depth == 0:
            lib.mallopt(_M_MMAP_THRESHOLD, threshold)
            lib.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    return True
