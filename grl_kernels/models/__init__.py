"""The reference GRL model, its presets and the checkpoint loader."""
from .checkpoint import LoadReport, extract_state_dict, load_checkpoint
from .grl import GRL
from .presets import PRESETS, TASK_GEOMETRIES, build_preset, preset_kwargs

__all__ = ["GRL", "LoadReport", "load_checkpoint", "extract_state_dict", "PRESETS", "TASK_GEOMETRIES", "build_preset", "preset_kwargs"]
