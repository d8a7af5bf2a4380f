"""Ahead-of-time compilation of every kernel specialization the launcher can choose.

No GPU needed: the launcher is run on meta tensors with ``record_launches()``, the
recorded launches give each kernel's signature (pointer dtypes, int widths) and
constexprs (head dim, block sizes, precision, deterministic mode), and each unique
specialization is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
down to a cubin (ptxas is bundled with triton). Used by tests/test_triton_compile.py
and runnable as ``python -m grl_kernels.backends.triton.compile_check [cc ...]``.
"""
from __future__ import annotations

import inspect
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ...geometry import stripe_geometry, window_geometry
from . import launcher

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 30, 32, 60, 64)  # published; 30 and 32 share D=32, 60 and 64 share D=64
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # usable bytes per block (CUDA guide)


def published_stripe_geometries():
    """(x_size, stripe_size, stripe_groups, f) covering the published anchor-count classes.

    GRL-T/S/B blocks (stripe [8, None], groups [None, 4], f 4) at 64..512 give N2 = 8, 16,
    32, 64; fine-tunes give 64x64 (N2 256), 48x96, 72x144 (N1 10368, N2 648), and f = 2.
    """
    return [
        ((64, 64), (8, None), (None, 4), 4),
        ((128, 128), (8, None), (None, 4), 4),
        ((256, 256), (None, 8), (4, None), 4),
        ((512, 512), (8, None), (None, 4), 4),
        ((256, 256), (64, 64), (None, None), 4),
        ((192, 192), (48, 96), (None, None), 4),
        ((144, 288), (72, 144), (None, None), 4),
        ((128, 128), (64, 64), (None, None), 2),
    ]


def published_window_sizes() -> Tuple[int, ...]:
    return (8, 12, 16, 32, 36)


def _launch_cases(dtypes: Sequence[torch.dtype], head_dims: Sequence[int]):
    for dtype in dtypes:
        for d in head_dims:
            nh = 1 if d > 64 else 2
            for x_size, ss, sg, f in published_stripe_geometries():
                yield "stripe", stripe_geometry(x_size, ss, sg, True, f), nh, d, dtype
            for ws in published_window_sizes():
                yield "window", window_geometry((2 * ws, 2 * ws), ws, True), nh, d, dtype


def _record(kind, g, nh, d, dtype) -> List[dict]:
    meta = dict(device="meta", dtype=dtype)
    C = nh * d
    B = 1
    qkv = torch.empty((B, g.H * g.W, 3 * C), **meta)
    out = torch.empty((B, g.H * g.W, C), **meta)
    scale = torch.empty((nh,), device="meta", dtype=torch.float32)
    bias = torch.empty((g.table_rows, nh), device="meta", dtype=torch.float32)
    with launcher.record_launches() as rec:
        for det in (False, True):
            if kind == "stripe":
                anc = torch.empty((B, g.Ha, g.Wa, C), **meta)
                o, z, l1, l2 = launcher.stripe_forward(qkv, anc, g, nh, scale, bias, scale, bias)
                launcher.stripe_backward(out, qkv, anc, g, nh, scale, bias, scale, bias, out, z, l1, l2, det)
            else:
                o, lse = launcher.window_forward(qkv, g, nh, scale, bias)
                launcher.window_backward(out, qkv, g, nh, scale, bias, out, lse, det)
    return rec


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {v!r}")


def specializations(dtypes: Sequence[torch.dtype] = DTYPES, head_dims: Sequence[int] = HEAD_DIMS) -> List[dict]:
    """Unique {kernel, signature, constexprs, num_warps, num_stages} over the published cases."""
    from .kernels import KERNELS

    seen: Dict[tuple, dict] = {}
    for case in _launch_cases(dtypes, head_dims):
        for rec in _record(*case):
            fn = getattr(KERNELS, rec["kernel"])
            names = [n for n in fn.arg_names if n not in rec["constexprs"]]
            sig = {n: _arg_type(v) for n, v in zip(names, rec["args"])}
            sig.update({n: "constexpr" for n in rec["constexprs"]})
            key = (rec["kernel"], tuple(sorted(sig.items())), tuple(sorted(rec["constexprs"].items())),
                   rec["num_warps"], rec["num_stages"])
            if key not in seen:
                seen[key] = dict(kernel=rec["kernel"], signature=sig, constexprs=dict(rec["constexprs"]),
                                 num_warps=rec["num_warps"], num_stages=rec["num_stages"])
    return list(seen.values())


def make_source(fn, signature: dict, constexprs: dict):
    """ASTSource across Triton versions: 3.2+ (signature by name incl. "constexpr", constexprs=)
    and 3.0/3.1 (constants= and no constexpr entries in the signature)."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    sig = {k: v for k, v in signature.items() if v != "constexpr"}
    return ASTSource(fn=fn, signature=sig, constants=constexprs)


def compile_spec(spec: dict, capability: int):
    import triton
    from triton.backends.compiler import GPUTarget

    from .kernels import KERNELS

    fn = getattr(KERNELS, spec["kernel"])
    src = make_source(fn, spec["signature"], spec["constexprs"])
    opts = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def describe(spec: dict) -> str:
    c = spec["constexprs"]
    extra = " det" if c.get("DETERMINISTIC") else ""
    return (f"{spec['kernel']}[{_spec_dtype(spec)} D={c['D']} BM={c['BM']} BN={c.get('BN', '-')}{extra} "
            f"w{spec['num_warps']} s{spec['num_stages']}]")


def covering_subset(specs: List[dict], dtypes=(torch.bfloat16, torch.float32)) -> List[dict]:
    """Per (kernel, dtype, deterministic): the specialization with the widest head dim and the
    largest tiles (the most registers and shared memory); the rest differ only in smaller
    constexprs. Deterministic variants for the first dtype only."""
    names = [_PTR[dt][1:] for dt in dtypes]
    best: Dict[tuple, dict] = {}
    for spec in specs:
        dt = _spec_dtype(spec)
        det = bool(spec["constexprs"].get("DETERMINISTIC", False))
        if not {"QKV", "ANC"} & set(spec["signature"]):
            dt = names[0]  # float32 workspaces only (stripe_fwd_combine): the same for every dtype
        elif dt not in names or (det and dt != names[0]):
            continue
        c = spec["constexprs"]
        key = (spec["kernel"], dt, det)
        rank = (c["D"], c["BM"] * c.get("BN", 1), c["BM"])
        if key not in best or rank > best[key][0]:
            best[key] = (rank, spec)
    return [v[1] for v in best.values()]


def _spec_dtype(spec: dict) -> str:
    """Element type of the activations (the first of QKV / ANC; float32 workspaces otherwise)."""
    sig = spec["signature"]
    return next((sig[k] for k in ("QKV", "ANC") if k in sig), "*fp32")[1:]


def _compile_row(args):
    spec, cc = args
    t0 = time.time()
    k = compile_spec(spec, cc)
    return cc, describe(spec), int(k.metadata.shared), time.time() - t0


def run(capabilities: Iterable[int] = (80, 90), specs: Optional[List[dict]] = None, log=print,
        workers: int = 1) -> List[tuple]:
    """Compile every specialization for each capability; returns [(cc, name, shared bytes, seconds)].

    ``workers`` > 1 compiles in that many processes (spawned, so CUDA/triton state is not shared).
    """
    specs = specializations() if specs is None else specs
    jobs = [(spec, cc) for cc in capabilities for spec in specs]
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = ex.map(_compile_row, jobs)
            rows = []
            for row in results:
                rows.append(row)
                if log:
                    log(_format(row))
        return rows
    rows = []
    for job in jobs:
        rows.append(_compile_row(job))
        if log:
            log(_format(rows[-1]))
    return rows


def _format(row) -> str:
    cc, name, shared, sec = row
    limit = SHARED_LIMIT.get(cc)
    flag = "" if limit is None or shared <= limit else f"  EXCEEDS {limit}"
    return f"sm{cc} {name:<72} shared {shared:>7} B  {sec:5.1f}s{flag}"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--subset", action="store_true", help="only the covering subset (what CI compiles)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    specs = specializations(head_dims=a.head_dims)
    if a.subset:
        specs = covering_subset(specs)
    print(f"{len(specs)} specializations x {len(a.cc)} targets")
    rows = run(a.cc, specs, workers=a.workers)
    bad = [r for r in rows if r[2] > SHARED_LIMIT.get(r[0], r[2])]
    print(f"compiled {len(rows)}; max shared {max(r[2] for r in rows)} B; over the limit: {len(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
