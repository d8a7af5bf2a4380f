"""64-bit element offsets in the C++ code (no torch in the first test): see csrc/emu/offsets_selftest.cpp.

- the CUDA kernels, emulated on the host, run on the last image of a batch of 50M images (thread
  indices, output, saved-state and workspace offsets all beyond 2^31 elements, in lazily mapped
  buffers) and must give the bits of image 0; the index helpers of grl_geometry.h are checked at
  positions beyond 2^31 and their types (and the problem structs') by static_asserts; the build
  uses -Wconversion -Werror, so an implicit 64 -> 32-bit narrowing in the kernels fails it;
- the CPU kernels (torch headers as system headers) compile cleanly under -Wconversion too.
  At run time, tests/test_large_offsets.py checks their reads through huge strides and their
  writes (contiguous outputs, saved state and gradients of a huge batch in lazily mapped
  buffers, only image 0's and image B-1's tasks run); this static check catches an implicit
  narrowing anywhere, also in code those shapes do not reach.
"""
import shutil
import subprocess
import sysconfig

import pytest

from grl_kernels.backends.extension import build_config, source_root

ROOT = source_root()


def _cxx():
    """GCC: its -Wconversion is the 64 -> 32-bit narrowing check wanted here (clang's also turns on
    -Wsign-conversion, which the kernels' unsigned array extents trip)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++")
    return cxx


def test_cuda_kernels_and_geometry_offsets_are_64_bit(tmp_path):
    exe = tmp_path / "offsets_selftest"
    inc = [f"-I{ROOT / d}" for d in build_config.CUDA_EMU_INCLUDE_DIRS]
    cmd = [_cxx(), "-std=c++20", "-O1", "-DGRL_CUDA_EMU", "-Wall", "-Wconversion", "-Werror", "-Wno-unknown-pragmas",
           *inc, str(ROOT / "csrc" / "emu" / "offsets_selftest.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "the harness does not compile (implicit narrowing is an error here):\n" + res.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())  # no lazily committed address space (vm.overcommit_memory = 2)
    assert run.returncode == 0, (run.returncode, run.stdout[-3000:], run.stderr[-2000:])
    assert "all offset checks ok" in run.stdout and run.stdout.count("ok ") == 3, run.stdout


def test_cpu_kernels_have_no_implicit_narrowing():
    """Each CPU kernel file, syntax only, -Wconversion -Werror (the files compiled in parallel)."""
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{ROOT / d}" for d in build_config.INCLUDE_DIRS]
    sysinc = [a for p in [*include_paths(), sysconfig.get_paths()["include"]] for a in ("-isystem", p)]
    base = [_cxx(), "-std=c++20", "-fsyntax-only", "-fopenmp", "-Wconversion", "-Werror", "-DTORCH_EXTENSION_NAME=x",
            *inc, *sysinc]
    procs = {src: subprocess.Popen([*base, str(ROOT / src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src in build_config.CPU_SOURCES if "binding" not in src}
    errors = {}
    for src, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors[src] = err[-3000:]
    assert not errors, "implicit narrowing in the CPU kernels:\n" + "\n".join(f"{k}:\n{v}" for k, v in errors.items())
