"""The Triton kernels compile for sm80 (A100) and sm90 (H100/H200) without a GPU, within budget.

The launcher is run on meta tensors to record every launch it would make for the published
geometries (window 8..36, stripes 8 x W/4 up to 72 x 144, f 2 and 4), dtypes and head dims; each
launch becomes the specialization Triton's JIT compiles for it (divisibility-16 attributes, ints
equal to 1 as constants: ``compile_check.runtime_specialization``), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a cubin.

CI gates (``compile_check.gate_violations``) on a covering subset, both targets: no spills / stack
in any forward kernel, nor in backward kernels at head dim <= 32; shared memory within the device
limit; at most 4 static atomic instructions per kernel (the bias gradients use none). The subset:
every kernel in bfloat16 at head dim 30 (GRL-B) with its largest tiles and window, plus two float32
forward kernels at head dim 64 and one backward kernel at head dim 30 (float32 products lower to
FMA loops instead of MMA: another code path, with its own tile sizes). The full matrix runs with GRL_TRITON_COMPILE_ALL=1, or as
``python -m grl_kernels.backends.triton.compile_check --arch 80 90 --workers N [--dump DIR]``.
"""
import json
import os

import pytest
import torch

pytest.importorskip("triton")

from grl_kernels.backends.triton import compile_check as cc  # noqa: E402
from grl_kernels.backends.triton.kernels import INTERPRETED, KERNELS  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")

WORKERS = max(1, min(4, os.cpu_count() or 1))


def _gate(rows):
    for row in rows:
        print(cc.format_row(row))
    bad = cc.gate_violations(rows)
    assert not bad, "static resource budget exceeded:\n" + "\n".join(bad)


def test_every_kernel_is_launched_and_signatures_match():
    specs = cc.specializations(dtypes=(torch.bfloat16,), head_dims=(16, 30, 64))
    names = {s["kernel"] for s in specs}
    assert names == set(vars(KERNELS)), set(vars(KERNELS)) ^ names
    for s in specs:
        fn = getattr(KERNELS, s["kernel"])
        assert list(s["signature"]) == list(fn.arg_names), s["kernel"]
        c = s["constexprs"]
        if "D" in c:
            assert c["D"] in (16, 32, 64) and c["BM"] in (16, 32, 64) and c.get("BN", 16) in (16, 32, 64)
    # published anchor counts N2 = 8, 16, 32 shrink the anchor tiles; tokens keep 64-row tiles
    bms = {s["constexprs"]["BM"] for s in specs if s["kernel"] == "stripe_fwd_anchor_partial"}
    assert bms == {16, 32, 64}


def test_runtime_specialization_is_the_jits():
    """Strides equal to 1 become constants, 16-divisible ints and (aligned) pointers get
    tt.divisibility=16; the JIT's binder and our fallback rules agree on real launches."""
    from grl_kernels.geometry import window_geometry

    rec = cc._record("window", window_geometry((16, 16), 8, True), 2, 30, torch.bfloat16)
    for r in rec:
        fn = getattr(KERNELS, r["kernel"])
        jit = cc.runtime_specialization(fn, r["args"], r["constexprs"])
        assert jit == cc._manual_specialization(fn, r["args"], r["constexprs"]), r["kernel"]
    fwd = next(r for r in rec if r["kernel"] == "window_fwd")
    sig, consts, attrs = cc.runtime_specialization(KERNELS.window_fwd, fwd["args"], fwd["constexprs"])
    names = KERNELS.window_fwd.arg_names
    assert sig["s_qc"] == "constexpr" and consts[(names.index("s_qc"),)] == 1  # channel stride 1
    assert sig["s_ql"] == "i32" and (names.index("s_ql"),) not in attrs  # 3C = 180: not 16-divisible
    assert attrs[(names.index("QKV"),)] == [["tt.divisibility", 16]]
    assert consts[(names.index("ws"),)] == 8 and consts[(names.index("d"),)] == 30


def test_static_atomic_count_and_gates_catch_violations():
    ptx = "\t@%p1 red.global.add.f32 [%rd1], %f1;\n\tatom.global.add.u64 %rd2, [%rd3], 1;\n\tld.global.b32 %r1, [%rd4];\n"
    assert cc.static_atomics(ptx) == 2
    ok = dict(arch="sm_90", kernel="window_fwd", dtype="bf16", D=32, BM=64, BN=64, spill_bytes=0, stack_bytes=0,
              shared_bytes=1000, shared_limit=232448, atomics=0)
    assert cc.gate_violations([ok]) == []
    assert len(cc.gate_violations([dict(ok, spill_bytes=8, stack_bytes=8)])) == 1
    assert cc.gate_violations([dict(ok, kernel="window_bwd_dq", D=64, spill_bytes=8)]) == []  # allowed at D 64
    assert len(cc.gate_violations([dict(ok, kernel="window_bwd_dq", D=32, stack_bytes=16)])) == 1
    assert len(cc.gate_violations([dict(ok, shared_bytes=300000)])) == 1
    assert len(cc.gate_violations([dict(ok, atomics=5)])) == 1
    assert 0 < cc.occupancy(128, 40000, 4, 90) <= 1 and cc.occupancy(255, 0, 4, 90) == 0.125


def _ci_subset(arch):
    specs = cc.specializations(dtypes=(torch.bfloat16,), head_dims=(30,), capability=arch)
    subset = cc.covering_subset(specs, dtypes=(torch.bfloat16,))
    assert {s["kernel"] for s in subset} == set(vars(KERNELS))
    specs32 = cc.specializations(dtypes=(torch.float32,), head_dims=(64,), capability=arch)
    subset += [s for s in cc.covering_subset(specs32, dtypes=(torch.float32,))
               if s["kernel"] in ("window_fwd", "stripe_fwd_tokens")]  # D = 64
    specs30 = cc.specializations(dtypes=(torch.float32,), head_dims=(30,), capability=arch)
    subset += [s for s in cc.covering_subset(specs30, dtypes=(torch.float32,)) if s["kernel"] == "window_bwd_dq"]
    return subset


def test_compile_covering_subset_sm80_sm90_within_budget():
    rows = []
    for arch in (90, 80):
        subset = _ci_subset(arch)
        rows += cc.run((arch,), subset, log=None, workers=WORKERS)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and all(r["registers"] > 0 for r in rows)
    _gate(rows)


def test_dump_writes_ptx_cubin_and_manifest(tmp_path):
    rc = cc.main(["--arch", "90", "--dtypes", "bfloat16", "--head-dims", "16", "--subset",
                  "--kernels", "window_fwd", "bias_grad_reduce", "--dump", str(tmp_path)])
    assert rc == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {m["kernel"] for m in manifest} == {"window_fwd", "bias_grad_reduce"}
    for m in manifest:
        for key in ("kernel", "arch", "dtype", "head_dim", "geometry", "ptx", "cubin", "registers", "stack_bytes",
                    "spill_bytes", "shared_bytes"):
            assert key in m, key
        assert m["arch"] == "sm_90" and (tmp_path / m["ptx"]).is_file() and (tmp_path / m["cubin"]).is_file()
        assert ".target sm_90" in (tmp_path / m["ptx"]).read_text()


@pytest.mark.skipif(os.environ.get("GRL_TRITON_COMPILE_ALL") != "1",
                    reason="full matrix (~1800 compiles per target): set GRL_TRITON_COMPILE_ALL=1")
def test_compile_every_published_specialization():
    rows = []
    for arch in (80, 90):
        specs = cc.specializations(head_dims=cc.HEAD_DIMS + (128,), capability=arch)
        rows += cc.run((arch,), specs, log=None, workers=os.cpu_count() or 1)
    _gate(rows)
