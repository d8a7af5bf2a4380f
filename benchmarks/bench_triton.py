"""Benchmark of the fused Triton kernels ("triton" backend) on a CUDA GPU.

Plain script (GPU only; on a machine without CUDA it says so and exits 0):

    python benchmarks/bench_triton.py [--dtypes bf16 fp32] [--batch 4] [--size 256] [--quick]
                                      [--reps 20] [--no-backward] [--json out.json] [--markdown out.md]

For each published geometry (GRL-B / GRL-S presets: stripes 8 x W/4 with groups, f = 4;
SR fine-tune stripe 64 x 64 and window 32; JPEG stripe 72 x 144 (N1 = 10368, N2 = 648) and
window 36; denoise f = 2) and each dtype it times, with the shared benchmark runner
(grl_kernels.bench.runner: CUDA events, medians after warm-up, outputs checked against the
float64 reference first):
- forward (no grad) and forward + backward (all gradients),
- for: the reference path, torch.compile of the reference, the FlexAttention composition,
  and the triton backend,
- with the peak CUDA memory of each call above what was allocated before it.
Speed-ups are relative to the reference path of the same case, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def cases(size: int, batch: int, quick: bool):
    from grl_kernels.bench.cases import PUB, _stripe, _window, bench_cases

    out = bench_cases(quick=quick, size=(size, size), batch=batch)
    if not quick:
        s = max(288, size - size % 144)  # a multiple of 72 x 144 stripes and of window 36
        out += [
            _stripe("JPEG stripe 72x144 shifted", s, s, 3, 30, (72, 144), (None, None), True, 4, batch=batch),
            _window("JPEG window 36 shifted", s, s, 3, 30, 36, True, batch=batch),
            _stripe("denoise stripe 32x64 f2", size, size, 3, 30, (32, 64), (None, None), True, 2, batch=batch),
            _stripe("GRL-T stripe H shifted", size, size, 2, 16, PUB["size"], PUB["groups"], True, 4, batch=batch),
        ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--size", type=int, default=256, help="feature map H = W (default 256)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="two small cases only")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--baselines", nargs="*", default=["reference", "compile", "flex"])
    p.add_argument("--deterministic", action="store_true", help="time the deterministic backward")
    p.add_argument("--json", help="write all rows as JSON here")
    p.add_argument("--markdown", help="write a Markdown table here")
    a = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton: skipped, no CUDA device")
        return 0
    import grl_kernels  # noqa: F401  (registers the backends)
    from grl_kernels.backends import registry
    from grl_kernels.backends import triton as T
    from grl_kernels.bench.report import markdown_table, text_table
    from grl_kernels.bench.runner import BenchConfig, run_bench, table_rows

    ok, why = registry._REGISTRY["triton"].availability()
    if not ok:
        print(f"bench_triton: skipped, triton backend unavailable: {why}")
        return 0
    T.set_deterministic(bool(a.deterministic))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for name in a.dtypes:
        cfg = BenchConfig(device="cuda", dtype=dtypes[name], reps=a.reps, warmup=3, backward=not a.no_backward,
                          backends=["triton"], baselines=tuple(a.baselines), quick=a.quick)
        torch.cuda.empty_cache()
        rows += run_bench(cases(a.size, a.batch, a.quick), cfg)
    headers, body = table_rows(rows)
    headers, body = ["dtype"] + headers, [[r["dtype"]] + b for r, b in zip(rows, body)]
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  deterministic={T.is_deterministic()}")
    print(text_table(headers, body))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1,
                      default=str)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_table(headers, body) + "\n")
    bad = [r for r in rows if r["impl"] == "triton" and r["status"] != "ok"]
    for r in bad:
        print(f"triton {r['dtype']} {r['geometry']}: {r['status']} {r['note']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
