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
