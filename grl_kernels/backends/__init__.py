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
try:  # compiled "cpu"/"cuda" backends: registered always, built lazily; never break the import
    from . import cpu_backend, cuda_backend  # noqa: F401
except Exception:  # pragma: no cover
    pass

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
