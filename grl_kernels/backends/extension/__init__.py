"""Loader of the compiled extensions (CPU: ``_C_cpu``, CUDA: ``_C_cuda``; ``_C_cuda_emu``: the
CUDA kernels built for the host, JIT only, see docs/cuda.md).

Order: the module built at install time (``grl_kernels._C_cpu``: in a wheel, or from
``pip install --no-build-isolation``); if it is missing or stale, ONE just-in-time build per
process with ``torch.utils.cpp_extension.load`` into a cache folder (one message on stderr
saying where). If that fails too, :func:`load` raises :class:`ExtensionUnavailable` carrying the
compiler's reason and what to install; every later call re-raises it at once, and the backends
report themselves unavailable.

Sources: a source checkout's ``csrc/`` (editable installs), else the copy that every install
carries inside the package (``grl_kernels/_src/csrc``), so the just-in-time build works after
``pip install <checkout>``, ``pip install <sdist>`` or a wheel.

Cache: ``$GRL_KERNELS_CACHE`` or ``~/.cache/grl_kernels``, one folder per torch and Python
version, in it one build folder per extension, source hash and flags. A matching earlier
build is reused; changed sources, flags or torch get a new build. Builds are serialized across
processes by a file lock (an OS lock, released if its holder dies). ``GRL_KERNELS_NO_JIT=1``
disables the just-in-time build.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Dict

from . import build_config as cfg

_PACKAGE = Path(__file__).resolve().parents[2]  # the installed grl_kernels/ folder
_CHECKOUT = _PACKAGE.parent  # a source checkout's root, when the package runs from one
_lock = threading.Lock()
_cache: Dict[str, object] = {}
INSTALL_HINT = (
    "the fused kernels need a C++ compiler and ninja at first use: install g++ (Debian/Ubuntu: "
    "'apt-get install g++'; Fedora: 'dnf install gcc-c++'; conda: 'conda install gxx') and "
    "'pip install ninja'; GRL_KERNELS_VERBOSE_BUILD=1 prints the whole build log"
)


class ExtensionUnavailable(RuntimeError):
    """The compiled extension could not be imported nor built."""


def source_root() -> Path:
    """The folder holding ``csrc/``: the checkout the package runs from, else the packaged copy."""
    if (_CHECKOUT / "csrc").is_dir() and (_CHECKOUT / "setup.py").is_file():
        return _CHECKOUT
    return _PACKAGE / cfg.PACKAGED_SOURCE_DIR


def cache_dir() -> Path:
    import torch

    base = os.environ.get("GRL_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grl_kernels")
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base) / tag


def _prebuilt(name: str, kind: str):
    try:
        mod = importlib.import_module(f"grl_kernels.{name}")
    except ImportError:
        return None
    if getattr(mod, "abi_version", None) != cfg.ABI_VERSION:
        return None  # built from incompatible sources
    root = source_root()
    if (root / "csrc").is_dir() and getattr(mod, "source_hash", None) != cfg.source_hash(root, kind):
        print(f"grl_kernels: the installed {name} was built from other sources than {root / 'csrc'}; "
              "rebuilding just in time", file=sys.stderr, flush=True)
        return None
    return mod


def _build_flags(kind: str, root: Path):
    """Compiler flags and include folders of one extension kind (keyword arguments of cpp_extension.load)."""
    includes = cfg.CUDA_EMU_INCLUDE_DIRS if kind == "cuda_emu" else cfg.INCLUDE_DIRS
    flags = dict(extra_include_paths=[str(root / d) for d in includes])
    if kind == "cpu":
        flags.update(extra_cflags=cfg.cpu_cflags(root), extra_ldflags=list(cfg.CPU_LDFLAGS))
    elif kind == "cuda_emu":
        flags.update(extra_cflags=cfg.cuda_emu_cflags(root), extra_ldflags=list(cfg.CUDA_EMU_LDFLAGS))
    else:
        flags.update(extra_cflags=cfg.cuda_cflags(root), extra_cuda_cflags=cfg.nvcc_flags())
    return flags


def build_dir_for(kind: str, root: Path, flags) -> Path:
    """One folder per (extension, sources, flags) inside the per-torch cache folder."""
    # include folders are absolute paths under root (fixed per kind): left out, so the same sources
    # installed in another place (another venv) reuse the build
    same = sorted((k, v) for k, v in flags.items() if k != "extra_include_paths")
    key = hashlib.sha1(f"{kind}|{cfg.source_hash(root, kind)}|{same}".encode()).hexdigest()[:12]
    return cache_dir() / f"{kind}-{key}"


def _missing_tools(kind: str):
    from torch.utils import cpp_extension

    missing = []
    if not cpp_extension.is_ninja_available():
        missing.append("ninja ('pip install ninja')")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        missing.append(f"a C++ compiler ({cxx!r} not on PATH)")
    return missing


def _jit(kind: str):
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("GRL_KERNELS_NO_JIT", "0") == "1":
        raise ExtensionUnavailable("no prebuilt extension and GRL_KERNELS_NO_JIT=1")
    root = source_root()
    sources = {"cpu": cfg.CPU_SOURCES, "cuda": cfg.CUDA_SOURCES, "cuda_emu": cfg.CUDA_EMU_SOURCES}[kind]
    paths = [root / s for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExtensionUnavailable(f"extension sources not found (a broken install? reinstall grl_kernels): {missing}")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise ExtensionUnavailable("this torch build has no CUDA support")
        if cpp_extension.CUDA_HOME is None:
            raise ExtensionUnavailable("no CUDA toolkit found (set CUDA_HOME) to build the CUDA kernels")
    tools = _missing_tools(kind)
    if tools:
        raise ExtensionUnavailable(f"cannot build the {kind} extension: missing {', '.join(tools)}; {INSTALL_HINT}")
    flags = _build_flags(kind, root)
    build_dir = build_dir_for(kind, root, flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"grl_kernels_C_{kind}"
    return _locked_build(kind, name, paths, root, flags, build_dir)


def _locked_build(kind, name, paths, root, flags, build_dir):
    from filelock import FileLock, Timeout  # a dependency of torch
    from torch.utils import cpp_extension

    lock = FileLock(str(build_dir) + ".lock")
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"grl_kernels: another process is building the {kind} extension in {build_dir}; waiting ...",
              file=sys.stderr, flush=True)
        lock.acquire(timeout=float(os.environ.get("GRL_KERNELS_BUILD_WAIT", "1800")))
    try:
        so = build_dir / f"{name}.so"
        if so.is_file():  # the hash in the folder's name says it matches: import it, run no build tool
            mod = _import_built(name, so)
            if mod is not None:
                return mod
        print(f"grl_kernels: building the {kind} extension just in time (once, 1-3 minutes; cached in "
              f"{build_dir}) ...", file=sys.stderr, flush=True)
        stale = build_dir / "lock"  # torch's own baton, left behind if a builder was killed
        if stale.exists():
            stale.unlink()  # safe: we hold the lock, so no other grl_kernels build runs here
        try:
            mod = cpp_extension.load(
                name=name,
                sources=[str(p) for p in paths],
                build_directory=str(build_dir),
                verbose=os.environ.get("GRL_KERNELS_VERBOSE_BUILD", "0") == "1",
                **flags,
            )
        except Exception as exc:  # compiler errors come as RuntimeError / CalledProcessError
            tail = _compiler_message(exc, build_dir)
            print(f"grl_kernels: the {kind} extension build failed:\n{tail}\n{INSTALL_HINT}", file=sys.stderr, flush=True)
            raise ExtensionUnavailable(f"just-in-time build of the {kind} extension failed: {tail}; {INSTALL_HINT}") from exc
        print(f"grl_kernels: {kind} extension ready.", file=sys.stderr, flush=True)
        return mod
    finally:
        lock.release()


def _import_built(name: str, so: Path):
    """Import a finished build directly. (cpp_extension.load would re-run ninja, and rebuild
    everything when the same sources sit at another path, e.g. in another venv.)"""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(name, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as exc:  # a partial or broken build: build again
        print(f"grl_kernels: cannot import the cached {so} ({exc}); rebuilding", file=sys.stderr, flush=True)
        return None
    return mod


def _compiler_message(exc: Exception, build_dir: Path) -> str:
    """The compiler's own words: the first error lines of the build, else the exception's tail."""
    text = str(exc).strip()
    out = getattr(exc, "output", None)
    if isinstance(out, bytes):
        text = out.decode(errors="replace") + "\n" + text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "ninja" not in ln.lower()]
    picked = (errors[:8] or lines[-15:]) if lines else [type(exc).__name__]
    return "\n".join(picked)


_NAMES = {"cpu": cfg.CPU_NAME, "cuda": cfg.CUDA_NAME, "cuda_emu": cfg.CUDA_EMU_NAME}


def load(kind: str):
    """The compiled module for ``kind`` ("cpu", "cuda" or "cuda_emu"); raises ExtensionUnavailable."""
    if kind not in _NAMES:
        raise ValueError(f"kind must be one of {sorted(_NAMES)}, got {kind!r}")
    with _lock:
        if kind not in _cache:
            name = _NAMES[kind]
            try:
                _cache[kind] = _prebuilt(name, kind) or _jit(kind)
            except ExtensionUnavailable as exc:
                _cache[kind] = exc
            except Exception as exc:  # anything else: still unavailable, with the reason
                _cache[kind] = ExtensionUnavailable(f"{type(exc).__name__}: {exc}")
        got = _cache[kind]
    if isinstance(got, Exception):
        raise got
    return got


_no_prebuilt = set()  # kinds whose prebuilt module was looked for and is missing or stale


def loaded_without_building(kind: str):
    """The module for ``kind`` if it is loaded, or installed prebuilt for these sources (then
    loaded now); None otherwise. Never starts a just-in-time build (grl_kernels.heap uses it)."""
    with _lock:
        got = _cache.get(kind)
        if got is None:
            if kind in _no_prebuilt:
                return None
            try:
                got = _prebuilt(_NAMES[kind], kind)
            except Exception:  # a broken install: leave the reason to load()
                got = None
            if got is None:
                _no_prebuilt.add(kind)
                return None
            _cache[kind] = got
    return None if isinstance(got, Exception) else got


def availability(kind: str):
    """(True, "") or (False, reason) -- builds on first use."""
    try:
        load(kind)
    except ExtensionUnavailable as exc:
        return False, str(exc)
    return True, ""
