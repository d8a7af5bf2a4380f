"""Restore benchmark: one large image through ``grl-kernels restore`` (tiled, ``--tile auto``).

    python benchmarks/bench_restore.py --preset GRL-T --size 2048x2048 --out DIR
    python benchmarks/bench_restore.py --preset grl_base_denoise_color --size 2749x4049 --max-memory 4G

Makes a deterministic synthetic RGB image (smooth gradients, edges and noise) and a checkpoint of
the preset with seeded random weights (no trained weights are shipped; speed and memory do not
depend on the weights' values), then runs the command in a child process and records its wall
time, the tile it chose (from its progress line) and the child's peak resident memory
(``ru_maxrss``), with the machine info. Writes ``restore_<preset>_<H>x<W>.{json,md}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / max(1, w - 1), y / max(1, h - 1), 0.5 + 0.5 * np.sin((x + y) / 37.0)], -1)
    img[(x // 97 + y // 61) % 2 == 0] *= 0.6  # edges
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="GRL-T")
    ap.add_argument("--size", default="2048x2048", help="HxW of the input image")
    ap.add_argument("--max-memory", default=None, help="--max-memory of the command (default: its own)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.size)
    if not m:
        ap.error(f"--size must be HxW, e.g. 2048x2048, got {args.size!r}")
    h, w = int(m.group(1)), int(m.group(2))

    import torch
    from PIL import Image

    from grl_kernels.bench.machine import machine_info
    from grl_kernels.bench.report import machine_markdown
    from grl_kernels.bench.model import PRESET_ALIASES
    from grl_kernels.models import build_preset

    os.makedirs(args.out, exist_ok=True)
    name = PRESET_ALIASES.get(args.preset, args.preset)
    if h < 1 or w < 1:
        ap.error(f"--size must be positive, got {args.size!r}")
    from grl_kernels.models import PRESETS

    if name not in PRESETS:
        ap.error(f"--preset: unknown preset {args.preset!r}; expected GRL-T, GRL-S, GRL-B or one of {sorted(PRESETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in", "image.png")
        os.makedirs(os.path.dirname(src))
        Image.fromarray(synthetic_image(h, w)).save(src)
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "model.pth")
        torch.save(build_preset(name).state_dict(), ckpt)
        cmd = [sys.executable, "-m", "grl_kernels", "restore", src, "-o", os.path.join(tmp, "out"),
               "--checkpoint", ckpt, "--preset", name, "--dtype", args.dtype]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        if args.no_compile:
            cmd.append("--no-compile")
        print("+", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        sys.stderr.write(proc.stderr[-4000:])
        out_files = os.listdir(os.path.join(tmp, "out")) if os.path.isdir(os.path.join(tmp, "out")) else []
        out_size = None
        if out_files:
            with Image.open(os.path.join(tmp, "out", out_files[0])) as im:
                out_size = f"{im.size[1]}x{im.size[0]}"
    plan = re.search(r"(untiled|tiles of \d+ px, \d+ tiles)", proc.stderr)
    row = {"preset": name, "input": f"{h}x{w}", "output": out_size, "dtype": args.dtype,
           "compile": not args.no_compile, "max_memory": args.max_memory or "default", "rc": proc.returncode,
           "wall_s": round(wall, 1), "peak_rss_mib": round(peak_kib / 1024), "megapixels_per_s": round(h * w / 1e6 / wall, 4),
           "tiles": plan.group(1) if plan else None}
    info = machine_info()
    base = os.path.join(args.out, f"restore_{name}_{h}x{w}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "command": cmd, "result": row}, f, indent=1, default=str)
    md = (f"# grl-kernels restore, {name}, {h}x{w} input\n\n" + machine_markdown(info) + "\n\n"
          "| preset | input | output | dtype | compile | max memory | tiles | wall s | peak RSS MiB | MP/s | exit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {name} | {h}x{w} | {out_size} | {args.dtype} | {row['compile']} | {row['max_memory']} | {row['tiles']} | {row['wall_s']} "
          f"| {row['peak_rss_mib']} | {row['megapixels_per_s']} | {proc.returncode} |\n\n"
          f"Command output (tail):\n\n```\n{(proc.stdout + proc.stderr)[-1500:]}\n```\n")
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
