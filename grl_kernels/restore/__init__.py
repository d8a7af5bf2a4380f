"""Restoring images: :func:`restore` (tiled, within a memory budget), :func:`estimate_memory`,
image reading/writing and the ``grl-kernels restore`` command. See docs/restore.md."""
from .api import restore
from .memory import auto_tile, estimate_memory, free_memory, live_tensor_peak

__all__ = ["restore", "estimate_memory", "auto_tile", "free_memory", "live_tensor_peak"]
