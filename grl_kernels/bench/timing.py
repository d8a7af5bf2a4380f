"""Wall-clock timing and peak memory of a callable, on CPU or CUDA.

Timing: warm-up calls, then ``reps`` timed calls (CUDA events on GPU, perf_counter
on CPU, each call synchronized); we report the median and the min.
Peak memory: on CUDA the caching allocator's ``max_memory_allocated`` above what
was allocated before the call. On CPU (Linux) the growth of the process's peak
resident set: free heap memory is returned to the OS (``malloc_trim``), the kernel's
high-water mark is reset (``/proc/self/clear_refs``), and the peak ``VmHWM`` is read
after the call; this sees every allocation (compiled code and C++ extensions
included) at page granularity, with ~1-2 MiB of noise. Elsewhere a dispatch mode
counts live tensor storage (``LiveStorage``; blind to allocations inside compiled or C++ code).
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Timing:
    median_s: float
    min_s: float
    reps: int

    def as_dict(self):
        return {"median_ms": self.median_s * 1e3, "min_ms": self.min_s * 1e3, "reps": self.reps}


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device="cpu", reps: int = 10, warmup: int = 2,
            max_seconds: float = float("inf")) -> Timing:
    """Median and min wall time of ``fn()``; stops early once ``max_seconds`` have been spent."""
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: List[float] = []
    spent = 0.0
    use_events = device.type == "cuda"
    for _ in range(max(1, reps)):
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_seconds:
            break
    return Timing(statistics.median(times), min(times), len(times))


class LiveStorage(TorchDispatchMode):
    """Counts bytes of tensor storages created while active, and their peak alive at once.

    Storages in ``ignore`` (e.g. a model's parameters, whose views ops also return) are not counted.
    """

    def __init__(self, ignore=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {}
        self._skip = {t.untyped_storage()._cdata for t in ignore}

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                    continue
                key = st._cdata
                if key in self._seen or key in self._skip:
                    continue
                n = st.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self._seen[key] = weakref.finalize(st, self._free, key, n)
        return out


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


_LIBC = []


def _rss_peak(fn: Callable[[], object]) -> int:
    if not _LIBC:
        _LIBC.append(ctypes.CDLL("libc.so.6"))
    gc.collect()
    _LIBC[0].malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _proc_status()["VmRSS"]
    out = fn()
    peak = _proc_status()["VmHWM"] - base
    del out
    return max(0, int(peak))


def rss_peak_supported() -> bool:
    try:
        _rss_peak(lambda: None)
        return True
    except (OSError, KeyError, AttributeError):
        return False


def peak_memory(fn: Callable[[], object], device="cpu") -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before it (its result included)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if rss_peak_supported():
        return _rss_peak(fn)
    tracker = LiveStorage()
    with tracker:
        out = fn()
    del out
    return int(tracker.peak)
