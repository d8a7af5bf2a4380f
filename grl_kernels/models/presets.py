"""Published GRL configurations (spec section 4) and the task fine-tune geometries."""
from __future__ import annotations

import copy
from typing import Dict

_COMMON = dict(
    window_size=8,
    stripe_size=[8, None],
    stripe_groups=[None, 4],
    stripe_shift=True,
    mlp_ratio=2,
    qkv_proj_type="linear",
    anchor_proj_type="avgpool",
    anchor_one_stage=True,
    anchor_window_down_factor=4,
    out_proj_type="linear",
    conv_type="1conv",
    img_size=64,
    in_channels=3,
)

_TINY = dict(embed_dim=64, depths=[4, 4, 4, 4], num_heads_window=[2] * 4, num_heads_stripe=[2] * 4, local_connection=False)
_SMALL = dict(embed_dim=128, depths=[4, 4, 4, 4], num_heads_window=[2] * 4, num_heads_stripe=[2] * 4, local_connection=False)
_BASE = dict(
    embed_dim=180, depths=[4, 4, 8, 8, 8, 4, 4], num_heads_window=[3] * 7, num_heads_stripe=[3] * 7, local_connection=True
)

PRESETS: Dict[str, dict] = {
    # the published checkpoints whose parameter lists are in shared/reference/*.keys.tsv
    "grl_tiny_sr_x4": {**_COMMON, **_TINY, "upscale": 4, "upsampler": "pixelshuffledirect"},
    "grl_small_sr_x4": {**_COMMON, **_SMALL, "upscale": 4, "upsampler": "pixelshuffle"},
    "grl_base_sr_x4": {**_COMMON, **_BASE, "upscale": 4, "upsampler": "pixelshuffle"},
    "grl_base_realsr_x4": {**_COMMON, **_BASE, "upscale": 4, "upsampler": "nearest+conv"},
    "grl_base_denoise_color": {**_COMMON, **_BASE, "upscale": 1, "upsampler": ""},
}
PRESETS["grl_t"] = PRESETS["grl_tiny_sr_x4"]
PRESETS["grl_s"] = PRESETS["grl_small_sr_x4"]
PRESETS["grl_b"] = PRESETS["grl_base_sr_x4"]

# Geometry overrides used by the task fine-tunes (combine with a preset).
TASK_GEOMETRIES: Dict[str, dict] = {
    "sr": dict(window_size=32, stripe_size=[64, 64], stripe_groups=[None, None]),
    "denoise": dict(window_size=16, stripe_size=[64, 128], stripe_groups=[None, None]),
    "denoise_f2": dict(window_size=32, stripe_size=[64, 128], stripe_groups=[None, None], anchor_window_down_factor=2),
    "jpeg": dict(window_size=36, stripe_size=[72, 144], stripe_groups=[None, None]),
    "deblur": dict(window_size=16, stripe_size=[48, 96], stripe_groups=[None, None]),
    "deblur_w12": dict(window_size=12, stripe_size=[48, 96], stripe_groups=[None, None]),
}


def preset_kwargs(name: str, task: str = None, **overrides) -> dict:
    """Constructor keywords of preset ``name``, with an optional task geometry and overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    kw = copy.deepcopy(PRESETS[name])
    if task is not None:
        if task not in TASK_GEOMETRIES:
            raise ValueError(f"unknown task geometry {task!r}; expected one of {sorted(TASK_GEOMETRIES)}")
        kw.update(copy.deepcopy(TASK_GEOMETRIES[task]))
    kw.update(overrides)
    return kw


def build_preset(name: str, task: str = None, **overrides):
    """A GRL model of preset ``name`` (see :data:`PRESETS`), e.g. ``build_preset("grl_b", task="denoise")``."""
    from .grl import GRL

    return GRL(**preset_kwargs(name, task, **overrides))
