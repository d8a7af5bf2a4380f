"""Peak memory of our GRL inference (float32, cpu backend) under the three allocator modes.

    python benchmarks/memory_modes.py --preset GRL-T --preset GRL-B --size 256 --size 512 --out DIR

Modes, each in a fresh interpreter (the allocator settings are process-wide):
- ``heap-cache``: the default (``grl_kernels.heap``: no page faults on reused blocks, fragmented heap);
- ``glibc``: ``model.heap_cache = False``, glibc's default dynamic thresholds;
- ``prompt``: ``model.heap_cache = False`` and :func:`grl_kernels.heap.release_promptly` (blocks above
  128 KiB by mmap: the resident peak equals the peak of live tensors), what ``grl-kernels restore``
  uses under a memory budget.
Per case: the growth of peak RSS of one call (after a warm-up call), the median time of two calls,
the peak of live tensors and :func:`grl_kernels.estimate_memory`. Writes memory_modes.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from grl_kernels.models import build_preset
from grl_kernels.bench.timing import peak_memory
from grl_kernels.heap import release_promptly
from grl_kernels.restore.memory import estimate_memory, live_tensor_peak
name, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "prompt":
    release_promptly()
torch.manual_seed(0)
m = build_preset(name).eval()
m.heap_cache = mode == "heap-cache"
x = torch.rand(1, 3, size, size)
with torch.no_grad():
    fn = lambda: m(x)
    fn()
    ts = []
    for _ in range(2):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    rss = peak_memory(fn)
    out = {"preset": name, "size": size, "mode": mode, "ms": min(ts) * 1e3, "rss_mib": rss / 2**20,
           "estimate_mib": estimate_memory(m, (size, size)) / 2**20}
    if mode == "prompt":
        out["live_mib"] = live_tensor_peak(fn, list(m.parameters()) + list(m.buffers()) + [x]) / 2**20
print("RESULT " + json.dumps(out))
"""

ALIASES = {"GRL-T": "grl_t", "GRL-S": "grl_s", "GRL-B": "grl_b"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append")
    ap.add_argument("--size", action="append", type=int)
    ap.add_argument("--mode", action="append", choices=("heap-cache", "glibc", "prompt"))
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    from grl_kernels.models import PRESETS

    for p in args.preset or []:
        if ALIASES.get(p, p) not in PRESETS:
            ap.error(f"--preset: unknown preset {p!r}; expected GRL-T, GRL-S, GRL-B or one of {sorted(PRESETS)}")
    for sz in args.size or []:
        if sz < 8:
            ap.error(f"--size must be >= 8, got {sz}")
    rows = []
    for p in args.preset or ["GRL-T", "GRL-S"]:
        for s in args.size or [256]:
            for mode in args.mode or ["heap-cache", "glibc", "prompt"]:
                r = subprocess.run([sys.executable, "-c", CHILD, ALIASES.get(p, p), str(s), mode],
                                   capture_output=True, text=True)
                line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
                if r.returncode or not line:
                    rows.append({"preset": p, "size": s, "mode": mode, "error": r.stderr[-300:]})
                else:
                    rows.append(json.loads(line[0][7:]))
                print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    from grl_kernels.bench.machine import machine_info
    from grl_kernels.bench.report import machine_markdown

    info = machine_info()
    with open(os.path.join(args.out, "memory_modes.json"), "w") as f:
        json.dump({"machine": info, "results": rows}, f, indent=1)
    md = ["# Peak memory of inference per allocator mode (float32, cpu backend)", "", machine_markdown(info), "",
          "| preset | size | mode | ms | peak RSS MiB | live tensors MiB | estimate MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['preset']} | {r['size']} | {r['mode']} | error | | | |")
            continue
        live = f"{r['live_mib']:.0f}" if "live_mib" in r else ""
        md.append(f"| {r['preset']} | {r['size']} | {r['mode']} | {r['ms']:.0f} | {r['rss_mib']:.0f} | {live} | {r['estimate_mib']:.0f} |")
    with open(os.path.join(args.out, "memory_modes.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
