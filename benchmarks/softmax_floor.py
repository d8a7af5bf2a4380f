"""What bounds the CPU kernels when the products are fast: the per-logit work.

For each `bench_cpu.py` geometry, times the cpu kernels at the geometry's head dim and again
with head dim 2 (same heads, windows, anchors, so the same number of logits; the products
shrink 15x or more and cost next to nothing). The head-dim-2 time is the kernel's floor
for that geometry: logits' scale, bias and masks, softmax (exp, row statistics), the backward's
dS and bias-gradient sums, row gathers and stores. It is then set against the time the
geometry's useful FLOPs (grl_kernels.bench.counts) would take at a fraction of a matmul
ceiling: when the floor alone is longer, no product tiling reaches that fraction.

    python benchmarks/softmax_floor.py [--dtype bfloat16] [--ceiling-gflops 815] [--fraction 0.35]

Times are medians of --repeat calls (time.perf_counter, the torch thread count as set).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import CONFIGS, build, timeit  # noqa: E402

from grl_kernels.bench.ceilings import matmul_ceiling  # noqa: E402


def _logits(kind: str, geom, heads: int, size: int) -> float:
    L = size * size
    return 2.0 * L * geom.n2 * heads if kind == "stripe" else float(L) * geom.n * heads


def run(name: str, size: int, d: int, dtype, repeat: int):
    kind, args = CONFIGS[name]
    args = dict(args, d=d)
    orig = CONFIGS[name]
    CONFIGS[name] = (kind, args)
    try:
        geom, inputs, call, _, cpu = build(kind, args, size, 1)
    finally:
        CONFIGS[name] = orig
    n_in = 2 if kind == "stripe" else 1
    ins = [t.to(dtype) if i < n_in else t for i, t in enumerate(inputs)]
    with torch.no_grad():
        fwd = timeit(lambda: call(cpu, ins), repeat, 1)
    leaves = [t.clone().requires_grad_(True) for t in ins]
    out = call(cpu, leaves)
    go = torch.randn_like(out)
    fb = timeit(lambda: torch.autograd.grad(call(cpu, leaves), leaves, go), max(1, repeat // 2), 1)
    # useful FLOPs of the math (as grl_kernels.bench.counts): per logit 2 d multiply-adds
    logits = _logits(kind, geom, args["nh"], size)
    return {"fwd_ms": fwd, "fb_ms": fb, "logits": logits, "flops": 4.0 * d * logits, "d": d}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--ceiling-gflops", type=float, default=0.0,
                   help="matmul ceiling in GFLOP/s (default: measured now, fastest of 5 1024^3 matmuls)")
    p.add_argument("--fraction", type=float, default=0.35, help="target fraction of the ceiling (default 0.35)")
    a = p.parse_args(argv)
    if a.size <= 0 or a.repeat <= 0 or not 0 < a.fraction <= 1:
        p.error("--size and --repeat must be positive, --fraction in (0, 1]")
    dtype = getattr(torch, a.dtype)
    ceiling = a.ceiling_gflops or matmul_ceiling(dtype=dtype) / 1e9
    print(f"cpu kernels, {a.dtype}, {a.size}x{a.size}, batch 1, {torch.get_num_threads()} threads; "
          f"matmul ceiling {ceiling:.0f} GFLOP/s; target {a.fraction:.0%} of it")
    print(f"{'config':<12} {'d':>3} {'fwd ms':>8} {'d=2 fwd':>8} {'floor':>6} {'f+b ms':>8} {'d=2 f+b':>8} "
          f"{'floor':>6} {'ns/logit fwd floor':>19} {'fwd ms at target':>17} {'fwd %ceil':>9}")
    for name in a.configs:
        d = CONFIGS[name][1]["d"]
        full = run(name, a.size, d, dtype, a.repeat)
        tiny = run(name, a.size, 2, dtype, a.repeat)
        at_target = full["flops"] / (a.fraction * ceiling * 1e9) * 1e3
        pct = full["flops"] / (full["fwd_ms"] * 1e-3) / (ceiling * 1e9)
        print(f"{name:<12} {d:>3} {full['fwd_ms']:8.1f} {tiny['fwd_ms']:8.1f} {tiny['fwd_ms'] / full['fwd_ms']:6.2f} "
              f"{full['fb_ms']:8.1f} {tiny['fb_ms']:8.1f} {tiny['fb_ms'] / full['fb_ms']:6.2f} "
              f"{tiny['fwd_ms'] * 1e6 / full['logits']:19.2f} {at_target:17.1f} {pct:9.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
