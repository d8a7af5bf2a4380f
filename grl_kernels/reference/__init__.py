"""Pure-PyTorch reference path: the ground truth every backend is tested against."""
from .attention import stripe_attention_reference, window_attention_reference

__all__ = ["stripe_attention_reference", "window_attention_reference"]
