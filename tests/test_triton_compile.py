"""The Triton kernels compile for sm80 (A100) and sm90 (H100) without a GPU.

The launcher is run on meta tensors to record every launch it would make for the published
geometries (window 8..36, stripes 8 x W/4 up to 72 x 144, f 2 and 4), dtypes and head dims;
each unique (kernel, signature, constexprs) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a cubin, and the
shared memory of every kernel is printed and checked against the device limit.

CI compiles a covering subset on both targets: every kernel (deterministic variants included)
in bfloat16 at head dim 32 with the largest tiles, plus the float32 kernel with the most shared
memory at head dim 64 (float32 products lower to FMA loops instead of MMA: a separate code
path; such kernels take 10-20 s each to compile with triton 3.9, so CI compiles one). The full matrix (~500 compiles, all
dtypes, head dims 16..128) runs with GRL_TRITON_COMPILE_ALL=1, or as
``python -m grl_kernels.backends.triton.compile_check --workers N``.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from grl_kernels.backends.triton import compile_check as cc  # noqa: E402
from grl_kernels.backends.triton.kernels import INTERPRETED, KERNELS  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")

WORKERS = max(1, min(4, os.cpu_count() or 1))


def _report(rows):
    for row in rows:
        print(cc._format(row))
    over = [r for r in rows if r[2] > cc.SHARED_LIMIT[r[0]]]
    assert not over, f"shared memory over the device limit: {over}"


def test_every_kernel_is_launched_and_signatures_match():
    specs = cc.specializations(head_dims=(16, 30, 64))
    names = {s["kernel"] for s in specs}
    assert names == set(vars(KERNELS)), set(vars(KERNELS)) ^ names
    for s in specs:
        fn = getattr(KERNELS, s["kernel"])
        assert list(s["signature"]) == list(fn.arg_names), s["kernel"]
        c = s["constexprs"]
        assert c["D"] in (16, 32, 64) and c["BM"] in (16, 32, 64) and c.get("BN", 16) in (16, 32, 64)
    # published anchor counts N2 = 8, 16, 32 shrink the anchor tiles; tokens keep 64-row tiles
    bms = {s["constexprs"]["BM"] for s in specs if s["kernel"] == "stripe_fwd_anchor_partial"}
    assert bms == {16, 32, 64}


def test_compile_covering_subset_sm80_sm90():
    # every kernel (deterministic variants too) in bfloat16 at head dim 32 (GRL-S/B), and the
    # float32 kernel with the most shared memory at head dim 64
    specs16 = cc.specializations(dtypes=(torch.bfloat16,), head_dims=(32,))
    subset = cc.covering_subset(specs16, dtypes=(torch.bfloat16,))
    assert {s["kernel"] for s in subset} == set(vars(KERNELS))
    specs32 = cc.specializations(dtypes=(torch.float32,), head_dims=(64,))
    subset += [s for s in cc.covering_subset(specs32, dtypes=(torch.float32,))
               if s["kernel"] == "stripe_bwd_tokens1" and not s["constexprs"]["DETERMINISTIC"]]
    rows = cc.run((90, 80), subset, log=None, workers=WORKERS)
    assert len(rows) == 2 * len(subset)
    _report(rows)


@pytest.mark.skipif(os.environ.get("GRL_TRITON_COMPILE_ALL") != "1",
                    reason="full matrix (~500 compiles): set GRL_TRITON_COMPILE_ALL=1")
def test_compile_every_published_specialization():
    specs = cc.specializations(head_dims=cc.HEAD_DIMS + (128,))
    _report(cc.run((80, 90), specs, log=None, workers=os.cpu_count() or 1))
