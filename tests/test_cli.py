"""The grl-kernels command line: info, check, bench, bench-model (small, fast settings)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from grl_kernels.backends import registry
from grl_kernels.cli import main
from grl_kernels.cli.fixtures import default_fixture_dir
from grl_kernels.reference import stripe_attention_reference, window_attention_reference

TINY_WINDOW = "window:16x16,ws=8,shift=1,heads=2,dim=8"
TINY_STRIPE = "stripe:16x32,size=8xNone,groups=Nonex4,shift=1,f=4,heads=2,dim=8"


def _register(name, stripe, window):
    registry.register_backend(registry.Backend(
        name=name, stripe=stripe, window=window, devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.bfloat16}), priority=-100, description="test double",
    ))


@pytest.fixture
def scaled_backend():
    """A backend whose output is off by a relative 1e-4: float32 rows must catch it."""
    def stripe(*a):
        return stripe_attention_reference(*a) * (1 + 1e-4)

    def window(*a):
        return window_attention_reference(*a) * (1 + 1e-4)

    _register("test_scaled", stripe, window)
    yield "test_scaled"
    registry._REGISTRY.pop("test_scaled", None)


@pytest.fixture
def unshifted_backend():
    """A backend that forgets the cyclic shift: wrong exactly on shifted geometries."""
    def stripe(qkv, anchor, geom, *a):
        return stripe_attention_reference(qkv, anchor, dataclasses.replace(geom, shift_h=0, shift_w=0), *a)

    def window(qkv, geom, *a):
        return window_attention_reference(qkv, dataclasses.replace(geom, shift=0), *a)

    _register("test_unshifted", stripe, window)
    yield "test_unshifted"
    registry._REGISTRY.pop("test_unshifted", None)


def test_info(capsys, tmp_path):
    assert main(["info", "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "backends" in out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["torch"] == torch.__version__
    ref = next(b for b in info["backends"] if b["name"] == "reference")
    assert ref["available"] and "float32" in ref["dtypes"]


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "grl_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "reference" in r.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "check" in capsys.readouterr().out


def test_check_reference_passes(capsys, tmp_path):
    js, md = tmp_path / "c.json", tmp_path / "c.md"
    rc = main(["check", "--backend", "reference", "--dtype", "float32", "--no-progress",
               "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = json.loads(js.read_text())["rows"]
    judged = [r for r in rows if r["status"] != "SKIP"]
    assert judged and all(r["status"] == "PASS" for r in judged)
    assert all(r["bwd_rel"] is not None for r in judged if not r["case"].startswith("fixture GRL model"))
    if default_fixture_dir():
        assert any(r["case"].startswith("fixture stripe") for r in rows)
    assert "| backend |" in md.read_text() and "passed, 0 failed" in out


def test_check_fails_on_small_error(capsys, scaled_backend):
    rc = main(["check", "--backend", scaled_backend, "--no-fixtures", "--no-progress", "--case", "GRL-B"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = [ln for ln in out.splitlines() if ln.startswith(scaled_backend)]
    assert lines and all("FAIL" in ln for ln in lines if " float32 " in ln)
    assert any("PASS" in ln for ln in lines if " bfloat16 " in ln)  # 1e-4 is within bf16 rounding


def test_check_fails_exactly_on_shifted_cases(tmp_path, unshifted_backend):
    js = tmp_path / "c.json"
    rc = main(["check", "--backend", unshifted_backend, "--dtype", "float32", "--no-fixtures", "--no-progress",
               "--json", str(js)])
    assert rc == 1
    from grl_kernels.bench.cases import quick_check_cases

    shifted = {c.name for c in quick_check_cases() if c.geometry().shifted and
               (c.kind == "window" or c.geometry().shift_h or c.geometry().shift_w)}
    for r in json.loads(js.read_text())["rows"]:
        assert (r["status"] == "FAIL") == (r["case"] in shifted), r


def test_check_reports_crashing_backend(capsys):
    def boom(*a):
        raise RuntimeError("kernel exploded")

    _register("test_boom", boom, boom)
    try:
        rc = main(["check", "--backend", "test_boom", "--dtype", "float32", "--no-fixtures", "--no-progress"])
    finally:
        registry._REGISTRY.pop("test_boom", None)
    out = capsys.readouterr().out
    assert rc == 1 and "ERROR (RuntimeError: kernel exploded)" in out


def test_check_bad_arguments(capsys):
    assert main(["check", "--fixtures", "/nonexistent/dir", "--backend", "reference", "--dtype", "float32",
                 "--no-progress"]) == 2
    assert "--fixtures" in capsys.readouterr().err
    assert main(["check", "--backend", "nope", "--no-progress"]) == 2
    assert main(["check", "--case", "no such case", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["check", "--dtype", "int8"])


def test_bench_json_and_markdown(capsys, tmp_path):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "--geometry", TINY_WINDOW, "--geometry", TINY_STRIPE, "--baselines", "reference",
               "--backend", "reference", "--reps", "2", "--warmup", "0", "--device", "cpu", "--no-progress",
               "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["ceilings"]["matmul_gflops"] > 0
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["fwd_speedup"] == 1.0 and r["fwd_gflops"] > 0 and r["fwdbwd_peak_mib"] >= 0
        assert 0 < r["fwd_flops_frac"]
    text = md.read_text()
    assert "Ceilings measured in this run" in text and "| case | impl |" in text and "**cpu**" in text


def test_bench_flags_wrong_implementation(capsys, scaled_backend):
    rc = main(["bench", "--geometry", TINY_WINDOW, "--baselines", "reference", "--backend", scaled_backend,
               "--reps", "1", "--warmup", "0", "--no-ceilings", "--no-progress", "--no-backward"])
    out = capsys.readouterr().out
    assert rc == 1 and "wrong (output differs from the reference" in out


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--geometry", "window:10x10,ws=8", "--no-progress"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["bench", "--baselines", "sdpa", "--no-progress"]) == 2
    assert main(["bench", "--size", "big", "--no-progress"]) == 2


@pytest.mark.parametrize("command", ["bench", "bench-model"])
def test_single_valued_option_given_twice_is_refused(capsys, command):
    # argparse would silently keep the last value: a run that measures something else than asked
    with pytest.raises(SystemExit) as exc:
        main([command, "--dtype", "bfloat16", "--dtype", "float32", "--no-progress"])
    assert exc.value.code == 2
    assert "--dtype: given twice ('bfloat16', then 'float32')" in capsys.readouterr().err


def test_bench_model_small(capsys, tmp_path):
    pytest.importorskip("grl_kernels.models")
    from grl_kernels.bench.published import spandrel_available

    js = tmp_path / "m.json"
    rc = main(["bench-model", "--preset", "GRL-T", "--image-size", "16", "--reps", "1", "--device", "cpu",
               "--backend", "reference", "--optimize", "--no-progress", "--json", str(js)])
    assert rc == 0, capsys.readouterr()
    rows = json.loads(js.read_text())["results"]
    by = {r["backend"]: r for r in rows}
    expected = (["published"] if spandrel_available() else []) + ["reference", "optimize(compile=False)"]
    assert [r["backend"] for r in rows] == expected
    assert all(r["status"] == "ok" and r["infer_ms"] > 0 for r in rows), rows
    ref = by["reference"]
    assert ref["train_ms"] > 0 and ref["infer_speedup"] == 1.0
    assert "train_ms" not in by["optimize(compile=False)"]  # inference only
    assert by["optimize(compile=False)"]["max_rel_err"] <= 5e-2
    if spandrel_available():  # the published network is the ratios' baseline and its output the reference
        assert by["published"]["x_published"] == 1.0 and "max_rel_err" not in by["published"]
        assert ref["max_rel_err"] <= 1e-5 and ref["x_published"] > 0 and ref["peak_vs_published"] > 0
    rc = main(["bench-model", "--preset", "GRL-T", "--image-size", "16", "--reps", "1", "--no-published",
               "--backend", "reference", "--no-train", "--no-progress", "--json", str(js)])
    assert rc == 0 and [r["backend"] for r in json.loads(js.read_text())["results"]] == ["reference"]


def test_console_script_declared():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert 'grl-kernels = "grl_kernels.cli:main"' in f.read()


def test_gpu_suite_skeleton(tmp_path):
    """The suite script parses, honours its time budget and always leaves its two result files
    (summary.md and gpu_suite.tar.gz: the device returns few files); the full CPU dry run is
    tests/test_gpu_suite.py."""
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_suite.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, SKIP_INSTALL="1", TOTAL_BUDGET="5", PYTHON=sys.executable)
    r = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_suite.tar.gz", "summary.md"]
    with tarfile.open(tmp_path / "out" / "gpu_suite.tar.gz") as tar:
        steps = tar.extractfile("gpu_suite/steps.tsv").read().decode().splitlines()
        assert json.loads(tar.extractfile("gpu_suite/summary.json").read())["steps"]
    assert steps[0].split("\t")[:4] == ["step", "rc", "seconds", "budget"]
    assert any(s.startswith("check\tskipped") for s in steps)  # the 5 s budget was spent
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| step | rc |" in summary and "torch" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_sanitizer_case_needs_cuda():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "sanitizer_case.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no CUDA device" in r.stdout


def test_interrupted_check_keeps_rows():
    from grl_kernels.cli.check import plan, run_checks

    work, _ = plan(["reference"], quick=True, dtypes=[torch.float32])
    calls = []

    def progress(label):
        calls.append(label)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what SIGTERM becomes under grl-kernels

    rows = run_checks(work, progress=progress)
    assert [r.status for r in rows] == ["PASS", "PASS", "ERROR"]
    assert rows[-1].note == f"interrupted: {len(work) - 2} of {len(work)} checks not run"


def test_bench_dash_dash_model_is_bench_model(capsys):
    pytest.importorskip("grl_kernels.models")
    rc = main(["bench", "--model", "--preset", "GRL-T", "--image-size", "16", "--no-train", "--device", "cpu",
               "--backend", "reference", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "GRL-T" in out and "infer ms" in out
    assert main(["bench", "--model", "--dtype", "float64", "--no-progress"]) == 2
