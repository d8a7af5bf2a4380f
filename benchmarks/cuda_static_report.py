"""Static resource report of the CUDA C++ kernels (csrc/cuda), no GPU needed.

For every kernel instantiation (kernel x dtype x register-tile width MAXD) of the nvcc build:
registers, stack frame and spill bytes, static shared memory (ptxas -v), the number of atomic
instructions in its SASS (cuobjdump -sass; Triton bundles a cuobjdump), and the theoretical
occupancy at 128 threads per block. With --before REV the same for the sources of a git
revision, side by side.

    python benchmarks/cuda_static_report.py --arch 90 --out benchmarks/results/static-sm90 --before bee6a50

writes OUT/cuda.json and OUT/cuda.md. tests/test_cuda_compile.py applies the gates to the same
ptxas output (parse_ptxas / count_atomics here).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
THREADS = 128  # grl::cuda::kThreads
_DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}


def short_name(mangled: str) -> Dict:
    """'_ZN3grl4cuda..._cu_...23stage1_backward_anchorsI13__nv_bfloat16Li64EEEv...' -> kernel, dtype, maxd."""
    info = {"kernel": mangled, "dtype": "", "maxd": None}
    if not mangled.startswith("_ZN"):
        return info
    i, names = 3, []
    while i < len(mangled) and mangled[i].isdigit():  # nested name: <length><identifier>...
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        names.append(mangled[j:j + n])
        i = j + n
    if names:
        info["kernel"] = names[-1]
    if i < len(mangled) and mangled[i] == "I":  # template arguments: element type, then MAXD
        m = re.match(r"I(f|6__half|13__nv_bfloat16)(?:Li(\d+)E)?E", mangled[i:])
        if m:
            info["dtype"] = _DTYPES[m.group(1)]
            info["maxd"] = int(m.group(2)) if m.group(2) else None
    if "bias_partial" in info.get("kernel", "") and info.get("maxd"):  # <T, STAGE>, not <T, MAXD>
        info["kernel"] += f" (stage {info['maxd']})"
        info["maxd"] = None
    return info


def parse_ptxas(text: str) -> List[Dict]:
    """Entries of `nvcc -Xptxas -v` output: name, registers, stack, spill stores/loads, shared."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), **short_name(m.group(1)), "registers": None,
                   "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(s.group(1)) if s else 0
    return out


def find_cuobjdump() -> Optional[str]:
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.is_file() else None
    except Exception:
        return None


def count_atomics(obj: Path, cuobjdump: Optional[str]) -> Optional[Dict[str, int]]:
    """{mangled function: number of ATOM/RED/ATOMS instructions in its SASS}, or None without cuobjdump."""
    if not cuobjdump:
        return None
    res = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        return None
    counts: Dict[str, int] = {}
    cur = None
    for line in res.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            counts[cur] = 0
        elif cur and re.search(r"\b(RED|REDG|REDAS|ATOM|ATOMG|ATOMS)\.", line):
            counts[cur] += 1
    return counts


def occupancy(regs: int, arch: int) -> float:  # noqa: ARG001  (same limits on sm_80 and sm_90)
    """Theoretical occupancy (active warps / max warps) at THREADS threads per block, from registers."""
    max_warps, regfile, max_blocks = 64, 65536, 32  # sm_80 / sm_90: 64K registers, 64 warps, 32 blocks per SM
    warps_per_block = THREADS // 32
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(regfile // (per_warp * warps_per_block), max_blocks, max_warps // warps_per_block)
    return blocks * warps_per_block / max_warps


def compile_sources(src_root: Path, arch: int, work: Path, nvcc: str) -> List[Dict]:
    rows = []
    cuobjdump = find_cuobjdump()
    incs = [f"-I{src_root / d}" for d in ("csrc/include", "csrc/cuda")]
    for cu in sorted((src_root / "csrc" / "cuda").glob("*.cu")):
        obj = work / f"{cu.stem}.sm{arch}.o"
        cmd = [nvcc, "-c", f"-arch=sm_{arch}", "-std=c++17", "-O3", "-Xptxas", "-v", *incs, str(cu), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu}: {res.stderr[-3000:]}")
        atoms = count_atomics(obj, cuobjdump)
        for e in parse_ptxas(res.stderr):
            e["file"] = cu.name
            e["atomics"] = None if atoms is None else atoms.get(e["mangled"], 0)
            e["occupancy"] = occupancy(e["registers"] or 0, arch)
            rows.append(e)
    return rows


def _git_sources(rev: str, dest: Path) -> Path:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def _key(e):
    return (e["file"], e["kernel"], e["dtype"], e["maxd"])


def markdown(rows: List[Dict], before: Optional[List[Dict]], arch: int, rev: Optional[str]) -> str:
    old = {_key(e): e for e in (before or [])}
    lines = [f"# CUDA kernels: static resources, sm_{arch}", "",
             "From `nvcc -Xptxas -v` (registers, stack frame, spill stores, static shared memory) and "
             "`cuobjdump -sass` (atomic instructions: RED/ATOM), 128 threads per block; occupancy is the "
             "theoretical one from registers. MAXD is the register-tile width (head dim <= 32 or <= 64).",
             f"Produced by `python benchmarks/cuda_static_report.py --arch {arch}"
             + (f" --before {rev}`; (before) = the sources of {rev}." if rev else "`."), ""]
    head = "| kernel | dtype | MAXD | regs | stack B | spill B | shared B | atomics | occupancy |"
    if before:
        head = "| kernel | dtype | MAXD | regs (before) | stack B (before) | spill B (before) | shared B | atomics (before) | occupancy (before) |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in sorted(rows, key=lambda e: (e["file"], e["kernel"], e["dtype"], e["maxd"] or 0)):
        o = old.get(_key(e))

        def pair(k, fmt="{}"):
            now = fmt.format(e[k]) if e[k] is not None else "-"
            if o is None:
                return now
            was = fmt.format(o[k]) if o[k] is not None else "-"
            return f"{now} ({was})"

        lines.append(f"| {e['file']}: {e['kernel']} | {e['dtype'] or '-'} | {e['maxd'] or '-'} | {pair('registers')} | "
                     f"{pair('stack_bytes')} | {pair('spill_stores')} | {e['shared_bytes']} | {pair('atomics')} | "
                     f"{pair('occupancy', '{:.2f}')} |")
    fwd = [e for e in rows if "forward" in e["kernel"]]
    bwd32 = [e for e in rows if "backward" in e["kernel"] and (e["maxd"] or 0) <= 32]
    lines += ["", f"Gates: forward kernels with spills: {sum(e['spill_stores'] > 0 for e in fwd)}; "
              f"backward kernels at head dim <= 32 with spills: {sum(e['spill_stores'] > 0 for e in bwd32)}; "
              f"kernels with spills at any head dim: {sum(e['spill_stores'] > 0 for e in rows)}; "
              f"most atomics in one kernel: {max((e['atomics'] or 0) for e in rows)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "static-sm90"))
    ap.add_argument("--before", metavar="REV", help="also report the sources of this git revision")
    args = ap.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if not nvcc:
        print("nvcc not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "now").mkdir()
        rows = compile_sources(ROOT, args.arch, tmp / "now", nvcc)
        before = None
        if args.before:
            (tmp / "old").mkdir()
            (tmp / "oldobj").mkdir()
            before = compile_sources(_git_sources(args.before, tmp / "old"), args.arch, tmp / "oldobj", nvcc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"arch": f"sm_{args.arch}", "threads_per_block": THREADS, "kernels": rows,
               "before": {"revision": args.before, "kernels": before} if before else None}
    (out / "cuda.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "cuda.md").write_text(markdown(rows, before, args.arch, args.before))
    print(f"wrote {out / 'cuda.md'} and {out / 'cuda.json'} ({len(rows)} kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
