"""The GRL configuration of a checkpoint: what its parameter shapes determine, on top of a preset
or a JSON of constructor keywords.

The weights determine: in/out channels, embed_dim, depths, heads per stage, mlp_ratio, qkv bias
and projection type, local connection (CAB), conv_type, the upsampler and upscale, and the anchor
projection type (pooling vs conv vs separable conv vs patch merging, one or several stages, and the
down factor of a one-stage conv). Window and stripe sizes, stripe groups, the pooling kind and the
pooling down factor are not in the weights: they come from the preset/task/config, and a checkpoint
that still does not fit gets the loader's report.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Mapping, Optional

import torch

from ..models import GRL, load_checkpoint, preset_kwargs
from ..models.checkpoint import extract_state_dict

PRESET_ALIASES = {"GRL-T": "grl_t", "GRL-S": "grl_s", "GRL-B": "grl_b"}


def infer_kwargs(sd: Mapping[str, torch.Tensor]) -> Dict:
    """GRL constructor keywords read from the parameter names and shapes of a state_dict."""
    kw: Dict = {}
    if "conv_first.weight" not in sd:
        return kw
    cf = sd["conv_first.weight"]
    C = int(cf.shape[0])
    kw["embed_dim"], kw["in_channels"] = C, int(cf.shape[1])
    blocks: Dict[int, set] = {}
    for k in sd:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if blocks:
        stages = sorted(blocks)
        kw["depths"] = [max(blocks[i]) + 1 for i in stages]
        heads_w, heads_s = [], []
        for i in stages:
            p = f"layers.{i}.blocks.0.attn."
            tw = sd.get(p + "window_attn.attn_transform.logit_scale")
            ts = sd.get(p + "stripe_attn.attn_transform1.logit_scale")
            if tw is not None:
                heads_w.append(int(tw.shape[0]))
            if ts is not None:
                heads_s.append(int(ts.shape[0]))
        if len(heads_w) == len(stages):
            kw["num_heads_window"] = heads_w
        if len(heads_s) == len(stages):
            kw["num_heads_stripe"] = heads_s
        p = "layers.0.blocks.0."
        if p + "mlp.fc1.weight" in sd:
            kw["mlp_ratio"] = sd[p + "mlp.fc1.weight"].shape[0] / C
        kw["local_connection"] = any(k.startswith(p + "conv.cab.") for k in sd)
        if p + "attn.qkv.body.weight" in sd:
            kw["qkv_proj_type"] = "linear"
            kw["qkv_bias"] = p + "attn.qkv.body.bias" in sd
        elif p + "attn.qkv.body.0.weight" in sd:
            kw["qkv_proj_type"] = "separable_conv"
            kw["qkv_bias"] = p + "attn.qkv.body.0.bias" in sd
            kw["separable_conv_act"] = False  # GELU has no weights; the published models use none
        kw.update(_anchor_kwargs(sd, p + "attn.anchor.body."))
    kw.update(_conv_type(sd))
    kw.update(_upsampler(sd, C))
    return kw


def _anchor_kwargs(sd, p) -> Dict:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(p) + r"(\d+)\.", k)] if m}
    if not idx:
        return {}
    n = max(idx) + 1
    if p + "0.reduction.weight" in sd and p + "0.norm.weight" in sd:
        return {"anchor_proj_type": "patchmerging", "anchor_one_stage": n == 1,
                "anchor_window_down_factor": 2 ** n}
    if p + "0.reduction.weight" in sd:  # avg/max pooling + linear: the kind and factor are not in the weights
        return {}
    if p + "0.0.weight" in sd:  # separable conv: depthwise kernel f+1 (one stage) or 3 (stride-2 stages)
        k = int(sd[p + "0.0.weight"].shape[-1])
        if n == 1:
            return {"anchor_proj_type": "separable_conv", "anchor_one_stage": True, "anchor_window_down_factor": k - 1}
        return {"anchor_proj_type": "separable_conv", "anchor_one_stage": False, "anchor_window_down_factor": 2 ** n}
    if p + "0.weight" in sd:
        k = int(sd[p + "0.weight"].shape[-1])
        if n == 1:
            return {"anchor_proj_type": "conv2d", "anchor_one_stage": True, "anchor_window_down_factor": k - 1}
        return {"anchor_proj_type": "conv2d", "anchor_one_stage": False, "anchor_window_down_factor": 2 ** n}
    return {}


def _conv_type(sd) -> Dict:
    w = sd.get("conv_after_body.weight")
    if w is not None:
        if w.dim() == 2:
            return {"conv_type": "linear"}
        return {"conv_type": "1conv" if w.shape[-1] == 3 else "1conv1x1"}
    if "conv_after_body.0.weight" in sd:
        return {"conv_type": "3conv"}
    return {}


def _upsampler(sd, C) -> Dict:
    if "conv_up1.weight" in sd:
        return {"upsampler": "nearest+conv", "upscale": 4, "out_channels": int(sd["conv_last.weight"].shape[0])}
    if "conv_before_upsample.0.weight" in sd:
        ups = sorted(int(m.group(1)) for k in sd for m in [re.match(r"upsample\.up\.(\d+)\.weight", k)] if m)
        if ups and len(ups) == 1 and sd[f"upsample.up.{ups[0]}.weight"].shape[0] == 9 * sd[f"upsample.up.{ups[0]}.weight"].shape[1]:
            scale = 3
        else:
            scale = 2 ** len(ups)
        return {"upsampler": "pixelshuffle", "upscale": scale, "out_channels": int(sd["conv_last.weight"].shape[0])}
    if "upsample.up.0.weight" in sd:
        n = int(sd["upsample.up.0.weight"].shape[0])
        cin = int(sd["conv_first.weight"].shape[1])
        for cout in (cin, 3, 1):
            s = math.isqrt(n // cout) if n % cout == 0 else 0
            if s * s * cout == n:
                return {"upsampler": "pixelshuffledirect", "upscale": s, "out_channels": cout}
        return {"upsampler": "pixelshuffledirect"}
    if "conv_last.weight" in sd:
        return {"upsampler": "", "upscale": 1, "out_channels": int(sd["conv_last.weight"].shape[0])}
    return {}


def read_config(path: str) -> Dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a JSON object of GRL constructor keywords")
    return cfg


def model_from_checkpoint(checkpoint: str, preset: Optional[str] = None, task: Optional[str] = None,
                          config: Optional[str] = None, backend: Optional[str] = None):
    """(model, load report, keywords): preset/task, then the JSON config, then what the weights determine.

    Without a preset the geometry defaults to the published presets' (window 8, stripes 8 x None
    with 4 groups, anchor factor 4). Raises ValueError with a message naming the file that failed.
    """
    try:
        sd, _, _ = extract_state_dict(checkpoint)
    except FileNotFoundError:
        raise ValueError(f"{checkpoint}: checkpoint file not found") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load on a corrupt file raises many things
        raise ValueError(f"{checkpoint}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    name = PRESET_ALIASES.get(preset, preset) if preset else "grl_t"
    kw = preset_kwargs(name, task)  # ValueError for an unknown preset / task
    if config:
        kw.update(read_config(config))
    kw.update(infer_kwargs(sd))
    if backend is not None:
        kw["backend"] = backend
    try:
        model = GRL(**kw)
    except (TypeError, ValueError) as exc:
        src = config or f"preset {name}"
        raise ValueError(f"{src}: invalid GRL configuration ({exc})") from None
    try:
        report = load_checkpoint(model, sd, strict=True)
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    return model.eval(), report, kw
