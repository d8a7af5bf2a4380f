"""Does GRL overflow in float16? Run a preset in float32 and in float16 and report, per module, the
largest activation magnitude and any inf/nan (forward hooks), and the float16 output's error.

    python benchmarks/float16_probe.py --preset grl_b --size 32
    python benchmarks/float16_probe.py --preset grl_t --checkpoint GRL.ckpt --size 64

Without a checkpoint the weights are the seeded random initialization perturbed by Gaussian noise
of half each tensor's own standard deviation (so LayerNorm weights, logit scales and biases are not
at their special initial values). float16 runs the reference attention where no fused float16
kernel serves the device (the CPU); that is slow on the CPU, hence the small default size.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

FP16_MAX = 65504.0


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.float().std().item() if p.numel() > 1 else abs(p.float().item())
            p.add_(torch.randn(p.shape, generator=g) * (0.5 * (std or 0.1)))


def probe(model, x):
    stats = {}

    def hook(name):
        def fn(mod, inp, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for o in outs:
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    o = o.detach().float()
                    fin = torch.isfinite(o)
                    mx = o[fin].abs().max().item() if fin.any() else float("inf")
                    s = stats.setdefault(name, [0.0, False])
                    s[0] = max(s[0], mx)
                    s[1] = s[1] or not bool(fin.all())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="grl_t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    from grl_kernels.models import PRESETS, build_preset, load_checkpoint

    if args.preset not in PRESETS:
        ap.error(f"--preset: unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    if args.size < 1:
        ap.error(f"--size must be >= 1, got {args.size}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        ap.error(f"--checkpoint: {args.checkpoint}: file not found")

    torch.manual_seed(0)
    model = build_preset(args.preset).eval()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    else:
        _perturb(model)
    model.set_backend(None if args.backend == "auto" else args.backend)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    y32, s32 = probe(model, x)
    t32 = time.perf_counter() - t0
    model.half()
    t0 = time.perf_counter()
    y16, s16 = probe(model, x.half())
    t16 = time.perf_counter() - t0
    err = ((y16.float() - y32).abs().max() / y32.abs().max()).item()
    bad = [n for n, (_, nonfinite) in s16.items() if nonfinite]
    top = sorted(s32.items(), key=lambda kv: -kv[1][0])[:5]
    print(f"{args.preset} {args.size}x{args.size}: float32 {t32:.1f} s, float16 {t16:.1f} s")
    print(f"float16 vs float32 output: max error / max = {err:.2e}")
    print(f"modules with inf/nan in float16: {bad[:10] if bad else 'none'}")
    print("largest float32 activations: " + ", ".join(f"{n} {v[0]:.1f}" for n, v in top))
    print(f"headroom to float16's max: {FP16_MAX / max(v[0] for v in s32.values()):.0f}x")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
