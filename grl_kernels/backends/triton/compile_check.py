"""Ahead-of-time compilation of the kernel specializations that really run, with their resources.

No GPU needed: the launcher is run on meta tensors with ``record_launches()`` for the published
geometries; every recorded launch is turned into the specialization Triton's JIT would compile
for it (:func:`runtime_specialization`: the JIT's own argument binder gives the divisibility-16
attributes of pointers and ints and turns ints equal to 1 into constants; meta tensors count as
16-byte aligned, as fresh CUDA allocations are), and each unique one is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a cubin (ptxas and
cuobjdump are bundled with triton). :func:`resources` reads registers / stack from
``cuobjdump --dump-resource-usage``, spill bytes from the ptxas log, shared memory from the
kernel metadata and counts the static atomic instructions (``red.`` / ``atom.``) of the PTX.

    python -m grl_kernels.backends.triton.compile_check --arch 90 --dump DIR [--subset] [--workers N]

writes DIR/<name>.ptx, DIR/<name>.cubin per specialization and DIR/manifest.json (a list of
{kernel, arch, dtype, head_dim, geometry, ptx, cubin, registers, stack_bytes, spill_bytes,
shared_bytes, atomics, num_warps, occupancy, ...}). Used by tests/test_triton_compile.py.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ...geometry import stripe_geometry, window_geometry
from . import launcher

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 30, 32, 60, 64)  # published; 30 and 32 share D=32, 60 and 64 share D=64
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # usable bytes per block (CUDA guide)
MAX_STATIC_ATOMICS = 4  # CI gate: per kernel, static red./atom. instructions in the PTX

# per-SM limits for the theoretical occupancy (CUDA occupancy calculator, compute capability 8.0 / 9.0)
SM_LIMITS = {
    80: dict(regs=65536, smem=167936, threads=2048, blocks=32, reserved_smem=1024),
    90: dict(regs=65536, smem=233472, threads=2048, blocks=32, reserved_smem=1024),
}


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
                g = stripe_geometry(x_size, ss, sg, True, f)
                text = f"stripe {x_size[0]}x{x_size[1]} stripe {g.sh}x{g.sw} f{f} shifted"
                yield "stripe", g, nh, d, dtype, text
            for ws in published_window_sizes():
                yield "window", window_geometry((2 * ws, 2 * ws), ws, True), nh, d, dtype, \
                    f"window {ws} on {2 * ws}x{2 * ws} shifted"


def _record(kind, g, nh, d, dtype, capability: int = 90) -> List[dict]:
    meta = dict(device="meta", dtype=dtype)
    C = nh * d
    B = 1
    qkv = torch.empty((B, g.H * g.W, 3 * C), **meta)
    out = torch.empty((B, g.H * g.W, C), **meta)
    scale = torch.empty((nh,), device="meta", dtype=torch.float32)
    bias = torch.empty((g.table_rows, nh), device="meta", dtype=torch.float32)
    with launcher.record_launches() as rec, launcher.target_arch(capability):
        if kind == "stripe":
            anc = torch.empty((B, g.Ha, g.Wa, C), **meta)
            o, z, l1, l2 = launcher.stripe_forward(qkv, anc, g, nh, scale, bias, scale, bias)
            launcher.stripe_backward(out, qkv, anc, g, nh, scale, bias, scale, bias, out, z, l1, l2)
        else:
            o, stat = launcher.window_forward(qkv, g, nh, scale, bias)
            launcher.window_backward(out, qkv, g, nh, scale, bias, out, stat)
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


def _manual_specialization(fn, args, constexprs):
    """The JIT's rules, for Triton versions whose binder is not reachable: pointers and ints
    divisible by 16 get tt.divisibility=16, ints equal to 1 become constants."""
    names = [n for n in fn.arg_names if n not in constexprs]
    signature, consts, attrs = {}, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}, {}
    for name, v in zip(names, args):
        idx = fn.arg_names.index(name)
        if isinstance(v, int) and not isinstance(v, bool) and v == 1:
            signature[name] = "constexpr"
            consts[(idx,)] = 1
            continue
        signature[name] = _arg_type(v)
        aligned = isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0)
        if aligned:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    signature.update({n: "constexpr" for n in constexprs})
    return {n: signature[n] for n in fn.arg_names}, consts, attrs


def runtime_specialization(fn, args, constexprs, capability: int = 90):
    """(signature, constexprs, attrs) of the kernel the JIT compiles for a launch with ``args``.

    Uses the JIT's own binder (``create_function_from_signature``, Triton 3.2+) and
    ``_pack_args``-equivalent packing; falls back to :func:`_manual_specialization`.
    """
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", capability, 32))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        _, spec, _ = binder(*args, **constexprs)
    except Exception:  # pragma: no cover - other Triton versions
        return _manual_specialization(fn, args, constexprs)
    signature, consts, attrs = {}, {}, {}
    for idx, (p, (ty, val)) in enumerate(zip(fn.params, spec)):
        signature[p.name] = ty
        if ty == "constexpr":
            consts[(idx,)] = constexprs[p.name] if p.name in constexprs else val
        elif isinstance(val, str) and val:
            attrs[(idx,)] = backend.parse_attr(val)
    return signature, consts, attrs


def specializations(dtypes: Sequence[torch.dtype] = DTYPES, head_dims: Sequence[int] = HEAD_DIMS,
                    capability: int = 90) -> List[dict]:
    """Unique run-time specializations over the published cases: {kernel, signature, constexprs
    (named constexpr parameters), constants (everything the JIT makes constant, by arg index),
    attrs, num_warps, num_stages, dtype, head_dims, geometries}."""
    from .kernels import KERNELS

    seen: Dict[tuple, dict] = {}
    for *case, text in _launch_cases(dtypes, head_dims):
        d = case[3]
        for rec in _record(*case, capability=capability):
            fn = getattr(KERNELS, rec["kernel"])
            sig, consts, attrs = runtime_specialization(fn, rec["args"], rec["constexprs"], capability)
            key = (rec["kernel"], tuple(sig.items()), tuple(sorted((k, repr(v)) for k, v in consts.items())),
                   tuple(sorted((k, repr(v)) for k, v in attrs.items())), rec["num_warps"], rec["num_stages"])
            if key not in seen:
                seen[key] = dict(kernel=rec["kernel"], signature=sig, constexprs=dict(rec["constexprs"]),
                                 constants=consts, attrs=attrs, num_warps=rec["num_warps"],
                                 num_stages=rec["num_stages"], head_dims=[], geometries=[])
            s = seen[key]
            if d not in s["head_dims"]:
                s["head_dims"].append(d)
            if text not in s["geometries"]:
                s["geometries"].append(text)
    return list(seen.values())


def make_source(fn, signature: dict, constexprs: dict, attrs: Optional[dict] = None):
    """ASTSource across Triton versions: 3.2+ (signature by name incl. "constexpr", constexprs=,
    attrs=) and 3.0/3.1 (constants= and no constexpr entries in the signature)."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    sig = {k: v for k, v in signature.items() if v != "constexpr"}
    return ASTSource(fn=fn, signature=sig, constants=constexprs)


def compile_spec(spec: dict, capability: int):
    import triton
    from triton.backends.compiler import GPUTarget

    from .kernels import KERNELS

    fn = getattr(KERNELS, spec["kernel"])
    src = make_source(fn, spec["signature"], spec.get("constants", spec["constexprs"]), spec.get("attrs"))
    opts = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def _compile_logged(spec: dict, capability: int):
    """compile_spec with the ptxas -v log captured (Triton prints it when asked to)."""
    try:
        from triton import knobs

        nv = knobs.nvidia
        old = nv.dump_ptxas_log
    except Exception:  # pragma: no cover - Triton without knobs
        return compile_spec(spec, capability), ""
    buf = io.StringIO()
    nv.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = compile_spec(spec, capability)
    finally:
        nv.dump_ptxas_log = old
    return k, buf.getvalue()


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?(red|atom)\.", re.M)


def static_atomics(ptx: str) -> int:
    """Number of atomic instructions (red.* / atom.*) in the PTX text."""
    return len(_ATOMIC.findall(ptx))


def _ptxas_spills(log: str, cubin: bytes, capability: int, ptx: str) -> int:
    m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:  # no captured log: run ptxas -v ourselves
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "k.ptx")
            with open(p, "w") as f:
                f.write(ptx)
            arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
            r = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", p, "-o", p + ".o"],
                               capture_output=True, text=True)
            m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr + r.stdout)
    return max((int(a) for a, _ in m), default=0)


def resource_usage(cubin_path: str) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    r = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                       check=True)
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", r.stdout)
        out[key] = int(m.group(1)) if m else 0
    return out


def occupancy(registers: int, shared: int, num_warps: int, capability: int) -> float:
    """Theoretical occupancy (resident warps / 64) from registers, shared memory and block size."""
    lim = SM_LIMITS.get(capability, SM_LIMITS[90])
    warps_max = lim["threads"] // 32
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocation unit: 256 regs per warp
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_smem = lim["smem"] // (shared + lim["reserved_smem"]) if shared else lim["blocks"]
    by_threads = warps_max // num_warps
    blocks = min(by_regs, by_smem, by_threads, lim["blocks"])
    return blocks * num_warps / warps_max


def spec_name(spec: dict) -> str:
    """A file-name-safe, unique-enough name of a specialization."""
    import hashlib

    c = spec["constexprs"]
    h = hashlib.sha1(repr((sorted(spec["signature"].items()), sorted((k, repr(v)) for k, v in
                                                                      spec.get("constants", {}).items()),
                           sorted((k, repr(v)) for k, v in spec.get("attrs", {}).items()))).encode()).hexdigest()[:8]
    return f"{spec['kernel']}_{_spec_dtype(spec)}_D{c.get('D', 0)}_BM{c.get('BM', 0)}_BN{c.get('BN', 0)}_{h}"


def compile_with_resources(spec: dict, capability: int, dump_dir: Optional[str] = None) -> dict:
    """Compile one specialization; return its manifest entry (files written to dump_dir if given)."""
    t0 = time.time()
    k, log = _compile_logged(spec, capability)
    seconds = time.time() - t0
    ptx, cubin = k.asm["ptx"], k.asm["cubin"]
    name = f"{spec_name(spec)}_sm{capability}"
    with contextlib.ExitStack() as stack:
        d = dump_dir or stack.enter_context(tempfile.TemporaryDirectory())
        ptx_path, cubin_path = os.path.join(d, name + ".ptx"), os.path.join(d, name + ".cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        use = resource_usage(cubin_path)
    shared = int(k.metadata.shared)
    c = spec["constexprs"]
    return dict(
        kernel=spec["kernel"], arch=f"sm_{capability}", dtype=_spec_dtype(spec),
        head_dim=list(spec.get("head_dims", [])), D=c.get("D"), BM=c.get("BM"), BN=c.get("BN", c.get("BV")),
        geometry="; ".join(spec.get("geometries", [])),
        ptx=name + ".ptx" if dump_dir else None, cubin=name + ".cubin" if dump_dir else None,
        registers=use["REG"], stack_bytes=use["STACK"], spill_bytes=_ptxas_spills(log, cubin, capability, ptx),
        local_bytes=use["LOCAL"], shared_bytes=shared, atomics=static_atomics(ptx),
        div_rem=len(re.findall(r"^\s*(?:@!?%\w+\s+)?(?:div|rem)\.[su]", ptx, re.M)),
        num_warps=spec["num_warps"], num_stages=spec["num_stages"],
        occupancy=occupancy(use["REG"], shared, spec["num_warps"], capability),
        shared_limit=SHARED_LIMIT.get(capability), compile_seconds=round(seconds, 2),
    )


def describe(spec: dict) -> str:
    c = spec["constexprs"]
    return (f"{spec['kernel']}[{_spec_dtype(spec)} D={c.get('D', '-')} BM={c.get('BM', '-')} "
            f"BN={c.get('BN', '-')} w{spec['num_warps']} s{spec['num_stages']}]")


def _size(spec: dict) -> int:
    c = spec["constexprs"]
    if "ws" in c:
        return c["ws"] ** 2
    if "sh" in c:
        return c["sh"] * c["sw"] + c["ah"] * c["aw"]
    return c.get("rh", 0) * c.get("rw", 0) * c.get("ch", 0) * c.get("cw", 0)


def covering_subset(specs: List[dict], dtypes=(torch.bfloat16, torch.float32)) -> List[dict]:
    """Per (kernel, dtype): the specialization with the widest head dim, the largest tiles and
    then the largest window (the most registers and shared memory); the others differ only in
    smaller constexprs. Kernels on float32 workspaces only (stripe_fwd_combine, bias_grad_reduce)
    count as the first dtype."""
    names = [_PTR[dt][1:] for dt in dtypes]
    best: Dict[tuple, tuple] = {}
    for spec in specs:
        dt = _spec_dtype(spec)
        if not {"QKV", "ANC"} & set(spec["signature"]):
            dt = names[0]
        elif dt not in names:
            continue
        c = spec["constexprs"]
        key = (spec["kernel"], dt)
        rank = (c.get("D", 0), c.get("BM", 0) * c.get("BN", 1), c.get("BM", 0), _size(spec))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, spec)
    return [v[1] for v in best.values()]


def _spec_dtype(spec: dict) -> str:
    """Element type of the activations (the first of QKV / ANC; float32 workspaces otherwise)."""
    sig = spec["signature"]
    return next((sig[k] for k in ("QKV", "ANC") if k in sig), "*fp32")[1:]


def _compile_row(args):
    spec, cc, dump_dir = args
    return compile_with_resources(spec, cc, dump_dir)


def run(capabilities: Iterable[int] = (80, 90), specs: Optional[List[dict]] = None, log=print,
        workers: int = 1, dump_dir: Optional[str] = None) -> List[dict]:
    """Compile every specialization for each capability; returns the manifest entries.
    (Specializations are recorded for one target, ``specializations(capability=...)``: pass those.)

    ``workers`` > 1 compiles in that many processes (spawned, so CUDA/triton state is not shared).
    """
    specs = specializations() if specs is None else specs
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    jobs = [(spec, cc, dump_dir) for cc in capabilities for spec in specs]
    rows = []
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            for row in ex.map(_compile_row, jobs):
                rows.append(row)
                if log:
                    log(format_row(row))
        return rows
    for job in jobs:
        rows.append(_compile_row(job))
        if log:
            log(format_row(rows[-1]))
    return rows


def format_row(row: dict) -> str:
    limit = row["shared_limit"]
    flag = "" if limit is None or row["shared_bytes"] <= limit else f"  EXCEEDS {limit}"
    name = f"{row['kernel']}[{row['dtype']} D={row['D'] or '-'} BM={row['BM'] or '-'} BN={row['BN'] or '-'}]"
    return (f"{row['arch']} {name:<56} regs {row['registers']:>3} stack {row['stack_bytes']:>4} "
            f"spill {row['spill_bytes']:>4} shared {row['shared_bytes']:>6} atomics {row['atomics']:>3} "
            f"occ {row['occupancy']:.3f} {row['compile_seconds']:5.1f}s{flag}")


def gate_violations(rows: List[dict]) -> List[str]:
    """The CI budget: no spills in forward kernels, nor in backward kernels at head dim <= 32;
    shared memory within the device limit; at most MAX_STATIC_ATOMICS atomics per kernel."""
    bad = []
    for r in rows:
        tag = f"{r['arch']} {r['kernel']} {r['dtype']} D={r['D']} BM={r['BM']} BN={r['BN']}"
        fwd = "_fwd" in r["kernel"]
        if r["spill_bytes"] or r["stack_bytes"]:
            if fwd or (r["D"] or 0) <= 32:
                bad.append(f"{tag}: {r['spill_bytes']} B spilled, {r['stack_bytes']} B stack")
        limit = r.get("shared_limit", SHARED_LIMIT.get(int(r["arch"][3:])))
        if limit is not None and r["shared_bytes"] > limit:
            bad.append(f"{tag}: shared {r['shared_bytes']} B > {limit} B")
        if r["atomics"] > MAX_STATIC_ATOMICS:
            bad.append(f"{tag}: {r['atomics']} static atomics > {MAX_STATIC_ATOMICS}")
    return bad


def summarize(rows: List[dict]) -> List[dict]:
    """Per (arch, kernel): the worst case over its specializations."""
    out: Dict[tuple, dict] = {}
    for r in rows:
        k = (r["arch"], r["kernel"])
        e = out.setdefault(k, dict(arch=r["arch"], kernel=r["kernel"], specializations=0, registers=0, stack_bytes=0,
                                   spill_bytes=0, shared_bytes=0, atomics=0, div_rem=0, occupancy=1.0,
                                   dtypes=set(), head_dims=set()))
        e["specializations"] += 1
        for f in ("registers", "stack_bytes", "spill_bytes", "shared_bytes", "atomics", "div_rem"):
            e[f] = max(e[f], r[f])
        e["occupancy"] = min(e["occupancy"], r["occupancy"])
        e["dtypes"].add(r["dtype"])
        e["head_dims"].update(r["head_dim"])
    res = []
    for e in out.values():
        e["dtypes"], e["head_dims"] = sorted(e["dtypes"]), sorted(e["head_dims"])
        res.append(e)
    return res


def write_report(rows: List[dict], prefix: str, before: Optional[str] = None) -> None:
    """PREFIX.json (every specialization and the per-kernel summary) and PREFIX.md (tables)."""
    import platform

    import triton

    summary = summarize(rows)
    prev = {}
    if before:
        with open(before) as f:
            prev = {(e["arch"], e["kernel"]): e for e in json.load(f)["summary"]}
    keep = ("kernel", "arch", "dtype", "head_dim", "D", "BM", "BN", "geometry", "registers", "stack_bytes",
            "spill_bytes", "shared_bytes", "atomics", "div_rem", "num_warps", "occupancy")
    doc = dict(triton=triton.__version__, python=platform.python_version(), summary=summary,
               specializations=[{k: r[k] for k in keep} for r in rows])
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [
        "# Static resources of the Triton kernels",
        "",
        f"Generated by `python -m grl_kernels.backends.triton.compile_check --report` (triton {triton.__version__}), "
        "no GPU: every run-time specialization of the published geometries compiled with ptxas; registers and "
        "stack from `cuobjdump --dump-resource-usage`, spills from the ptxas log, static atomics counted in the PTX "
        "(`red.`/`atom.`), `div/rem` = integer division instructions in the PTX. Occupancy: theoretical, resident "
        "warps / 64 per SM (64K registers, 228 KB shared memory, 2048 threads, 32 blocks per SM).",
        "",
        "Per kernel, the worst case over its specializations (most registers / stack / shared, lowest occupancy):",
        "",
    ]
    head = ("| arch | kernel | specs | dtypes | head dims | registers | stack B | spill B | shared B | atomics "
            "| div/rem | occupancy |")
    if prev:
        head = head[:-1] + "| before: registers / stack B / atomics / div/rem |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in sorted(summary, key=lambda e: (e["arch"], e["kernel"])):
        line = (f"| {e['arch']} | `{e['kernel']}` | {e['specializations']} | {', '.join(e['dtypes'])} | "
                f"{', '.join(map(str, e['head_dims']))} | {e['registers']} | {e['stack_bytes']} | {e['spill_bytes']} | "
                f"{e['shared_bytes']} | {e['atomics']} | {e['div_rem']} | {e['occupancy']:.3f} |")
        if prev:
            b = prev.get((e["arch"], e["kernel"]))
            line += (f" {b['registers']} / {b['stack_bytes']} / {b['atomics']} / {b['div_rem']} |" if b else " (new) |")
        lines.append(line)
    bad = gate_violations(rows)
    lines += ["", f"CI budget (compile_check.gate_violations): {'met' if not bad else f'{len(bad)} violations'}."]
    lines += [f"- {b}" for b in bad[:12]] + ([f"- ... and {len(bad) - 12} more"] if len(bad) > 12 else [])
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", "--cc", dest="arch", type=int, nargs="+", default=[80, 90],
                   help="compute capabilities (default 80 90)")
    p.add_argument("--subset", action="store_true", help="only the covering subset (what CI compiles)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--kernels", nargs="+", help="only these kernels")
    p.add_argument("--dump", metavar="DIR", help="write .ptx/.cubin per specialization and DIR/manifest.json")
    p.add_argument("--report", metavar="PREFIX", help="write PREFIX.md and PREFIX.json (per-kernel summary)")
    p.add_argument("--before", metavar="JSON", help="a previous PREFIX.json: before/after columns in the report")
    p.add_argument("--from-manifest", metavar="JSON", help="report from a manifest.json instead of compiling")
    a = p.parse_args(argv)
    if a.from_manifest:
        with open(a.from_manifest) as f:
            rows = json.load(f)
        write_report(rows, a.report, before=a.before)
        return 1 if gate_violations(rows) else 0
    dtypes = [getattr(torch, n) for n in a.dtypes]
    rows = []
    for arch in a.arch:  # tile sizes depend on the target (launcher.choose_config)
        specs = specializations(dtypes=dtypes, head_dims=a.head_dims, capability=arch)
        if a.subset:
            specs = covering_subset(specs, dtypes=dtypes)
        if a.kernels:
            specs = [s for s in specs if s["kernel"] in a.kernels]
        print(f"sm_{arch}: {len(specs)} specializations")
        rows += run((arch,), specs, workers=a.workers, dump_dir=a.dump)
    if a.dump:
        with open(os.path.join(a.dump, "manifest.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if a.report:
        write_report(rows, a.report, before=a.before)
    bad = gate_violations(rows)
    print(f"compiled {len(rows)}; max shared {max(r['shared_bytes'] for r in rows)} B; "
          f"max registers {max(r['registers'] for r in rows)}; max static atomics {max(r['atomics'] for r in rows)}; "
          f"budget violations: {len(bad)}")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
