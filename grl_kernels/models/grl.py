"""The GRL network (spec section 4), with a selectable attention backend.

Same constructor keywords, module names and parameter shapes as the published
code, so published checkpoints load (see :mod:`grl_kernels.models.checkpoint`).
Unlike the published code, every block computes its geometry from its own
stripe configuration and the actual size, so any input size works (spec section 6);
on square inputs this gives exactly the published numbers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.registry import _check_name
from ..heap import heap_cache
from ..modules import AnchoredStripeAttention, WindowAttention
from .layers import (
    CONV_TYPES,
    _compiling,
    check_anchor_projection,
    TransformerStage,
    Upsample,
    UpsampleOneStep,
    bchw_to_blc,
    blc_to_bchw,
    build_last_conv,
)

UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
INIT_METHODS = ("", "n", "r", "w", "x", "t", "fan_in")


def _to_2tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


class GRL(nn.Module):
    """GRL image restoration network.

    Extra keyword beyond the published ones: ``backend`` (attention backend name for
    every block, default: the package default). Unknown keywords raise TypeError,
    except the published training-only ones (``fairscale_checkpoint``,
    ``offload_to_cpu``) which are accepted and ignored.
    """

    def __init__(
        self,
        img_size=64,
        in_channels=3,
        out_channels=None,
        embed_dim=96,
        upscale=2,
        img_range=1.0,
        upsampler="",
        depths=(6, 6, 6, 6, 6, 6),
        num_heads_window=(3, 3, 3, 3, 3, 3),
        num_heads_stripe=(3, 3, 3, 3, 3, 3),
        window_size=8,
        stripe_size=(8, 8),
        stripe_groups=(None, None),
        stripe_shift=False,
        mlp_ratio=4.0,
        qkv_bias=True,
        qkv_proj_type="linear",
        anchor_proj_type="avgpool",
        anchor_one_stage=True,
        anchor_window_down_factor=1,
        out_proj_type="linear",
        local_connection=False,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_layer=nn.LayerNorm,
        pretrained_window_size=(0, 0),
        pretrained_stripe_size=(0, 0),
        conv_type="1conv",
        init_method="n",
        fairscale_checkpoint=False,
        offload_to_cpu=False,
        euclidean_dist=False,
        separable_conv_act=False,
        backend: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"GRL got unexpected keyword arguments {sorted(kwargs)}")
        if backend is not None:
            _check_name(backend)
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if conv_type not in CONV_TYPES:
            raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")
        if out_proj_type != "linear":
            raise ValueError(f"out_proj_type must be 'linear' (the only published option), got {out_proj_type!r}")
        if euclidean_dist:
            raise ValueError("euclidean_dist=True (an ablation of the paper) is not supported; GRL uses cosine attention")
        if init_method not in INIT_METHODS:
            raise ValueError(f"init_method must be one of {INIT_METHODS}, got {init_method!r}")
        n = len(depths)
        for name, v in (("num_heads_window", num_heads_window), ("num_heads_stripe", num_heads_stripe)):
            if len(v) != n:
                raise ValueError(f"{name} must have one entry per stage ({n} = len(depths)), got {list(v)}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be an even int >= 2 (split into window and stripe halves), got {embed_dim!r}")
        for name, v in (("num_heads_window", num_heads_window), ("num_heads_stripe", num_heads_stripe)):
            for i, h in enumerate(v):
                if isinstance(h, bool) or not isinstance(h, int) or h < 1 or (embed_dim // 2) % h:
                    raise ValueError(
                        f"{name}[{i}] = {h!r} must be a positive int dividing embed_dim / 2 = {embed_dim // 2} "
                        f"(the channels of each attention branch)"
                    )
        check_anchor_projection(anchor_proj_type, anchor_one_stage, anchor_window_down_factor)
        if upsampler == "nearest+conv" and upscale != 4:
            raise ValueError(f"upsampler 'nearest+conv' supports upscale 4 only, got {upscale}")
        stripe_size = [None if s is None else int(s) for s in stripe_size]
        stripe_groups = [None if g is None else int(g) for g in stripe_groups]

        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        # inference calls keep freed blocks in the C heap (grl_kernels.heap); False turns it off
        self.heap_cache = True
        # True (set by grl_kernels.optimize): an input of another floating dtype than the weights
        # is converted to theirs and the output back to the input's; False: a TypeError
        self.cast_inputs = False
        # inference calls run the "pixelshuffle" / "nearest+conv" upsampler in row bands of this
        # many bytes of its finest features (see _tail); 0 turns banding off
        self.tail_band_bytes = 32 * 2 ** 20
        num_out_feats = 64
        self.embed_dim = embed_dim
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        if in_channels == 3:
            mean = torch.tensor((0.4488, 0.4371, 0.4040)).view(1, 3, 1, 1)
        else:
            mean = torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)

        max_stripe_size = max(0 if s is None else s for s in stripe_size)
        max_stripe_groups = max(0 if g is None else g for g in stripe_groups) * anchor_window_down_factor
        self.pad_size = max(window_size, max_stripe_size, max_stripe_groups)
        self.input_resolution = _to_2tuple(img_size)
        self.window_size = window_size
        self.stripe_size = stripe_size
        self.stripe_groups = stripe_groups
        self.anchor_window_down_factor = anchor_window_down_factor

        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, 1, 1)
        self.norm_start = norm_layer(embed_dim)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i in range(n):
            self.layers.append(
                TransformerStage(
                    dim=embed_dim,
                    input_resolution=self.input_resolution,
                    depth=depths[i],
                    num_heads_window=num_heads_window[i],
                    num_heads_stripe=num_heads_stripe[i],
                    window_size=window_size,
                    stripe_size=stripe_size,
                    stripe_groups=stripe_groups,
                    stripe_shift=stripe_shift,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qkv_proj_type=qkv_proj_type,
                    anchor_proj_type=anchor_proj_type,
                    anchor_one_stage=anchor_one_stage,
                    anchor_window_down_factor=anchor_window_down_factor,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    pretrained_window_size=pretrained_window_size,
                    pretrained_stripe_size=pretrained_stripe_size,
                    conv_type=conv_type,
                    init_method=init_method,
                    local_connection=local_connection,
                    separable_conv_act=separable_conv_act,
                    backend=backend,
                )
            )
        self.norm_end = norm_layer(embed_dim)
        self.conv_after_body = build_last_conv(conv_type, embed_dim)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_out_feats, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_out_feats)
            self.conv_last = nn.Conv2d(num_out_feats, out_channels, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, out_channels)
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_out_feats, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_out_feats, num_out_feats, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_out_feats, out_channels, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_channels, 3, 1, 1)

        self._init_method = init_method
        self.apply(self._init_weights)
        self.channels_last_convs()

    def channels_last_convs(self) -> "GRL":
        """Store every Conv2d weight channels-last (values unchanged; returns the model).

        The (B, L, C) token tensors viewed as (B, C, H, W) are channels-last. PyTorch's CPU
        convolution keeps that layout only when the weight is channels-last too; with a
        contiguous weight it copies the input to NCHW and the output back (measured at
        256x256, 64 channels: 17.9 ms of copies around a 6.5 ms bfloat16 convolution, which
        runs in 2.8 ms on channels-last weights). ``load_state_dict`` keeps the layout;
        ``load_state_dict(assign=True)`` does not, so :func:`grl_kernels.optimize` calls this again.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_contiguous(memory_format=torch.channels_last):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)  # same Parameter
        return self

    # ------------------------------------------------------------------
    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            if self._init_method == "w":
                nn.init.kaiming_normal_(m.weight)
            elif self._init_method == "x":
                nn.init.xavier_normal_(m.weight)
            else:
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def attention_modules(self):
        """Every AnchoredStripeAttention / WindowAttention inside the model."""
        return [m for m in self.modules() if isinstance(m, (AnchoredStripeAttention, WindowAttention))]

    def set_backend(self, backend: Optional[str]) -> "GRL":
        """Select the attention backend of every block (None: the package default)."""
        if backend is not None:
            _check_name(backend)
        for m in self.attention_modules():
            m.backend = backend
        return self

    def check_image_size(self, x: torch.Tensor) -> torch.Tensor:
        """Pad height and width up to a multiple of ``pad_size`` as the published code does:
        reflect, or zeros when the image is too small to reflect (pad >= size)."""
        _, _, h, w = x.size()
        ph = (self.pad_size - h % self.pad_size) % self.pad_size
        pw = (self.pad_size - w % self.pad_size) % self.pad_size
        if not (ph or pw):
            return x
        mode = "constant" if ph >= h or pw >= w else "reflect"
        return F.pad(x, (0, pw, 0, ph), mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        x = self.pos_drop(self.norm_start(bchw_to_blc(x)))
        for layer in self.layers:
            x = layer(x, x_size)
        return blc_to_bchw(self.norm_end(x), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"input must be a (B, C, H, W) tensor, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating tensor (the model's parameters are {self.conv_first.weight.dtype}), got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"input must have batch size B >= 1 and height and width >= 1, got shape {tuple(x.shape)}; "
                "empty batches and zero-size images are refused"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model expects in_channels = {self.in_channels}")
        wdtype = self.conv_first.weight.dtype
        if x.dtype != wdtype and not torch.is_autocast_enabled(x.device.type):
            if not self.cast_inputs:
                raise TypeError(
                    f"input is {x.dtype} but the model's parameters are {wdtype}: pass x.to({wdtype}), run under "
                    "torch.autocast, or set model.cast_inputs = True (grl_kernels.optimize does)")
            return self.forward(x.to(wdtype)).to(x.dtype)
        if self._use_heap_cache(x):
            with heap_cache():  # reuse freed blocks without page faults (grl_kernels.heap)
                return self._forward(x)
        return self._forward(x)

    # below this size of one (B, L, C) activation the allocations stay under glibc's mmap
    # threshold anyway, and the trim on leaving the cache costs more than it saves
    HEAP_CACHE_MIN_BYTES = 4 * 2 ** 20

    def _use_heap_cache(self, x: torch.Tensor) -> bool:
        if not self.heap_cache or torch.is_grad_enabled() or _compiling():
            return False
        feat = x.shape[0] * x.shape[2] * x.shape[3] * self.embed_dim * x.element_size()
        return feat >= self.HEAP_CACHE_MIN_BYTES

    def _upsampler_body(self, x: torch.Tensor) -> torch.Tensor:
        """The upsampling convolutions: features (B, C, H, W) -> (B, out, sH, sW) before the mean."""
        if self.upsampler == "pixelshuffle":
            return self.conv_last(self.upsample(self.conv_before_upsample(x)))
        x = self.conv_before_upsample(x)
        x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(x)))

    def tail_bands(self, B: int, H: int, W: int, element_size: int):
        """(band rows, halo rows) of the banded upsampler on (B, C, H, W) features, or None if unbanded."""
        if self.upsampler not in ("pixelshuffle", "nearest+conv") or not self.tail_band_bytes:
            return None
        s = self.upscale
        per_row = B * 64 * s * s * W * element_size  # bytes of one input row's finest features
        if per_row * H <= 2 * self.tail_band_bytes:
            return None
        radius = 2 + int(math.log2(s)) if self.upsampler == "pixelshuffle" else 5  # 3x3 convs in the chain
        return max(radius, self.tail_band_bytes // per_row), radius

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """The upsampler of "pixelshuffle" / "nearest+conv", in row bands when that saves memory.

        Its 64-channel features at 2x and 4x resolution are the largest tensors of the whole
        model (GRL-S at 256x256: 256 MiB each, most of the published model's peak). Without
        autograd the rows are done in bands of ``tail_band_bytes`` of such features: each band
        takes ``radius`` extra input rows on both sides, enough for every 3x3 convolution of
        the chain (one row per convolution at the input's resolution or finer), and keeps its
        own rows of the output, so every output pixel sees the same inputs as unbanded.
        """
        B, _, H, W = x.shape
        s = self.upscale
        plan = None if torch.is_grad_enabled() else self.tail_bands(B, H, W, x.element_size())
        if plan is None:
            return self._upsampler_body(x)
        band, radius = plan
        out = None
        for y0 in range(0, H, band):
            y1 = min(H, y0 + band)
            a, b = max(0, y0 - radius), min(H, y1 + radius)
            part = self._upsampler_body(x[:, :, a:b])
            if out is None:
                out = part.new_empty(B, part.shape[1], H * s, W * s)
            out[:, :, y0 * s: y1 * s] = part[:, :, (y0 - a) * s: (y1 - a) * s]
            del part
        return out

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """conv_after_body(forward_features(conv_first(x))) + conv_first(x), on the normalized input.

        Without autograd (and not under torch.compile, which plans its own buffers) conv_first's
        output is not kept alive through the whole body for the long residual: it is computed
        again at the end from the few-channel input (the same convolution of the same input, so
        the same bits; one L x C tensor fewer alive in every block, GRL-B at 256x256: 45 MiB)."""
        if torch.is_grad_enabled() or _compiling():
            x_first = self.conv_first(x)
            return self.conv_after_body(self.forward_features(x_first)) + x_first
        res = self.conv_after_body(self.forward_features(self.conv_first(x)))
        return res.add_(self.conv_first(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        x = self.check_image_size(x)
        mean = self.mean.type_as(x)
        x = (x - mean) * self.img_range
        if self.upsampler in ("pixelshuffle", "nearest+conv"):
            x = self._tail(self._body(x))
        elif self.upsampler == "pixelshuffledirect":
            x = self.upsample(self._body(x))
        else:
            res = self._body(x)
            if self.in_channels == self.out_channels:
                x = x + self.conv_last(res)
            else:
                x = self.conv_last(res)
        # the published code adds the 3-channel mean back even when out_channels differs
        # (broadcasting a 1-channel output to 3); add it back only when the channels match
        x = x / self.img_range + (mean if self.out_channels == self.in_channels else 0.0)
        scale = self.upscale if self.upsampler else 1
        # the last convolution's output is channels-last (channels_last_convs): return it NCHW-
        # contiguous (also when padded, where a view would keep the padded buffer alive)
        return x[:, :, : H * scale, : W * scale].contiguous()
