"""Backends of the attention ops. Importing this package registers every backend."""
from .registry import (
    Backend,
    BackendUnavailableError,
    FallbackWarning,
    available_backends,
    backend_info,
    get_default_backend,
    register_backend,
    registered_backends,
    resolve_backend,
    set_default_backend,
    use_backend,
)
from . import reference_backend  # noqa: F401  (registers "reference")
from . import triton_backend  # noqa: F401  (registers "triton")

def _register_or_report(module: str, names) -> None:
    """Import a compiled backend's module (it registers itself; built lazily). If even the import
    fails (e.g. a torch too old for its op registration), register the names as unavailable with
    the reason, so "auto" warns and `grl-kernels info` says why, instead of an unknown name."""
    import importlib

    try:
        importlib.import_module(f"{__name__}.{module}")
    except Exception as exc:
        import torch

        why = f"grl_kernels.backends.{module} failed to import ({type(exc).__name__}: {exc})"
        for name, device in names:
            register_backend(Backend(name=name, stripe=None, window=None, devices=frozenset({device}),
                                     dtypes=frozenset({torch.float32}), priority=-1,
                                     check_available=lambda why=why: (False, why)))


_register_or_report("cpu_backend", [("cpu", "cpu")])
_register_or_report("cuda_backend", [("cuda", "cuda")])

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "FallbackWarning",
    "available_backends",
    "backend_info",
    "get_default_backend",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "set_default_backend",
    "use_backend",
]
