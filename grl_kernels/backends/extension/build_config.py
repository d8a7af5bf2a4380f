"""Sources and compiler flags of the compiled extensions: ONE place for setup.py and the JIT build.

Plain Python without imports of torch or of the package, so setup.py can load it by
file path. Paths are relative to the repository root (the folder holding csrc/).

Where the code is built decides the CPU flags:
- the just-in-time build runs on the machine that uses it: ``-march=native`` unless
  GRL_KERNELS_PORTABLE=1;
- setup.py builds go into wheels that may run on any x86-64 CPU: portable (no ``-march``)
  unless GRL_KERNELS_NATIVE=1 (what scripts/setup_env.sh sets for the editable developer build).
MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured by torch's build tools as usual.
"""
import os

ABI_VERSION = 1  # must equal GRL_ABI_VERSION in csrc/cpu/grl_cpu_binding.cpp and csrc/cuda/grl_cuda_binding.cpp

CPU_NAME = "_C_cpu"
CUDA_NAME = "_C_cuda"

CPU_SOURCES = [
    "csrc/cpu/grl_cpu_binding.cpp", "csrc/cpu/grl_cpu_stripe.cpp", "csrc/cpu/grl_cpu_window.cpp",
    "csrc/cpu/grl_cpu_block_cache.cpp",
]
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
    return flags + ([hash_define(root, "cuda_emu")] if root is not None else [])


CUDA_EMU_LDFLAGS = ["-fopenmp"]


def cpu_cflags(root=None, native=None):
    """Flags of the CPU extension. ``native`` None: the just-in-time default (native unless
    GRL_KERNELS_PORTABLE=1); setup.py passes :func:`setup_native`."""
    # the C++ standard is torch's (C++20 for torch 2.13). -fno-tree-loop-distribute-patterns:
    # keep the short row copies (head dim 16-64) as inline vector loops instead of calls to
    # memcpy/memset, which cost more than the copy at this size (measured: 11% of a forward).
    # -g0: Python's own CFLAGS ask for -g; the debug info would be 2/3 of a wheel (21 MB .so).
    flags = ["-O3", "-fopenmp", "-fno-tree-loop-distribute-patterns", "-g0"]
    if root is not None:
        flags.append(hash_define(root, "cpu"))
    if native is None:
        native = os.environ.get("GRL_KERNELS_PORTABLE", "0") != "1"
    if native:
        flags.append("-march=native")
    return flags


def setup_native() -> bool:
    """setup.py builds are portable unless GRL_KERNELS_NATIVE=1 (a build for this machine only)."""
    return os.environ.get("GRL_KERNELS_NATIVE", "0") == "1"


# Where installed packages keep their copy of csrc/ (setup.py's build_py puts it there), so the
# just-in-time build works from any install, not only from a source checkout.
PACKAGED_SOURCE_DIR = "_src"  # grl_kernels/_src/csrc/...


CPU_LDFLAGS = ["-fopenmp"]

SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


# csrc folders each extension kind compiles from (its sources and the headers they include)
SOURCE_FOLDERS = {"cpu": ("include", "cpu"), "cuda": ("include", "cuda"), "cuda_emu": ("include", "cuda", "emu")}


def source_hash(root, kind=None) -> int:
    """63-bit hash of the sources under <root>/csrc that extension ``kind`` compiles (every
    source when None); compiled into the modules (GRL_SOURCE_HASH) so the loader can tell a
    build from older sources. Per kind, so that an edit of the CUDA sources does not rebuild
    the CPU extension."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha1()
    base = Path(root) / "csrc"
    folders = SOURCE_FOLDERS[kind] if kind is not None else None
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if folders is not None and rel.parts[0] not in folders:
            continue
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            h.update(str(path.relative_to(base)).encode())
            h.update(path.read_bytes())
    return int(h.hexdigest()[:15], 16)


def hash_define(root, kind=None):
    return f"-DGRL_SOURCE_HASH={source_hash(root, kind)}LL"


def cuda_cflags(root=None):
    return ["-O3"] + ([hash_define(root, "cuda")] if root is not None else [])


def nvcc_flags():
    return ["-O3", "-lineinfo"]  # no --use_fast_math: exact expf like the reference
