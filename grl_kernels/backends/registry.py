"""Backend registry: names -> implementations, availability, and the default.

A backend provides ``stripe(...)`` and ``window(...)`` with the signatures of
:mod:`grl_kernels.reference.attention` (differentiable with respect to qkv,
anchor, scales and bias tables), and says which devices and dtypes it handles.
"auto" resolves, per call, to the available backend with the highest priority
that supports the inputs' device and dtype; "reference" always qualifies.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch


class BackendUnavailableError(RuntimeError):
    """A known backend cannot run here (missing compiler, no GPU, ...)."""


@dataclass
class Backend:
    name: str
    stripe: Callable
    window: Callable
    devices: FrozenSet[str]  # device types handled, e.g. {"cpu"} or {"cuda"}
    dtypes: FrozenSet[torch.dtype]
    priority: int = 0  # higher wins for "auto"
    check_available: Callable[[], Tuple[bool, str]] = field(default=lambda: (True, ""))
    description: str = ""
    # devices "auto" may pick this backend for (None: all of `devices`); an explicit name
    # still works on every device of `devices` (e.g. the CUDA kernels emulated on the CPU).
    auto_devices: Optional[FrozenSet[str]] = None
    display_name: str = ""  # shown by `grl-kernels info` instead of the name, e.g. "cuda (emulated on CPU)"
    _status: Optional[Tuple[bool, str]] = None

    def availability(self) -> Tuple[bool, str]:
        """(available, reason if not). Evaluated once and cached."""
        if self._status is None:
            try:
                self._status = tuple(self.check_available())  # type: ignore[assignment]
            except Exception as exc:  # a broken optional dependency must not break the package
                self._status = (False, f"{type(exc).__name__}: {exc}")
        return self._status  # type: ignore[return-value]

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.devices and dtype in self.dtypes

    def auto_ok(self, device: torch.device) -> bool:
        return self.auto_devices is None or device.type in self.auto_devices


_REGISTRY: Dict[str, Backend] = {}
_state = threading.local()
_global_default = ["auto"]


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered_backends() -> List[str]:
    return list(_REGISTRY)


def backend_info() -> List[Tuple[str, bool, str]]:
    """[(name, available, reason)] for every registered backend."""
    out = []
    for name, b in _REGISTRY.items():
        ok, why = b.availability()
        out.append((name, ok, why))
    return out


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine, best first."""
    names = [b for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority) if b.availability()[0]]
    return [b.name for b in names]


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str naming a backend, got {type(name).__name__}")
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {sorted(_REGISTRY)}")
    return name


def set_default_backend(name: str) -> None:
    """Set the package-wide default backend ("auto" or a registered name)."""
    _global_default[0] = _check_name(name)


def get_default_backend() -> str:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_default[0]


class use_backend:
    """Context manager: everything run inside uses ``name`` unless a call names its own.

    The selection is per thread (each thread has its own stack). One object may be entered
    several times, also nested and from several threads: every ``with`` pushes ``name`` on
    the current thread's stack and its exit pops it again.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = _check_name(name)

    def __enter__(self) -> "use_backend":
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        stack = getattr(_state, "stack", None)
        if not stack or stack[-1] != self.name:  # exits out of order: a misuse, never silent
            raise RuntimeError(
                f"use_backend({self.name!r}) exited while the innermost active backend of this thread is "
                f"{stack[-1] if stack else None!r}; expected contexts to be exited in reverse order of entry"
            )
        stack.pop()
        return False

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


_warned: set = set()
_warn_lock = threading.Lock()


class FallbackWarning(UserWarning):
    """"auto" ran a slower backend because a faster one that takes the inputs is unavailable."""


def _warn_fallback_once(skipped: List[Backend], chosen: Backend) -> None:
    """One warning per process and skipped backend, with its reason (which says what to install)."""
    with _warn_lock:
        new = [b for b in skipped if b.name not in _warned]
        _warned.update(b.name for b in new)
    for b in new:
        warnings.warn(
            f"grl_kernels: backend {b.name!r} is unavailable ({b.availability()[1]}); 'auto' runs the "
            f"slower {chosen.name!r} backend instead. `grl-kernels info` lists every backend's status.",
            FallbackWarning,
            stacklevel=4,
        )


def resolve_backend(name: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend to run for inputs on ``device`` with ``dtype``.

    ``name`` None means the current default. An explicit backend that is unavailable
    or cannot take these inputs is an error, never a silent fallback.
    """
    name = _check_name(get_default_backend() if name is None else name)
    if name == "auto":
        skipped = []
        for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
            if b.supports(device, dtype) and b.auto_ok(device):
                if b.availability()[0]:
                    if skipped:
                        _warn_fallback_once(skipped, b)
                    return b
                skipped.append(b)
        raise BackendUnavailableError(f"no available backend handles {dtype} tensors on {device}")
    b = _REGISTRY[name]
    ok, why = b.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    if not b.supports(device, dtype):
        raise ValueError(
            f"backend {name!r} does not handle {dtype} tensors on {device.type}; it takes devices "
            f"{sorted(b.devices)} and dtypes {sorted(str(t) for t in b.dtypes)}"
        )
    return b
