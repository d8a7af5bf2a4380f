"""The subcommands of ``grl-kernels`` (argument parsing is in ``__init__``)."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import torch

from ..backends import registry
from ..bench.machine import machine_info
from ..bench.report import machine_markdown, markdown_table, text_table

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, float) and o != o:
        return None
    return str(o)


def _dump_json(path: str, payload: Dict) -> None:
    _write(path, json.dumps(_clean(payload), indent=2, default=_json_default) + "\n")


def _clean(o):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _default_device(arg):
    if arg:
        if arg == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- info
def info_dict() -> Dict:
    info = machine_info()
    info["cuda_available"] = torch.cuda.is_available()
    info["backends"] = []
    for name, ok, why in registry.backend_info():
        b = registry._REGISTRY[name]
        info["backends"].append({
            "name": name, "display_name": b.display_name or name, "available": ok, "reason": why, "priority": b.priority,
            "devices": sorted(b.devices), "dtypes": sorted(str(t).replace("torch.", "") for t in b.dtypes),
            "description": b.description,
        })
    info["default_backend"] = registry.get_default_backend()
    return info


def cmd_info(args) -> int:
    info = info_dict()
    print("grl_kernels", info["grl_kernels"])
    for k in ("python", "torch", "triton", "cuda_runtime", "platform", "cpu", "cpu_count", "torch_threads"):
        print(f"  {k:14s} {info.get(k)}")
    if info.get("gpu"):
        print(f"  {'gpu':14s} {info['gpu']} ({info.get('gpu_memory_gib')} GiB, sm {info.get('compute_capability')}, "
              f"driver {info.get('driver')}, {info.get('gpu_count')} device(s))")
    else:
        print(f"  {'gpu':14s} none (torch.cuda.is_available() is False)")
    print(f"\nbackends (default: {info['default_backend']}; 'auto' picks the highest priority that handles the inputs):")
    rows = [[b["display_name"], "yes" if b["available"] else "no", b["priority"], ",".join(b["devices"]),
             ",".join(b["dtypes"]), b["reason"] if not b["available"] else b["description"]] for b in info["backends"]]
    print(text_table(["backend", "available", "priority", "devices", "dtypes", "note"], rows))
    if args.json:
        _dump_json(args.json, info)
    return 0


# ---------------------------------------------------------------- check
CHECK_HEADERS = ["backend", "device", "dtype", "case", "fwd abs", "fwd rel", "bwd abs", "bwd rel", "worst grad",
                 "param rel", "worst param", "tol fwd/bwd/param", "result"]


def _check_table_rows(rows) -> List[List]:
    out = []
    for r in rows:
        ptol = "*" if r.param_tol is None else f"{r.param_tol:.0e}"
        tol = "-" if r.tol != r.tol else f"{r.tol:.0e}/{r.bwd_tol:.0e}/{ptol}"
        res = r.status + (f" ({r.note})" if r.note else "")
        out.append([r.backend, r.device, r.dtype, r.case, r.fwd_abs, r.fwd_rel, r.bwd_abs, r.bwd_rel,
                    r.worst_grad or "-", r.param_rel, r.worst_param or "-", tol, res])
    return out


def cmd_check(args) -> int:
    from ..bench.progress import Progress
    from .check import plan, run_checks
    from .fixtures import default_fixture_dir, fixture_rows

    from ..bench.cases import full_check_cases, quick_check_cases

    t0 = time.perf_counter()
    dtypes = [_DT[d] for d in args.dtype] if args.dtype else None
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if args.fixtures and not os.path.isdir(args.fixtures):
        raise ValueError(f"--fixtures {args.fixtures!r} is not a folder")
    cases = full_check_cases() if args.full else quick_check_cases()
    if args.case:
        cases = [c for c in cases if any(t.lower() in c.name.lower() for t in args.case)]
        if not cases:
            raise ValueError(f"--case {args.case}: no case name matches")
    work, notes = plan(args.backend, quick=not args.full, devices=args.device, dtypes=dtypes, cases=cases)
    prog = Progress(len(work), "check", enabled=not args.no_progress)
    rows = run_checks(work, backward=not args.no_backward, progress=prog.step)
    prog.close()
    interrupted = bool(rows) and rows[-1].case == "(interrupted)"
    if not args.no_fixtures and not interrupted:
        folder = args.fixtures or default_fixture_dir()
        if folder is None:
            notes.append("fixtures: no fixture folder found ($GRL_FIXTURES, ../shared/reference, tests/fixtures); "
                         "skipped (use --fixtures DIR)")
        else:
            fx_backends = None
            if args.backend:
                fx_backends = [b for b in args.backend if registry._REGISTRY[b].availability()[0]
                               and registry._REGISTRY[b].supports(torch.device("cpu"), torch.float32)]
            rows += fixture_rows(folder, fx_backends, quick=not args.full)
    table = _check_table_rows(rows)
    print(text_table(CHECK_HEADERS, table))
    failed = [r for r in rows if r.failed]
    skipped = [r for r in rows if r.status == "SKIP"]
    for n in notes:
        print("note:", n)
    print(f"\n{len(rows) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"in {time.perf_counter() - t0:.1f}s (errors vs the float64 reference on the same inputs; "
          f"rel = max abs error / max |reference|)")
    if any(r.param_tol is None and r.param_rel == r.param_rel for r in rows):
        print("* float16/bfloat16: the gradients of tau and of the bias tables (sums over every window with "
              "cancelling signs) are reported in 'param rel', not judged; float32/float64 rows judge them")
    if args.json:
        _dump_json(args.json, {"machine": machine_info(), "rows": [r.as_dict() for r in rows], "notes": notes})
    if args.markdown:
        md = "# grl-kernels check\n\n" + machine_markdown(machine_info()) + "\n\n" + markdown_table(CHECK_HEADERS, table)
        md += "\n\n" + "\n".join(f"- note: {n}" for n in notes) + "\n"
        _write(args.markdown, md)
    if not work:
        print("nothing was checked: no requested backend is available for the requested devices/dtypes")
        return 1
    return 1 if failed else 0


# ---------------------------------------------------------------- bench
def _parse_size(s):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 128x128, got {s!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"--size must be HxW with H >= 1 and W >= 1, got {s!r}")
    return h, w


def cmd_bench(args) -> int:
    if args.model:
        return cmd_bench_model(args)
    from ..bench.cases import bench_cases, parse_case
    from ..bench.ceilings import measure_ceilings
    from ..bench.runner import BenchConfig, add_ceiling_fractions, run_bench, table_rows

    device = _default_device(args.device)
    dtype = _DT[args.dtype]
    size = _parse_size(args.size) if args.size else None
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.geometry:
        cases = [parse_case(g).with_batch(args.batch) if "batch=" not in g else parse_case(g) for g in args.geometry]
    else:
        cases = bench_cases(quick=args.quick, size=size, batch=args.batch)
    baselines = [] if args.baselines.strip() == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = set(baselines) - {"reference", "compile", "flex"}
    if bad:
        raise ValueError(f"--baselines: unknown {sorted(bad)}; choose from reference, compile, flex")
    cfg = BenchConfig(device=device, dtype=dtype, reps=args.reps or (3 if args.quick else 10), warmup=args.warmup,
                      max_seconds=2.0 if args.quick else 10.0, backward=not args.no_backward,
                      backends=args.backend, baselines=baselines, quick=args.quick)
    t0 = time.perf_counter()
    ceilings = None if args.no_ceilings else measure_ceilings(device, dtype, quick=args.quick)
    rows = run_bench(cases, cfg, show_progress=not args.no_progress)
    if ceilings:
        add_ceiling_fractions(rows, ceilings)
    headers, trows = table_rows(rows)
    print(text_table(headers, trows))
    if ceilings:
        print(f"\nceilings ({device}, {ceilings['matmul_dtype']}): matmul {ceilings['matmul_gflops']:.1f} GFLOP/s, "
              f"copy {ceilings['copy_gbps']:.1f} GB/s; 'x' = speed-up over the reference path; "
              f"%peak = achieved / ceiling")
    print(f"bench finished in {time.perf_counter() - t0:.1f}s")
    info = machine_info()
    payload = {"machine": info, "ceilings": ceilings, "device": device, "dtype": args.dtype,
               "config": {"reps": cfg.reps, "warmup": cfg.warmup, "backward": cfg.backward,
                          "baselines": baselines, "quick": args.quick},
               "cases": [c.as_dict() for c in cases], "results": rows}
    if args.json:
        _dump_json(args.json, payload)
    if args.markdown:
        md = f"# grl-kernels bench ({device}, {args.dtype})\n\n" + machine_markdown(info) + "\n\n"
        if ceilings:
            md += (f"Ceilings measured in this run: matmul {ceilings['matmul_gflops']:.1f} GFLOP/s "
                   f"({ceilings['matmul_dtype']}), copy {ceilings['copy_gbps']:.1f} GB/s.\n\n")
        md += markdown_table(headers, trows) + f"\n\nCommand: `grl-kernels {' '.join(getattr(args, 'argv', []))}`\n"
        _write(args.markdown, md)
    bad_rows = [r for r in rows if r["status"] == "wrong" or r.get("case") == "(interrupted)"]
    return 1 if bad_rows else 0


def cmd_bench_model(args) -> int:
    from ..bench.model import ModelBenchConfig, bench_model, model_table_rows

    device = _default_device(args.device)
    quick = getattr(args, "quick", False)
    presets = args.preset or (["GRL-T"] if quick else ["GRL-T", "GRL-S", "GRL-B"])
    sizes = args.image_size or ([32] if quick else [256, 512])
    if args.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype}: the model benchmark runs float32 or autocast float16/bfloat16")
    for s in sizes:
        if s < 8:
            raise ValueError(f"--image-size must be >= 8, got {s}")
    cfg = ModelBenchConfig(presets=presets, sizes=sizes, device=device, dtype=_DT[args.dtype],
                           batch=getattr(args, "batch", 1), reps=1 if quick else (getattr(args, "reps", None) or 3),
                           train=not args.no_train, backends=args.backend, task=getattr(args, "task", None),
                           published=not getattr(args, "no_published", False), compile=getattr(args, "compile", False),
                           reference=not getattr(args, "no_reference", False), warmup=0,
                           optimize=getattr(args, "optimize", False))
    t0 = time.perf_counter()
    rows = bench_model(cfg, show_progress=not args.no_progress)
    headers, trows = model_table_rows(rows)
    print(text_table(headers, trows))
    print(f"bench-model finished in {time.perf_counter() - t0:.1f}s (x ref / x pub / x pub-c: speed-up over our "
          "reference-attention model / the published model eager / compiled; MiB: peak memory of inference)")
    info = machine_info()
    if args.json:
        _dump_json(args.json, {"machine": info, "device": device, "dtype": args.dtype, "results": rows})
    if args.markdown:
        md = f"# grl-kernels bench-model ({device}, {args.dtype})\n\n" + machine_markdown(info) + "\n\n"
        md += markdown_table(headers, trows) + f"\n\nCommand: `grl-kernels {' '.join(getattr(args, 'argv', []))}`\n"
        _write(args.markdown, md)
    return 1 if any(r["status"] == "wrong" or r.get("preset") == "(interrupted)" for r in rows) else 0
