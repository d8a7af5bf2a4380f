"""The "reference" backend: the pure-PyTorch path, any device, any floating dtype."""
import torch

from ..reference import stripe_attention_reference, window_attention_reference
from .registry import Backend, register_backend

register_backend(
    Backend(
        name="reference",
        stripe=stripe_attention_reference,
        window=window_attention_reference,
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        priority=0,
        description="pure PyTorch, materializes windows and attention maps (ground truth)",
    )
)
