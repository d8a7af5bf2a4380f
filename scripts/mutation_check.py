#!/usr/bin/env python
"""Plant realistic bugs one at a time in a temporary COPY of the repository and report which
tests catch each (docs/testing.md has the last table).

    python scripts/mutation_check.py                 # every mutant, the default test files
    python scripts/mutation_check.py --only mask_1e4 clamp_removed
    python scripts/mutation_check.py --list
    python scripts/mutation_check.py --tests tests/test_fuzz.py --quick   # stop at the first catch

The working tree is never modified: the tracked and untracked (not ignored) files are copied,
with their timestamps, to one fixed folder under --workdir, the mutant is applied there, and
pytest runs there with PYTHONPATH pointing at the copy. C++ mutants need a rebuild of the
extension: each gets its own GRL_KERNELS_CACHE (so no build of a mutant is ever reused, and a
failed build is reported as "build failed" -- with GRL_KERNELS_REQUIRE=cpu the run then fails
at once); Python mutants share one cache built from the unmodified sources. The Triton
interpreter drivers are skipped (GRL_FUZZ_INTERPRETER=0) to keep a run within tens of minutes.
A mutant that no test catches makes the exit status 1.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    path: str  # file, relative to the repository root
    old: str  # must occur exactly once
    new: str
    what: str
    tests: tuple = ()  # test files run for this mutant in addition to --tests

    @property
    def cpp(self) -> bool:
        return self.path.startswith("csrc/")


MUTANTS: List[Mutant] = [
    Mutant("clamp_removed", "grl_kernels/functional.py",
           "torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp()", "logit_scale.exp()",
           "(a) no logit-scale clamp at ln 100"),
    Mutant("window_shift_ceil", "grl_kernels/geometry.py",
           "w // 2 if window_shift else 0", "(w + 1) // 2 if window_shift else 0",
           "(b) window shift (w + 1) // 2 (differs for odd windows)"),
    Mutant("pretrained_divisor", "grl_kernels/geometry.py",
           "pa = ps // down_factor", "pa = ps",
           "(c) pretrained coordinate divisor ignores the anchor down factor"),
    Mutant("cpu_normalize_bwd_zero", "csrc/cpu/grl_cpu_kernels.h",
           "const acc_t inv = acc_t(1) / acc_t(kNormEps);\n    for (int64_t c = 0; c < d; ++c) g[c] *= inv;",
           "for (int64_t c = 0; c < d; ++c) g[c] = 0;",
           "(d) cpu normalize backward returns 0 for norm <= eps"),
    Mutant("mask_1e4", "csrc/include/grl_geometry.h",
           "constexpr float kMaskValue = -100.0f;", "constexpr float kMaskValue = -1e4f;",
           "(e) kernel mask constant -1e4 instead of -100"),
    Mutant("cpu_anchor_region_unscaled_shift", "csrc/include/grl_geometry.h",
           "region_band(row, g.Ha, g.ah, g.ash)", "region_band(row, g.Ha, g.ah, g.shift_h)",
           "kernel anchor region ids use the token shift (not shift // f) in height"),
    Mutant("anchor_shift_ceil", "grl_kernels/geometry.py",
           "return self.shift_h // self.down", "return (self.shift_h + self.down - 1) // self.down",
           "anchor shift rounded up (height)"),
    Mutant("groups1_shift", "grl_kernels/geometry.py",
           "sh = 0 if int(g) == 1 else int(d) // (2 * int(g))", "sh = int(d) // (2 * int(g))",
           "stripe_groups = 1 shifts by D // 2 instead of 0"),
    Mutant("reference_anchor_roll_swapped", "grl_kernels/reference/attention.py",
           "geom.anchor_shift_h, geom.anchor_shift_w)", "geom.anchor_shift_w, geom.anchor_shift_h)",
           "reference rolls the anchors by (shift_w, shift_h)"),
    Mutant("eps_float", "csrc/include/grl_geometry.h",
           "constexpr double kNormEps = 1e-12;", "constexpr double kNormEps = 1e-12f;",
           "kernel eps rounded to float32 (2e-8 off in float64)"),
    # 32-bit element offsets (caught only by the huge-offset tests, which the defaults do not run)
    Mutant("triton_batch_offset_i32", "grl_kernels/backends/triton/window_fwd.py",
           "qkv_b = QKV + tl.multiple_of(b.to(tl.int64) * s_qb, AL)", "qkv_b = QKV + tl.multiple_of(b * s_qb, AL)",
           "triton window forward: batch offset b * stride in int32", ("tests/test_large_offsets.py",)),
    Mutant("cpu_token_offset_i32", "csrc/cpu/grl_cpu_stripe_impl.h",
           "load_row(base + T.pos[jj] * A.vq.sl, A.vq.sc, d, tmp);",
           "load_row(base + static_cast<int>(T.pos[jj] * A.vq.sl), A.vq.sc, d, tmp);",
           "cpu stripe kernels: token offset pos * stride truncated to int", ("tests/test_large_offsets.py",)),
    Mutant("cuda_out_offset_i32", "csrc/cuda/grl_window.cu",
           "T* op = out + (t.b * L + pos) * p.C + t.h * d;",
           "T* op = out + static_cast<int>((t.b * L + pos) * p.C) + t.h * d;",
           "cuda window forward: output offset truncated to int", ("tests/test_large_offsets_cxx.py",)),
    Mutant("cpu_out_offset_i32", "csrc/cpu/grl_cpu_window_impl.h",
           "store_row(out + (b * g.H * g.W + I.pos[i0 + r]) * A.C + h * d, Y.data() + r * dp, d);",
           "store_row(out + static_cast<int>((b * g.H * g.W + I.pos[i0 + r]) * A.C) + h * d, Y.data() + r * dp, d);",
           "cpu window forward: output offset truncated to int", ("tests/test_large_offsets.py",)),
    Mutant("cpu_stat1_offset_u32", "csrc/cpu/grl_cpu_stripe_impl.h",
           "acc_t* st = stat1save + task * n2 * 2;  // the rows'",
           "acc_t* st = stat1save + static_cast<uint32_t>(task * n2 * 2);  // the rows'",
           "cpu stripe forward: saved stage-1 state offset truncated to uint32", ("tests/test_large_offsets.py",)),
    Mutant("cpu_danchor_offset_i32", "csrc/cpu/grl_cpu_stripe_impl.h",
           "store_row(ganc + (b * g.Ha * g.Wa + p) * C + h * d, dar, d);",
           "store_row(ganc + static_cast<int>((b * g.Ha * g.Wa + p) * C + h * d), dar, d);",
           "cpu stripe backward: d_anchor offset truncated to int", ("tests/test_large_offsets.py",)),
    # Triton 16-bit backward: Delta from the rounded output / unrounded dZ (the cancelling sums drift)
    Mutant("triton_window_delta_from_output", "grl_kernels/backends/triton/window_bwd.py",
           "            delta = dl * inv_l\n", "            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)\n",
           "triton window backward: Delta = rowsum(dO * O) with O rounded to 16 bits", ("tests/test_triton_interpreter.py",)),
    Mutant("triton_delta1_unrounded_dz", "grl_kernels/backends/triton/launcher.py",
           "    if qkv.dtype == torch.float32:\n        delta1 = (dz * z).sum(-1)",
           "    if True:\n        delta1 = (dz * z).sum(-1)",
           "triton stripe backward: Delta1 = dZ . Z with dZ unrounded in 16 bits", ("tests/test_triton_interpreter.py",)),
]

# the fast files that target these bugs (the whole suite takes ~20 minutes per mutant)
DEFAULT_TESTS = [
    "tests/test_published_quirks.py", "tests/test_hostile_values.py", "tests/test_fuzz.py",
    "tests/test_golden.py", "tests/test_patching_spandrel.py", "tests/test_geometry.py",
    "tests/test_cpu_geometry_header.py",
]


def _files(root: Path) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def _fresh_copy(dest: Path) -> None:
    """Make ``dest`` an exact copy of the working tree's files (timestamps kept, so ninja sees
    unchanged sources as up to date)."""
    if dest.exists():
        shutil.rmtree(dest)
    for f in _files(ROOT):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def _apply(dest: Path, m: Mutant) -> None:
    p = dest / m.path
    text = p.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutant {m.name}: expected the text to replace exactly once in {m.path}, found {n}")
    p.write_text(text.replace(m.old, m.new))


def _failed_tests(stdout: str) -> List[str]:
    seen = []
    for line in stdout.splitlines():
        mm = re.match(r"(FAILED|ERROR) (.+?)(?: - |$)", line)
        if mm and mm.group(2) not in seen:
            seen.append(mm.group(2))
    return seen


def _short(ids: List[str]) -> str:
    """Group failing test ids by file: file: n (first ids)."""
    by = {}
    for t in ids:
        f, _, rest = t.partition("::")
        by.setdefault(Path(f).name, []).append(rest)
    return "; ".join(f"{f}: {len(v)} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})" for f, v in by.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--tests", nargs="*", default=DEFAULT_TESTS, help="test files or ids to run per mutant")
    ap.add_argument("--workdir", default="/tmp/grl_mutation", help="scratch folder (copy + build caches)")
    ap.add_argument("--quick", action="store_true", help="stop each mutant's run at its first failing test")
    ap.add_argument("--baseline", action="store_true", help="also run the unmutated copy first (must pass)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.path:36s} {m.what}")
        return 0
    names = set(a.only or [m.name for m in MUTANTS])
    unknown = names - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants {sorted(unknown)}; --list shows them")
    work = Path(a.workdir)
    copy = work / "repo"
    todo = ([None] if a.baseline else []) + [m for m in MUTANTS if m.name in names]
    rows = []
    for m in todo:
        _fresh_copy(copy)
        name = "baseline" if m is None else m.name
        if m is not None:
            _apply(copy, m)
        cache = work / ("cache-" + m.name if m is not None and m.cpp else "cache-base")
        env = dict(os.environ, PYTHONPATH=str(copy) + os.pathsep + str(copy / "tests"), GRL_KERNELS_CACHE=str(cache),
                   GRL_FUZZ_INTERPRETER="0", GRL_FUZZ_NO_SHRINK="1", GRL_KERNELS_REQUIRE="cpu")
        env.pop("GRL_FUZZ_EXAMPLES", None)
        env.pop("GRL_FUZZ_STATS", None)
        extra = [t for t in (m.tests if m is not None else ()) if t not in a.tests]
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"] + (["-x"] if a.quick else []) + \
            a.tests + extra
        t0 = time.time()
        print(f"--- {name}: {'' if m is None else m.what}", flush=True)
        try:
            r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=a.timeout)
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), -1
        secs = time.time() - t0
        failed = _failed_tests(out)
        if "build failed" in out or "required backend(s) unavailable" in out:
            verdict = "build failed / backend unavailable"
        elif rc == -1:
            verdict = "timeout"
        elif failed:
            verdict = f"caught by {len(failed)}: " + _short(failed)
        elif rc == 0:
            verdict = "passes" if m is None else "NOT CAUGHT"
        else:
            verdict = f"pytest rc {rc}: " + out.strip().splitlines()[-1][:200]
        rows.append((name, verdict, secs))
        print(f"    {verdict}  [{secs:.0f} s]", flush=True)
    print("\n| mutant | planted bug | result |\n|---|---|---|")
    what = {m.name: m.what for m in MUTANTS}
    for name, verdict, secs in rows:
        print(f"| {name} | {what.get(name, 'none (must pass)')} | {verdict} |")
    bad = [n for n, v, _ in rows if (v != "passes") if n == "baseline"] + [n for n, v, _ in rows if v == "NOT CAUGHT"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
