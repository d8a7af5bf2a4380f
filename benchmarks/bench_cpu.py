"""Benchmark of the fused CPU kernels ("cpu" backend) against the reference path.

Plain script: ``python benchmarks/bench_cpu.py [--configs ...] [--repeat N] [--json out.json]``.
For each published geometry (float32, 256 x 256 feature map by default) it measures
- forward time (no grad): reference, torch.compile(reference), cpu kernels;
- forward + backward time (all gradients): reference and cpu kernels;
- forward peak memory: the high-water mark of torch allocations made DURING the call
  (torch profiler memory events, cumulative sum in time order; inputs excluded, output
  included), plus for the cpu kernels their per-thread scratch (std::vector, outside torch's
  allocator), computed from the geometry and added so the comparison is not flattered.
Times are medians of --repeat runs after --warmup runs; the machine's load matters, so
compare ratios measured in the same run. ``--dtype bfloat16`` runs the cpu kernels on
bfloat16 inputs (parameters float32) against the reference in float32 (the published
module's dtype), in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from grl_kernels.backends import cpu_backend
from grl_kernels.geometry import stripe_geometry, window_geometry
from grl_kernels.reference import stripe_attention_reference, window_attention_reference

CONFIGS = {
    # name: (kind, args) -- GRL presets: stripe [8, None] x groups [None, 4] (8 x 64 stripes at 256),
    # SR fine-tunes: stripe 64 x 64, window 8 and 32.
    "stripe8x64": ("stripe", dict(stripe_size=(8, None), stripe_groups=(None, 4), f=4, nh=2, d=32)),
    "stripe64x64": ("stripe", dict(stripe_size=(64, 64), stripe_groups=(None, None), f=4, nh=3, d=30)),
    "window8": ("window", dict(ws=8, nh=2, d=32)),
    "window32": ("window", dict(ws=32, nh=3, d=30)),
}


def peak_alloc_bytes(fn) -> int:
    """High-water mark of torch CPU allocations made while fn() runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    evs = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def timeit(fn, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def cpu_scratch_bytes(kind: str, geom, d: int, threads: int) -> int:
    """Per-task std::vector scratch of the forward kernels (csrc/cpu/grl_cpu_stripe_impl.h,
    grl_cpu_window_impl.h; live once per thread), outside torch's allocator. Counted at 4
    bytes per element (bfloat16 tiles take 2: an upper bound)."""
    dp = (d + 15) // 16 * 16
    if kind == "stripe":
        n2, blk = geom.n2, 64
        n2p = (n2 + 15) // 16 * 16
        tiles = 2 * n2 * dp + d * n2p + d * blk + n2 * dp + blk * dp + blk * n2  # aA/ahat, aB, kB, zB, qA, P2
        accs = blk * dp + n2 * blk + blk * n2p + n2 * dp + blk * dp + 3 * n2 + blk  # vB, S, S2, Z, Yb, m, l, norms
        other = 8 * (2 * n2 + 3 * blk) + 4 * (n2 + blk) + 24 * blk
        return threads * (4 * (tiles + accs) + other)
    n, mb = geom.n, min(32, geom.n)
    np_ = (n + 15) // 16 * 16
    floats = n * d + d * np_ + n * dp + 2 * n + mb * np_ + mb * n + mb * dp  # qA, kB, vB, norms, S, P, Y
    return threads * (4 * floats + 8 * 2 * n + 4 * n)


def _cast(inputs, n, dtype):
    return [t.to(dtype) if i < n else t for i, t in enumerate(inputs)]


def build(kind, args, size, batch):
    H = W = size
    nh, d = args["nh"], args["d"]
    C = nh * d
    qkv = torch.randn(batch, H * W, 3 * C)
    if kind == "stripe":
        f = args["f"]
        geom = stripe_geometry((H, W), args["stripe_size"], args["stripe_groups"], True, f)
        anchor = torch.randn(batch, H // f, W // f, C)
        params = [torch.rand(nh) + 1, torch.rand(geom.table_rows, nh) * 16, torch.rand(nh) + 1,
                  torch.rand(geom.table_rows, nh) * 16]
        inputs = [qkv, anchor] + params

        def call(impl, ins):
            return impl(ins[0], ins[1], geom, nh, *ins[2:])

        return geom, inputs, call, stripe_attention_reference, cpu_backend.stripe
    geom = window_geometry((H, W), args["ws"], True)
    inputs = [qkv, torch.rand(nh) + 1, torch.rand(geom.table_rows, nh) * 16]

    def call(impl, ins):
        return impl(ins[0], geom, nh, *ins[1:])

    return geom, inputs, call, window_attention_reference, cpu_backend.window


def run_config(name, size, batch, repeat, warmup, use_compile, dtype=torch.float32):
    kind, args = CONFIGS[name]
    geom, inputs, call, ref, cpu = build(kind, args, size, batch)
    cpu_inputs = _cast(inputs, 2 if kind == "stripe" else 1, dtype)  # qkv (and anchor) in dtype
    row = {"config": name, "size": size, "batch": batch, "threads": torch.get_num_threads(),
           "cpu_dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        row["ref_fwd_ms"] = timeit(lambda: call(ref, inputs), repeat, warmup)
        row["cpu_fwd_ms"] = timeit(lambda: call(cpu, cpu_inputs), repeat, warmup)
        if use_compile:
            # fresh dynamo state per config: the lambda's code object is shared between configs,
            # and recompiling it for new shapes would switch dynamo to (slower) dynamic shapes
            torch._dynamo.reset()
            compiled = torch.compile(lambda *ins: call(ref, list(ins)))
            row["compiled_fwd_ms"] = timeit(lambda: compiled(*inputs), repeat, max(warmup, 2))
        row["ref_fwd_peak_mb"] = peak_alloc_bytes(lambda: call(ref, inputs)) / 2**20
        row["cpu_fwd_peak_mb"] = (peak_alloc_bytes(lambda: call(cpu, cpu_inputs))
                                  + cpu_scratch_bytes(kind, geom, args["d"], torch.get_num_threads())) / 2**20
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cpu_leaves = [t.clone().requires_grad_(True) for t in cpu_inputs]
    go = torch.randn_like(call(ref, inputs))

    def fwd_bwd(impl, ls):
        out = call(impl, ls)
        torch.autograd.grad(out, ls, go.to(out.dtype))

    row["ref_fwdbwd_ms"] = timeit(lambda: fwd_bwd(ref, leaves), max(1, repeat // 2), 1)
    row["cpu_fwdbwd_ms"] = timeit(lambda: fwd_bwd(cpu, cpu_leaves), max(1, repeat // 2), 1)
    row["fwd_speedup"] = row["ref_fwd_ms"] / row["cpu_fwd_ms"]
    if use_compile:
        row["fwd_speedup_vs_compiled"] = row["compiled_fwd_ms"] / row["cpu_fwd_ms"]
    row["fwdbwd_speedup"] = row["ref_fwdbwd_ms"] / row["cpu_fwdbwd_ms"]
    row["fwd_peak_ratio"] = row["cpu_fwd_peak_mb"] / row["ref_fwd_peak_mb"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--size", type=int, default=256, help="feature map height = width (default 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the cpu kernels' inputs (the reference always runs float32)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    hdr = (f"{'config':<12} {'ref fwd':>9} {'compiled':>9} {'cpu fwd':>9} {'x ref':>6} {'x comp':>6} "
           f"{'ref f+b':>9} {'cpu f+b':>9} {'x ref':>6} {'ref MB':>8} {'cpu MB':>8} {'ratio':>6}")
    dtype = getattr(torch, a.dtype)
    from grl_kernels.backends.extension import ops

    print(f"reference float32, cpu kernels {a.dtype}, {a.size}x{a.size}, batch {a.batch}, "
          f"{torch.get_num_threads()} threads; times in ms (median)")
    print(f"cpu kernel path: {ops.cpu_path()}")
    print(hdr)
    for name in a.configs:
        r = run_config(name, a.size, a.batch, a.repeat, a.warmup, not a.no_compile, dtype)
        rows.append(r)
        comp = f"{r['compiled_fwd_ms']:9.1f}" if "compiled_fwd_ms" in r else f"{'-':>9}"
        xcomp = f"{r['fwd_speedup_vs_compiled']:6.2f}" if "fwd_speedup_vs_compiled" in r else f"{'-':>6}"
        print(f"{name:<12} {r['ref_fwd_ms']:9.1f} {comp} {r['cpu_fwd_ms']:9.1f} {r['fwd_speedup']:6.2f} {xcomp} "
              f"{r['ref_fwdbwd_ms']:9.1f} {r['cpu_fwdbwd_ms']:9.1f} {r['fwdbwd_speedup']:6.2f} "
              f"{r['ref_fwd_peak_mb']:8.1f} {r['cpu_fwd_peak_mb']:8.1f} {r['fwd_peak_ratio']:6.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"torch": torch.__version__, "cpu_path": ops.cpu_path(), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
