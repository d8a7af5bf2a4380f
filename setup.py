"""Build script: the Python package, plus compiled extensions when their sources exist.

Metadata lives in pyproject.toml. The compiled extension (csrc/) is added by
``_extensions()``; without sources or a compiler the package still installs, and every
install carries a copy of csrc/ inside the package (``grl_kernels/_src/csrc``, see
``BuildPyWithSources``) so the kernels can be built just in time on first use.
"""
from setuptools import setup
from setuptools.command.build_py import build_py


def _build_config():
    """grl_kernels/backends/extension/build_config.py, loaded by path (no package import)."""
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "grl_kernels", "backends", "extension", "build_config.py")
    spec = importlib.util.spec_from_file_location("_grl_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return here, mod


def _note(msg):
    import sys

    print(f"grl_kernels setup: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the built package as grl_kernels/_src/csrc: wheels
    (and installs from a checkout or an sdist, which go through a wheel) then hold the kernel
    sources for the just-in-time build. Editable installs read the checkout's csrc/ directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        import os

        here, cfg = _build_config()
        src = os.path.join(here, "csrc")
        if not os.path.isdir(src):
            _note("csrc/ not found: the installed package cannot build its kernels just in time")
            return
        dest = os.path.join(self.build_lib, "grl_kernels", cfg.PACKAGED_SOURCE_DIR, "csrc")
        for folder, _, files in os.walk(src):
            for f in files:
                if f.endswith(cfg.SOURCE_SUFFIXES):
                    rel = os.path.relpath(os.path.join(folder, f), src)
                    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                    self.copy_file(os.path.join(folder, f), os.path.join(dest, rel))


def _want_cuda(torch, cpp_extension):
    import os

    if os.environ.get("GRL_KERNELS_NO_CUDA", "0") == "1":
        return False, "GRL_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch has no CUDA support"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (CUDA_HOME) found"
    return True, ""


def _extensions():
    """CPU extension always (when torch is importable), CUDA extension when a CUDA toolkit and a
    CUDA build of torch are present. With build isolation torch is not importable here: then no
    extension is built and the package builds its kernels just in time on first use.
    Honours MAX_JOBS and TORCH_CUDA_ARCH_LIST (torch's build tools); GRL_KERNELS_NO_EXT=1 skips all,
    GRL_KERNELS_NO_CUDA=1 skips CUDA. The CPU code is built portable (it may go into a wheel for
    other x86-64 CPUs) unless GRL_KERNELS_NATIVE=1 (-march=native, for this machine only).
    """
    import os

    if os.environ.get("GRL_KERNELS_NO_EXT", "0") == "1":
        _note("GRL_KERNELS_NO_EXT=1: no compiled extension (the kernels build just in time on first use)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # build isolation: torch is not installed in the build environment
        _note("torch is not importable (build isolation?): no compiled extension now; it builds just in time")
        return [], {}
    here, cfg = _build_config()
    if not all(os.path.isfile(os.path.join(here, s)) for s in cfg.CPU_SOURCES):
        _note("csrc/ sources not found: no compiled extension")
        return [], {}
    include = [os.path.join(here, d) for d in cfg.INCLUDE_DIRS]
    exts = [
        cpp_extension.CppExtension(
            f"grl_kernels.{cfg.CPU_NAME}",
            cfg.CPU_SOURCES,
            include_dirs=include,
            extra_compile_args={"cxx": cfg.cpu_cflags(here, native=cfg.setup_native())},
            extra_link_args=list(cfg.CPU_LDFLAGS),
        )
    ]
    ok, why = _want_cuda(torch, cpp_extension)
    if ok:
        exts.append(
            cpp_extension.CUDAExtension(
                f"grl_kernels.{cfg.CUDA_NAME}",
                cfg.CUDA_SOURCES,
                include_dirs=include,
                extra_compile_args={"cxx": cfg.cuda_cflags(here), "nvcc": cfg.nvcc_flags()},
            )
        )
    else:
        _note(f"CUDA extension skipped: {why}")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
