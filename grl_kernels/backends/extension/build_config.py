"""Sources and compiler flags of the compiled extensions: ONE place for setup.py and the JIT build.

Plain Python without imports of torch or of the package, so setup.py can load it by
file path. Paths are relative to the repository root (the folder holding csrc/).

Environment:
- GRL_KERNELS_PORTABLE=1: do not add -march=native (binaries for other CPUs);
- MAX_JOBS, TORCH_CUDA_ARCH_LIST: honoured by torch's build tools as usual.
"""
import os

ABI_VERSION = 1  # must equal GRL_ABI_VERSION in csrc/cpu/grl_cpu_binding.cpp and csrc/cuda/grl_cuda_binding.cpp

CPU_NAME = "_C_cpu"
CUDA_NAME = "_C_cuda"

CPU_SOURCES = ["csrc/cpu/grl_cpu_binding.cpp", "csrc/cpu/grl_cpu_stripe.cpp", "csrc/cpu/grl_cpu_window.cpp"]
CUDA_SOURCES = ["csrc/cuda/grl_cuda_binding.cpp", "csrc/cuda/grl_stripe.cu", "csrc/cuda/grl_window.cu"]
INCLUDE_DIRS = ["csrc/include", "csrc/cpu", "csrc/cuda"]

# The CUDA kernels compiled for the host through csrc/emu/grl_cuda_emu.h (CPU tensors; see
# docs/cuda.md). Never built by setup.py: only just in time, when GRL_KERNELS_EMULATE_CUDA=1
# (or a test) asks for it. The wrappers #include the .cu sources, so the kernel code is one source.
CUDA_EMU_NAME = "_C_cuda_emu"
CUDA_EMU_SOURCES = ["csrc/emu/grl_emu_binding.cpp", "csrc/emu/grl_emu_stripe.cpp", "csrc/emu/grl_emu_window.cpp"]
CUDA_EMU_INCLUDE_DIRS = INCLUDE_DIRS + ["csrc/emu"]


def cuda_emu_cflags(root=None):
    # -O2: the emulated kernels only need to be fast enough for small test shapes;
    # -fopenmp runs the blocks of a launch in parallel; #pragma unroll is nvcc's, not GCC's.
    flags = ["-O2", "-DGRL_CUDA_EMU", "-fopenmp", "-Wno-unknown-pragmas"]
    return flags + ([hash_define(root)] if root is not None else [])


CUDA_EMU_LDFLAGS = ["-fopenmp"]


def cpu_cflags(root=None):
    # the C++ standard is torch's (C++20 for torch 2.13). -fno-tree-loop-distribute-patterns:
    # keep the short row copies (head dim 16-64) as inline vector loops instead of calls to
    # memcpy/memset, which cost more than the copy at this size (measured: 11% of a forward).
    flags = ["-O3", "-fopenmp", "-fno-tree-loop-distribute-patterns"]
    if root is not None:
        flags.append(hash_define(root))
    if os.environ.get("GRL_KERNELS_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


CPU_LDFLAGS = ["-fopenmp"]

SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


def source_hash(root) -> int:
    """63-bit hash of every source under <root>/csrc; compiled into the modules
    (GRL_SOURCE_HASH) so the loader can tell a build from older sources."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha1()
    base = Path(root) / "csrc"
    for path in sorted(base.rglob("*")):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            h.update(str(path.relative_to(base)).encode())
            h.update(path.read_bytes())
    return int(h.hexdigest()[:15], 16)


def hash_define(root):
    return f"-DGRL_SOURCE_HASH={source_hash(root)}LL"


def cuda_cflags(root=None):
    return ["-O3"] + ([hash_define(root)] if root is not None else [])


def nvcc_flags():
    return ["-O3", "-lineinfo"]  # no --use_fast_math: exact expf like the reference
