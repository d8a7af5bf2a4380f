"""grl_kernels: fused kernels for the attention of GRL (CVPR 2023).

Public names: :class:`AnchoredStripeAttention`, :class:`WindowAttention`,
the functional API (:func:`anchored_stripe_attention`, :func:`grl_window_attention`),
and the backend controls :func:`available_backends`, :func:`use_backend`,
:func:`set_default_backend`.
"""
from .backends import (
    BackendUnavailableError,
    FallbackWarning,
    available_backends,
    backend_info,
    get_default_backend,
    set_default_backend,
    use_backend,
)
from .functional import anchored_stripe_attention, grl_window_attention, stripe_attention, window_attention
from .geometry import StripeGeometry, WindowGeometry, stripe_geometry, window_geometry
from .modules import AnchoredStripeAttention, WindowAttention
from .patching import PatchReport, patch, unpatch
from .optimize import optimize
from .restore import estimate_memory, restore

__version__ = "0.1.0"

__all__ = [
    "AnchoredStripeAttention",
    "WindowAttention",
    "BackendUnavailableError",
    "FallbackWarning",
    "anchored_stripe_attention",
    "grl_window_attention",
    "stripe_attention",
    "window_attention",
    "available_backends",
    "backend_info",
    "get_default_backend",
    "set_default_backend",
    "use_backend",
    "StripeGeometry",
    "WindowGeometry",
    "stripe_geometry",
    "window_geometry",
    "patch",
    "unpatch",
    "PatchReport",
    "optimize",
    "restore",
    "estimate_memory",
]
