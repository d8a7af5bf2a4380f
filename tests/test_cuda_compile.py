"""Compile checks of the CUDA sources with this machine's nvcc (no GPU needed).

Every CUDA translation unit (.cu) includes no torch header, so it compiles with the CUDA
toolkit alone: ``nvcc -c -arch=sm_80`` and ``-arch=sm_90``, with ``-Xptxas -v``, whose resource
lines gate the kernels statically (benchmarks/cuda_static_report.py parses them and writes the
committed report): no spills in any forward kernel nor in the backward kernels of head dim <= 32,
no shared memory beyond the 48 KiB static limit, at most 4 atomic instructions per kernel in the
SASS (cuobjdump, bundled with Triton). The torch binding
(grl_cuda_binding.cpp) is checked against the installed (CPU) torch with the host
compiler (syntax and types, no link). Skipped only when nvcc is missing.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grl_kernels.backends.extension import build_config, source_root

NVCC = shutil.which("nvcc")
ROOT = source_root()
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
INCLUDES = [f"-I{ROOT / d}" for d in build_config.INCLUDE_DIRS]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _cuda_include() -> Path:
    """The toolkit's include folder (CUDA_HOME, torch's guess, next to nvcc, /usr/local/cuda)."""
    from torch.utils import cpp_extension

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             str(Path(os.path.realpath(NVCC)).parent.parent), "/usr/local/cuda"]
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    pytest.skip("CUDA runtime headers not found (set CUDA_HOME)")


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every (file, arch) once, two at a time; {(file, arch): CompletedProcess}."""
    out = tmp_path_factory.mktemp("nvcc")

    def one(job):
        src, arch = job
        obj = out / f"{src}.{arch}.o"
        cmd = [NVCC, "-c", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", *INCLUDES, str(CUDA_DIR / src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        res.obj = obj
        return job, res

    jobs = [(s, a) for s in CU_FILES for a in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, jobs))


def test_cuda_sources_exist():
    assert set(CU_FILES) == {Path(s).name for s in build_config.CUDA_SOURCES if s.endswith(".cu")}
    assert CU_FILES, "no CUDA sources"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES)
def test_nvcc_compiles(nvcc_results, src, arch):
    res = nvcc_results[(src, arch)]
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]


def _report():
    spec = importlib.util.spec_from_file_location("cuda_static_report", ROOT / "benchmarks" / "cuda_static_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ARCHS)
def test_static_resource_gates(nvcc_results, arch):
    rep = _report()
    kernels = []
    for src in CU_FILES:
        res = nvcc_results[(src, arch)]
        assert res.returncode == 0, res.stderr[-2000:]
        kernels += rep.parse_ptxas(res.stderr)
    assert len(kernels) >= 20 and all(k["registers"] for k in kernels), kernels[:3]
    fwd = [k for k in kernels if "forward" in k["kernel"]]
    bwd = [k for k in kernels if "backward" in k["kernel"] and (k["maxd"] or 0) <= 32]
    # the bias / logit-scale gradient kernels (partials, reductions) and the row norms: no tiles
    rest = [k for k in kernels if "forward" not in k["kernel"] and "backward" not in k["kernel"]]
    assert fwd and bwd and any("bias_partial" in k["kernel"] for k in rest)
    # every kernel, head dim 64 included (the backward kernels re-read their input rows there:
    # row_elem / reread in grl_cuda_common.cuh)
    spilling = [(k["kernel"], k["dtype"], k["maxd"], k["spill_stores"]) for k in kernels if k["spill_stores"]]
    assert not spilling, f"kernels that spill on {arch}: {spilling}"
    assert all(k["shared_bytes"] <= 48 * 1024 for k in kernels)


@pytest.mark.parametrize("arch", ["sm_90"])
def test_static_atomic_count(nvcc_results, arch, tmp_path):
    """No kernel has an atomic instruction (the bias / logit-scale gradients are fixed-order
    reductions). Positive control: a two-line kernel with atomicAdd must count >= 1, so a SASS
    pattern gone stale cannot pass this silently."""
    rep = _report()
    cuobjdump = rep.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled one)")
    probe = tmp_path / "atomic_probe.cu"
    probe.write_text("__global__ void probe(float* p, float v) { atomicAdd(p + threadIdx.x, v); }\n")
    obj = tmp_path / "atomic_probe.o"
    res = subprocess.run([NVCC, "-c", f"-arch={arch}", str(probe), "-o", str(obj)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    control = rep.count_atomics(obj, cuobjdump)
    if control is None:
        pytest.skip(f"{cuobjdump} cannot read this nvcc's objects")
    assert control and max(control.values()) >= 1, f"the SASS pattern misses atomicAdd: {control}"
    for src in CU_FILES:
        counts = rep.count_atomics(nvcc_results[(src, arch)].obj, cuobjdump)
        assert counts, src
        with_atomics = {rep.short_name(k): v for k, v in counts.items() if v}
        assert not with_atomics, f"{src}: kernels with atomic instructions: {with_atomics}"


def test_cuda_units_include_no_torch():
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    for path in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cuh")) + [CUDA_DIR / "grl_cuda.h"]:
        assert not pattern.search(path.read_text()), f"{path.name} includes a torch header"
    for path in (ROOT / "csrc" / "include").glob("*.h"):
        assert not pattern.search(path.read_text()), path.name


def test_binding_compiles_against_cpu_torch():
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cmd = [
        cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=grl_cuda_check",
        *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", f"-I{_cuda_include()}",
        *INCLUDES, str(CUDA_DIR / "grl_cuda_binding.cpp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
