"""The benchmark toolkit: cases, FLOP/byte counts, timing, memory, baselines, reports."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from grl_kernels.bench import baselines as BL
from grl_kernels.bench.cases import (
    bench_cases, call_backend, full_check_cases, make_inputs, odd_cases, parse_case, published_cases,
    quick_check_cases,
)
from grl_kernels.bench.compare import errors, tolerance
from grl_kernels.bench.counts import bytes_moved, flops
from grl_kernels.bench.machine import machine_info
from grl_kernels.bench.progress import Progress
from grl_kernels.bench.report import markdown_table, text_table
from grl_kernels.bench.timing import peak_memory, time_fn

SMALL_STRIPE = parse_case("stripe:16x32,size=8xNone,groups=Nonex4,shift=1,f=4,heads=2,dim=8")
SMALL_WINDOW = parse_case("window:16x24,ws=8,shift=1,heads=2,dim=8")


def test_check_cases_cover_the_quirks():
    for cases in (quick_check_cases(), full_check_cases()):
        geoms = [(c, c.geometry()) for c in cases]
        stripes = [(c, g) for c, g in geoms if c.kind == "stripe"]
        assert any(g.shift_w > 0 and g.anchor_shift_w == 0 for _, g in stripes)  # t // f == 0 quirk
        assert any(c.stripe_size[0] is None and c.stripe_groups[0] is not None for c, _ in stripes)  # vertical
        assert any(g.down == 2 for _, g in stripes) and any(g.down == 4 for _, g in stripes)
        assert any(c.H != c.W for c, _ in geoms)
        assert any(c.head_dim == 30 for c, _ in geoms)
        assert any(c.kind == "window" and g.shifted for c, g in geoms)
        assert any(c.kind == "window" and not g.shifted for c, g in geoms)
        assert any(not g.shifted for _, g in stripes) and any(g.shifted for _, g in stripes)
    assert len(published_cases()) == 18 and len(odd_cases()) >= 6
    assert len(bench_cases(quick=True)) == 2


def test_parse_case():
    c = parse_case("stripe:64x32,size=8xNone,groups=Nonex4,shift=1,f=4,heads=3,dim=30,vertical=1,batch=2")
    g = c.geometry()
    assert (c.batch, c.heads, c.head_dim) == (2, 3, 30)
    assert (g.sh, g.sw, g.shift_h, g.shift_w, g.down) == (16, 8, 8, 4, 4)  # vertical: groups on the height
    w = parse_case("window:24x36,ws=12,shift=0,heads=2,dim=16").geometry()
    assert (w.ws, w.shift) == (12, 0)
    for bad, msg in [("cube:8x8", "expected"), ("window:8by8", "image size"), ("window:8x8,ws", "key=value"),
                     ("window:8x8,foo=1", "unknown keys"), ("window:12x12,ws=8", "divisible")]:
        with pytest.raises(ValueError, match=msg):
            parse_case(bad)


def test_make_inputs_strided_and_converted():
    inp = make_inputs(SMALL_STRIPE, requires_grad=True)
    assert not inp.qkv.is_contiguous() and inp.qkv.shape == (1, 16 * 32, 48)
    assert inp.leaves()["qkv"].shape == (1, 16 * 32, 96)
    conv = make_inputs(SMALL_STRIPE, torch.float64, source=inp)
    assert torch.equal(conv.qkv, inp.qkv.double()) and conv.anchor.dtype == torch.float64
    assert torch.all(inp.scale1 >= 5 - 1e-4) and torch.all(inp.scale1 <= 30 + 1e-3)


@pytest.mark.parametrize("case", [SMALL_STRIPE, SMALL_WINDOW], ids=["stripe", "window"])
def test_flops_match_the_reference_matmuls(case):
    """Our closed-form count equals what FlopCounterMode sees in the reference's matmuls."""
    inp = make_inputs(case, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = call_backend(BL.ReferenceBaseline(), case, inp)
    assert fc.get_total_flops() == flops(case)
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == flops(case, backward=True) - flops(case)


def test_bytes_moved():
    c = SMALL_WINDOW  # B=1, L=384, C=16, float32: qkv 384*48*4, out 384*16*4, table 225*2*4 + tau 2*4
    assert bytes_moved(c, torch.float32) == 384 * 48 * 4 + 384 * 16 * 4 + (225 * 2 + 2) * 4
    assert bytes_moved(c, torch.bfloat16) < bytes_moved(c, torch.float32) < bytes_moved(c, torch.float32, True)


def test_time_fn_and_early_stop():
    calls = []
    t = time_fn(lambda: calls.append(1), reps=5, warmup=2)
    assert t.reps == 5 and len(calls) == 7 and 0 <= t.min_s <= t.median_s
    slow = time_fn(lambda: sum(range(20000)), reps=1000, warmup=0, max_seconds=0.0)
    assert slow.reps == 1


def test_peak_memory_sees_allocations():
    n = 4 << 20  # 4 Mi float32 = 16 MiB

    def fn():
        a = torch.ones(n)
        b = a * 2  # both alive: 32 MiB
        return b.sum()

    peak = peak_memory(fn) / 2 ** 20
    assert 30 <= peak <= 48, peak  # page-granular RSS with ~MiB of noise
    assert peak_memory(lambda: None) / 2 ** 20 < 8


def test_errors_and_tolerances():
    e = torch.tensor([1.0, -4.0])
    assert errors(e + torch.tensor([0.0, 0.4]), e) == pytest.approx((0.4, 0.1))
    assert errors(torch.tensor([float("nan"), 0.0]), e) == (math.inf, math.inf)
    with pytest.raises(ValueError, match="shape"):
        errors(e[:1], e)
    assert tolerance(torch.float32)[0] < tolerance(torch.float16)[0] < tolerance(torch.bfloat16)[0]


@pytest.mark.parametrize("name", ["compile", "flex"])
@pytest.mark.parametrize("case", [SMALL_STRIPE, SMALL_WINDOW], ids=["stripe", "window"])
def test_baselines_match_reference(name, case):
    if name == "flex" and BL.flex_available():
        pytest.skip(BL.flex_available())
    inp = make_inputs(case)
    ref = call_backend(BL.ReferenceBaseline(), case, inp)
    out = call_backend(BL.make_baselines([name])[0], case, inp)
    assert errors(out, ref)[1] < tolerance(torch.float32)[0]


def test_progress_and_tables():
    s = io.StringIO()
    with Progress(2, "t", stream=s) as p:
        p.step("a")
        p.step("b")
    text = s.getvalue()
    assert "1/2" in text and "2/2" in text and "t done: 2 steps" in text
    tt = text_table(["a", "b"], [[1.5, None], ["x", float("nan")]])
    assert tt.splitlines()[2].split() == ["1.5", "-"]
    md = markdown_table(["a", "b"], [["x|y", 2e-7]])
    assert md.splitlines()[2] == "| x/y | 2.00e-07 |"


def test_machine_info():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert "gpu" in info and "python" in info


def test_softmax_floor_probe_runs_and_rejects_bad_arguments(capsys):
    """benchmarks/softmax_floor.py (the per-logit floor of issue 12's note): one small run of
    two geometries prints a row each; a non-positive size is refused with a usage error."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "softmax_floor.py"
    spec = importlib.util.spec_from_file_location("softmax_floor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--configs", "window8", "stripe8x64", "--size", "32", "--repeat", "1",
                     "--dtype", "float32", "--ceiling-gflops", "100"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("window8", "stripe8x64"))]
    assert len(rows) == 2 and all(len(r.split()) == 11 for r in rows)
    with pytest.raises(SystemExit):
        mod.main(["--size", "0"])
