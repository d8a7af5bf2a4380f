"""Loader of the compiled extensions (CPU: ``_C_cpu``, CUDA: ``_C_cuda``; ``_C_cuda_emu``: the
CUDA kernels built for the host, JIT only, see docs/cuda.md).

Order: the module built by ``pip install --no-build-isolation -e .`` (``grl_kernels._C_cpu``);
if it is missing or stale, ONE just-in-time build per process with
``torch.utils.cpp_extension.load`` into a cache folder (progress on stderr). If that fails too,
:func:`load` raises :class:`ExtensionUnavailable` carrying the compiler's reason, every later
call re-raises it at once, and the backends report themselves unavailable.

Cache folder: ``$GRL_KERNELS_CACHE`` or ``~/.cache/grl_kernels``, one subfolder per torch
version and Python version. ``GRL_KERNELS_NO_JIT=1`` disables the JIT build.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Dict

from . import build_config as cfg

_ROOT = Path(__file__).resolve().parents[3]  # repository root (holds csrc/)
_lock = threading.Lock()
_cache: Dict[str, object] = {}


class ExtensionUnavailable(RuntimeError):
    """The compiled extension could not be imported nor built."""


def source_root() -> Path:
    return _ROOT


def cache_dir() -> Path:
    import torch

    base = os.environ.get("GRL_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grl_kernels")
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base) / tag


def _prebuilt(name: str):
    try:
        mod = importlib.import_module(f"grl_kernels.{name}")
    except ImportError:
        return None
    if getattr(mod, "abi_version", None) != cfg.ABI_VERSION:
        return None  # built from incompatible sources
    if (_ROOT / "csrc").is_dir() and getattr(mod, "source_hash", None) != cfg.source_hash(_ROOT):
        print(f"grl_kernels: the installed {name} was built from other sources than {_ROOT / 'csrc'}; "
              "rebuilding just in time", file=sys.stderr, flush=True)
        return None
    return mod


def _cached_build_is_fresh(so: Path) -> bool:
    """True when a cached build exists and is newer than every file under csrc/ (no message then)."""
    try:
        built = so.stat().st_mtime
        return all(f.stat().st_mtime <= built for f in (_ROOT / "csrc").rglob("*") if f.is_file())
    except OSError:
        return False


def _jit(kind: str):
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("GRL_KERNELS_NO_JIT", "0") == "1":
        raise ExtensionUnavailable("no prebuilt extension and GRL_KERNELS_NO_JIT=1")
    sources = {"cpu": cfg.CPU_SOURCES, "cuda": cfg.CUDA_SOURCES, "cuda_emu": cfg.CUDA_EMU_SOURCES}[kind]
    paths = [_ROOT / s for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExtensionUnavailable(f"extension sources not found (install from a source checkout): {missing}")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise ExtensionUnavailable("this torch build has no CUDA support")
        if cpp_extension.CUDA_HOME is None:
            raise ExtensionUnavailable("no CUDA toolkit found (set CUDA_HOME) to build the CUDA kernels")
    build_dir = cache_dir() / kind
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = _cached_build_is_fresh(build_dir / f"grl_kernels_C_{kind}.so")
    if not fresh:
        print(
            f"grl_kernels: building the {kind} extension just in time (once; cached in {build_dir}) ...",
            file=sys.stderr,
            flush=True,
        )
    kwargs = dict(
        name=f"grl_kernels_C_{kind}",
        sources=[str(p) for p in paths],
        extra_include_paths=[str(_ROOT / d) for d in (cfg.CUDA_EMU_INCLUDE_DIRS if kind == "cuda_emu" else cfg.INCLUDE_DIRS)],
        build_directory=str(build_dir),
        verbose=os.environ.get("GRL_KERNELS_VERBOSE_BUILD", "0") == "1",
    )
    if kind == "cpu":
        kwargs.update(extra_cflags=cfg.cpu_cflags(_ROOT), extra_ldflags=cfg.CPU_LDFLAGS)
    elif kind == "cuda_emu":
        kwargs.update(extra_cflags=cfg.cuda_emu_cflags(_ROOT), extra_ldflags=cfg.CUDA_EMU_LDFLAGS)
    else:
        kwargs.update(extra_cflags=cfg.cuda_cflags(_ROOT), extra_cuda_cflags=cfg.nvcc_flags())
    try:
        mod = cpp_extension.load(**kwargs)
    except Exception as exc:  # compiler errors come as RuntimeError / CalledProcessError
        msg = str(exc).strip().splitlines()
        tail = "\n".join(msg[-15:]) if msg else type(exc).__name__
        print(f"grl_kernels: the {kind} extension build failed: {tail}", file=sys.stderr, flush=True)
        raise ExtensionUnavailable(f"just-in-time build of the {kind} extension failed: {tail}") from exc
    if not fresh:
        print(f"grl_kernels: {kind} extension ready.", file=sys.stderr, flush=True)
    return mod


_NAMES = {"cpu": cfg.CPU_NAME, "cuda": cfg.CUDA_NAME, "cuda_emu": cfg.CUDA_EMU_NAME}


def load(kind: str):
    """The compiled module for ``kind`` ("cpu", "cuda" or "cuda_emu"); raises ExtensionUnavailable."""
    if kind not in _NAMES:
        raise ValueError(f"kind must be one of {sorted(_NAMES)}, got {kind!r}")
    with _lock:
        if kind not in _cache:
            name = _NAMES[kind]
            try:
                _cache[kind] = _prebuilt(name) or _jit(kind)
            except ExtensionUnavailable as exc:
                _cache[kind] = exc
            except Exception as exc:  # anything else: still unavailable, with the reason
                _cache[kind] = ExtensionUnavailable(f"{type(exc).__name__}: {exc}")
        got = _cache[kind]
    if isinstance(got, Exception):
        raise got
    return got


def availability(kind: str):
    """(True, "") or (False, reason) -- builds on first use."""
    try:
        load(kind)
    except ExtensionUnavailable as exc:
        return False, str(exc)
    return True, ""
