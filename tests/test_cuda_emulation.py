"""The CUDA emulation layer itself (csrc/emu; docs/cuda.md).

- its 16-bit conversions equal torch's (round to nearest even) on every 16-bit pattern and on
  every rounding boundary;
- the kernels, emulated, on exactly sized malloc'd buffers under AddressSanitizer + UBSan
  (csrc/emu/emu_selftest.cpp, no torch);
- GRL_KERNELS_EMULATE_CUDA=1: `info` says "cuda (emulated on CPU)", "auto" never picks it,
  `check --backend cuda` runs the CUDA kernels on the CPU.
The kernels' numerics through the emulation are tests/test_cuda_kernels.py (device "cpu").
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from grl_kernels.backends.extension import build_config, load, source_root

ROOT = source_root()
NO_JIT = os.environ.get("GRL_KERNELS_NO_JIT") == "1"
pytestmark = pytest.mark.skipif(NO_JIT, reason="the emulation is built just in time")


@pytest.fixture(scope="module")
def emu():
    return load("cuda_emu")


def _f32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _boundaries(dtype) -> torch.Tensor:
    """float32 values around every rounding boundary of `dtype`: each finite 16-bit value, the exact
    midpoints to its neighbours (ties) and one float32 ulp on either side of them."""
    pats = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    vals = pats.view(dtype).float()
    vals = vals[torch.isfinite(vals)].unique()  # sorted, both signs, +-0 merged
    vals = torch.cat([vals, torch.tensor([0.0, -0.0])])
    mids = ((vals[1:].double() + vals[:-1].double()) / 2).float()  # exact in float32 for both formats
    top = vals.max().double()
    over = torch.tensor([top + (top - vals.sort().values[-2].double()) / 2], dtype=torch.float64).float()
    base = torch.cat([vals, mids, over, -over])
    bits = base.view(torch.int32)
    near = torch.cat([_f32_from_bits(bits + 1), _f32_from_bits(bits - 1)])
    special = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, 1e-30, -1e-30, 2.0 ** -25, 2.0 ** -24,
                            2.0 ** -14, 65504.0, 65519.99, 65520.0, 3.4e38])
    rand = torch.randn(100000) * torch.exp(torch.randn(100000) * 8)
    out = torch.cat([base, near, special, rand])
    return out[torch.isfinite(out) | torch.isinf(out)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounding_equals_torch(emu, dtype):
    x = _boundaries(dtype)
    got = emu.emu_round_bits(x, dtype == torch.bfloat16)
    want = x.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), hex(got[i].item()), hex(want[i].item())) for i in bad[:5]]
    nan = emu.emu_round_bits(torch.tensor([float("nan"), -float("nan")]), dtype == torch.bfloat16)
    assert torch.isnan(nan.to(torch.int16).view(dtype).float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widening_equals_torch(emu, dtype):
    pats = torch.arange(0, 1 << 16, dtype=torch.int32)
    got = emu.emu_widen_bits(pats, dtype == torch.bfloat16)
    want = pats.to(torch.int16).view(dtype).float()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), pats[~same][:5].tolist()


def _sanitizer_cxx():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    return cxx


def test_kernels_under_asan_and_ubsan(tmp_path):
    """Emulated kernels on exactly sized buffers, strided qkv, transposed anchors: no out-of-bounds
    access, no undefined behaviour (the sanitizers abort with a report, rc != 0)."""
    cxx = _sanitizer_cxx()
    exe = tmp_path / "emu_selftest"
    inc = [f"-I{ROOT / d}" for d in build_config.CUDA_EMU_INCLUDE_DIRS]
    cmd = [cxx, "-std=c++20", "-O0", "-g1", "-DGRL_CUDA_EMU", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas", *inc,
           str(ROOT / "csrc" / "emu" / "emu_selftest.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "sanitize" in res.stderr and "cannot find" in res.stderr:
        pytest.skip(f"the compiler has no sanitizer runtime: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    assert "all cases ok" in run.stdout and run.stdout.count("ok ") >= 8, run.stdout


def _cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ, GRL_KERNELS_EMULATE_CUDA="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "grl_kernels", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def test_emulated_backend_in_the_cli(tmp_path):
    info = _cli("info", "--json", str(tmp_path / "info.json"))
    assert info.returncode == 0, info.stderr[-3000:]
    assert "cuda (emulated on CPU)" in info.stdout
    import json

    cuda = [b for b in json.loads((tmp_path / "info.json").read_text())["backends"] if b["name"] == "cuda"][0]
    assert cuda["available"] and "cpu" in cuda["devices"], cuda
    # validates the CUDA kernels on this machine: 3 dtypes x the small t//f = 0 quirk case
    chk = _cli("check", "--backend", "cuda", "--case", "t//f=0", "--no-fixtures", "--no-progress",
               "--json", str(tmp_path / "check.json"))
    assert chk.returncode == 0, (chk.stdout[-3000:], chk.stderr[-3000:])
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert {r["dtype"] for r in rows if r["backend"] == "cuda" and r["device"] == "cpu"} == {
        "float32", "float16", "bfloat16"}, rows
    assert all(r["status"] == "PASS" for r in rows), rows


def test_auto_never_picks_the_emulation():
    code = (
        "import torch, grl_kernels as G\n"
        "from grl_kernels.backends import resolve_backend\n"
        "assert G.backends.registry._REGISTRY['cuda'].supports(torch.device('cpu'), torch.float16)\n"
        "print(resolve_backend('auto', torch.device('cpu'), torch.float16).name,"
        " resolve_backend('auto', torch.device('cpu'), torch.float32).name,"
        " resolve_backend('cuda', torch.device('cpu'), torch.float16).name)\n"
    )
    env = dict(os.environ, GRL_KERNELS_EMULATE_CUDA="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["reference", "cpu", "cuda"], res.stdout


def test_without_the_flag_cuda_takes_no_cpu_tensors():
    from grl_kernels.backends import cuda_backend

    if cuda_backend.EMULATED:
        pytest.skip("GRL_KERNELS_EMULATE_CUDA=1 in this process")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend._check("qkv", torch.zeros(1))
