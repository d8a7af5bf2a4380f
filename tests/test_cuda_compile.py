"""Compile checks of the CUDA sources with this machine's nvcc (no GPU needed).

Every CUDA translation unit (.cu) includes no torch header, so it compiles with the CUDA
toolkit alone: ``nvcc -c -arch=sm_80`` and ``-arch=sm_90``. The torch binding
(grl_cuda_binding.cpp) is checked against the installed (CPU) torch with the host
compiler (syntax and types, no link). Skipped only when nvcc is missing.
"""
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
        cmd = [NVCC, "-c", f"-arch={arch}", "-std=c++17", *INCLUDES, str(CUDA_DIR / src), "-o", str(out / f"{src}.{arch}.o")]
        return job, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

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
