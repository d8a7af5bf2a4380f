"""Building blocks of the GRL network around the attention (spec section 4).

Module and parameter names follow the published code so that its checkpoints load:
``attn.qkv.body``, ``attn.anchor.body.0.reduction``, ``attn.window_attn.attn_transform``,
``attn.stripe_attn.attn_transform1/2``, ``attn.proj``, ``norm1``, ``conv.cab.*``, ``mlp.fc1/fc2``, ``norm2``.
Token layout everywhere is (B, L, C) with L = H * W row-major.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import AnchoredStripeAttention, WindowAttention


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def blc_to_bchw(x: torch.Tensor, x_size) -> torch.Tensor:
    B, L, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *x_size)


def bchw_to_blc(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def blc_to_bhwc(x: torch.Tensor, x_size) -> torch.Tensor:
    B, L, C = x.shape
    return x.reshape(B, *x_size, C)


def bchw_to_bhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class DropPath(nn.Module):
    """Stochastic depth: drops whole samples' residual branches in training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        h = self.fc1(x)
        if not torch.is_grad_enabled() and isinstance(self.act, nn.GELU):
            h = torch.ops.aten.gelu_(h, approximate=self.act.approximate)  # inference: GELU in place
        else:
            h = self.act(h)
        return self.drop(self.fc2(self.drop(h)))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(conv(relu(conv(avgpool(x)))))."""

    def __init__(self, num_feat, squeeze_factor=16):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.attention(x)


class CAB(nn.Module):
    """Local convolution branch: conv3x3(C->C/4), GELU, conv3x3(C/4->C), channel attention."""

    def __init__(self, num_feat, compress_ratio=4, squeeze_factor=18):
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x, x_size):
        # (B, L, C) viewed as NCHW is channels-last: the convolutions run on it as it is and give
        # channels-last outputs, whose (B, L, C) view is contiguous again (no layout copies)
        x = blc_to_bchw(x, x_size)
        if torch.is_grad_enabled() or _compiling():
            return bchw_to_blc(self.cab(x))
        # inference: GELU and the channel-attention product in place (same values, two C x L
        # tensors fewer alive at once)
        conv1, gelu, conv2, ca = self.cab
        h = conv1(x)
        h = torch.ops.aten.gelu_(h, approximate=gelu.approximate) if isinstance(gelu, nn.GELU) else gelu(h)
        h = conv2(h)
        return bchw_to_blc(h.mul_(ca.attention(h)))


class SeparableConv(nn.Sequential):
    """Depthwise k x k conv (optionally GELU) then pointwise 1x1 conv, on (B, C, H, W)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, bias, act=False):
        m = [nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2, groups=in_channels, bias=bias)]
        if act:
            m.append(nn.GELU())
        m.append(nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=bias))
        super().__init__(*m)


class QKVProjection(nn.Module):
    """x (B, L, C) -> qkv (B, L, 3C) by a Linear or a separable conv on the image layout."""

    def __init__(self, dim, qkv_bias, proj_type, separable_conv_act=False):
        super().__init__()
        if proj_type not in ("linear", "separable_conv"):
            raise ValueError(f"qkv_proj_type must be 'linear' or 'separable_conv', got {proj_type!r}")
        self.proj_type = proj_type
        if proj_type == "linear":
            self.body = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.body = SeparableConv(dim, dim * 3, 3, 1, qkv_bias, separable_conv_act)

    def forward(self, x, x_size):
        if self.proj_type == "separable_conv":
            return bchw_to_blc(self.body(blc_to_bchw(x, x_size)))
        return self.body(x)


class PatchMerging(nn.Module):
    """The published anchor PatchMerging: 2x2 space-to-depth then Linear(4 C_in -> C_out, no bias).

    Unlike Swin's layer there is no LayerNorm: the only parameter is ``reduction.weight``.
    Input and output (B, H, W, C); H and W must be even.
    """

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x):
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"patchmerging anchors need an even height and width, got {tuple(x.shape[1:3])}")
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        return self.reduction(torch.cat([x0, x1, x2, x3], -1))


class AnchorLinear(nn.Module):
    """f x f average (or max) pooling then Linear: x (B, L, C) -> anchors (B, H/f, W/f, C_out)."""

    def __init__(self, in_channels, out_channels, down_factor, pooling_mode="avgpool", bias=True):
        super().__init__()
        self.down_factor = down_factor
        if pooling_mode == "maxpool":
            self.pooling = nn.MaxPool2d(down_factor, down_factor)
        elif pooling_mode == "avgpool":
            self.pooling = nn.AvgPool2d(down_factor, down_factor)
        else:
            raise ValueError(f"anchor pooling must be 'avgpool' or 'maxpool', got {pooling_mode!r}")
        self.reduction = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x, x_size):
        # pool the (B, H, W, C) view as channels-last NCHW: the same sums in the same order as
        # pooling blc_to_bchw(x) (bit-identical), without the strided copy that layout costs
        B, L, C = x.shape
        x = self.pooling(x.view(B, *x_size, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.reduction(x)


ANCHOR_PROJ_TYPES = ("avgpool", "maxpool", "conv2d", "separable_conv", "patchmerging")


def check_anchor_projection(proj_type, one_stage, down_factor) -> None:
    """Refuse the anchor configurations the published code cannot run (it crashes or gives
    anchors of the wrong size; see docs/fidelity.md), each with the value it needs."""
    if proj_type not in ANCHOR_PROJ_TYPES:
        raise ValueError(f"anchor_proj_type must be one of {ANCHOR_PROJ_TYPES}, got {proj_type!r}")
    if isinstance(down_factor, bool) or not isinstance(down_factor, int) or down_factor < 1:
        raise ValueError(f"anchor_window_down_factor must be a positive int, got {down_factor!r}")
    f = down_factor
    if one_stage:
        if proj_type == "patchmerging" and f != 2:
            raise ValueError(
                f"anchor_proj_type 'patchmerging' with anchor_one_stage=True is one 2x2 merge, so it needs "
                f"anchor_window_down_factor 2, got {f} (use anchor_one_stage=False for f = 4, 8, ...)"
            )
        if proj_type in ("conv2d", "separable_conv") and f % 2:
            raise ValueError(
                f"anchor_proj_type {proj_type!r} with anchor_one_stage=True needs an even anchor_window_down_factor "
                f"(its kernel f+1, stride f, padding (f+1)//2 gives H/f + 1 anchors for odd f), got {f}"
            )
    else:
        if "pool" in proj_type:
            raise ValueError(
                f"anchor_proj_type {proj_type!r} needs anchor_one_stage=True (the published code has no "
                f"multi-stage pooling), got anchor_one_stage={one_stage!r}"
            )
        if f < 2 or f & (f - 1):
            raise ValueError(
                f"anchor_one_stage=False needs a power-of-two anchor_window_down_factor >= 2 "
                f"(log2(f) stride-2 stages), got {f}"
            )


class AnchorProjection(nn.Module):
    """x (B, L, C) -> anchors (B, H/f, W/f, C/2), in one stage or in log2(f) stride-2 stages."""

    def __init__(self, dim, proj_type, one_stage, down_factor, separable_conv_act=False):
        super().__init__()
        check_anchor_projection(proj_type, one_stage, down_factor)
        self.proj_type = proj_type
        self.body = nn.ModuleList([])
        if one_stage:
            if proj_type == "patchmerging":
                m = PatchMerging(dim, dim // 2)
            elif proj_type == "conv2d":
                k = down_factor + 1
                m = nn.Conv2d(dim, dim // 2, k, down_factor, k // 2)
            elif proj_type == "separable_conv":
                m = SeparableConv(dim, dim // 2, down_factor + 1, down_factor, True, separable_conv_act)
            else:
                m = AnchorLinear(dim, dim // 2, down_factor, proj_type)
            self.body.append(m)
        else:
            for i in range(int(math.log2(down_factor))):
                cin = dim if i == 0 else dim // 2
                if proj_type == "patchmerging":
                    m = PatchMerging(cin, dim // 2)
                elif proj_type == "conv2d":
                    m = nn.Conv2d(cin, dim // 2, 3, 2, 1)
                else:
                    m = SeparableConv(cin, dim // 2, 3, 2, True, separable_conv_act)
                self.body.append(m)

    def forward(self, x, x_size):
        if "pool" in self.proj_type:
            for m in self.body:
                x = m(x, x_size)
            return x
        if "conv" in self.proj_type:
            x = blc_to_bchw(x, x_size)
            for m in self.body:
                x = m(x)
            return bchw_to_bhwc(x)
        x = blc_to_bhwc(x, x_size)
        for m in self.body:
            x = m(x)
        return x


class MixedAttention(nn.Module):
    """qkv projection split into [window | stripe] halves, anchors, both attentions, output projection."""

    def __init__(
        self, dim, input_resolution, num_heads_w, num_heads_s, window_size, window_shift, stripe_size,
        stripe_groups, stripe_shift, qkv_bias=True, qkv_proj_type="linear", anchor_proj_type="avgpool",
        anchor_one_stage=True, anchor_window_down_factor=1, attn_drop=0.0, proj_drop=0.0,
        pretrained_window_size=(0, 0), pretrained_stripe_size=(0, 0), separable_conv_act=False, backend=None,
    ):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embed_dim must be even (split into window and stripe halves), got {dim}")
        self.dim = dim
        self.qkv = QKVProjection(dim, qkv_bias, qkv_proj_type, separable_conv_act)
        self.anchor = AnchorProjection(dim, anchor_proj_type, anchor_one_stage, anchor_window_down_factor, separable_conv_act)
        self.window_attn = WindowAttention(
            input_resolution, window_size, num_heads_w, window_shift, attn_drop, pretrained_window_size, backend=backend
        )
        self.stripe_attn = AnchoredStripeAttention(
            input_resolution, stripe_size, stripe_groups, stripe_shift, num_heads_s, attn_drop,
            pretrained_stripe_size, anchor_window_down_factor, backend=backend,
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, x_size):
        x_window, x_stripe = self.branches(x, x_size)
        out = torch.cat([x_window, x_stripe], dim=-1)
        del x_window, x_stripe
        return self.project(out)

    def project(self, out):
        """The output projection of the concatenated [window | stripe] outputs (B, ..., C)."""
        return self.proj_drop(self.proj(out))

    def branches(self, x, x_size):
        """The two attention outputs, window (B, L, C/2) and stripe (B, L, C/2), before the projection."""
        C = x.shape[-1]
        anchor = self.anchor(x, x_size)
        if self.qkv.proj_type == "linear":
            # the [window | stripe] halves of the qkv Linear, one at a time: each half's output
            # columns are the same dot products as in the full product, and only 1.5 L*C of qkv
            # is alive at once instead of 3 L*C
            w, b = self.qkv.body.weight, self.qkv.body.bias
            half = C * 3 // 2
            qkv_window = F.linear(x, w[:half], None if b is None else b[:half])
            x_window = self.window_attn(qkv_window, x_size)
            del qkv_window
            qkv_stripe = F.linear(x, w[half:], None if b is None else b[half:])
        else:
            qkv = self.qkv(x, x_size)
            qkv_window, qkv_stripe = torch.split(qkv, C * 3 // 2, dim=-1)
            del qkv
            x_window = self.window_attn(qkv_window, x_size)
            del qkv_window
        x_stripe = self.stripe_attn(qkv_stripe, anchor, x_size)
        return x_window, x_stripe


class EfficientMixAttnTransformerBlock(nn.Module):
    """Post-norm block: x + norm1(attn(x)) [+ CAB(x)], then x + norm2(mlp(x))."""

    def __init__(
        self, dim, input_resolution, num_heads_w, num_heads_s, window_size=8, window_shift=False,
        stripe_size=(8, 8), stripe_groups=(None, None), stripe_shift=False, stripe_type="H", mlp_ratio=4.0,
        qkv_bias=True, qkv_proj_type="linear", anchor_proj_type="avgpool", anchor_one_stage=True,
        anchor_window_down_factor=1, drop=0.0, attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm,
        pretrained_window_size=(0, 0), pretrained_stripe_size=(0, 0), res_scale=1.0, local_connection=False,
        separable_conv_act=False, backend=None,
    ):
        super().__init__()
        self.stripe_type = stripe_type
        self.window_shift = window_shift
        self.stripe_shift = stripe_shift
        self.res_scale = res_scale
        self.local_connection = local_connection
        # vertical blocks use the reversed stripe configuration (spec section 1)
        own_size = list(stripe_size)[::-1] if stripe_type == "W" else list(stripe_size)
        own_groups = list(stripe_groups)[::-1] if stripe_type == "W" else list(stripe_groups)
        self.attn = MixedAttention(
            dim, input_resolution, num_heads_w, num_heads_s, window_size, window_shift, own_size, own_groups,
            stripe_shift, qkv_bias, qkv_proj_type, anchor_proj_type, anchor_one_stage, anchor_window_down_factor,
            attn_drop, drop, pretrained_window_size, pretrained_stripe_size, separable_conv_act, backend,
        )
        self.norm1 = norm_layer(dim)
        if local_connection:
            self.conv = CAB(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = norm_layer(dim)

    # inference: tokens per chunk of the per-token tail of the block (projection, norms, residuals,
    # MLP), sized so that a chunk's MLP hidden rows take about this many bytes (L2-sized)
    INFERENCE_CHUNK_BYTES = 1 << 20

    def forward(self, x, x_size, owns_input: bool = False):
        """``owns_input``: the caller no longer needs ``x``, which may then be overwritten.

        Without autograd (no_grad or inference_mode, eval mode) the block runs
        :meth:`_inference_forward`: same operands in the same order as the autograd path.
        """
        if torch.is_grad_enabled() or self.training:
            if self.local_connection:
                x = x + self.res_scale * self.drop_path(self.norm1(self.attn(x, x_size))) + self.conv(x, x_size)
            else:
                x = x + self.res_scale * self.drop_path(self.norm1(self.attn(x, x_size)))
            return x + self.res_scale * self.drop_path(self.norm2(self.mlp(x)))
        return self._inference_forward(x, x_size, owns_input)

    def chunk_rows(self, n: int, element_size: int) -> int:
        """Token rows per chunk of the per-token tail for n tokens of ``element_size`` bytes
        (at least 64, at most n); also used by ``grl_kernels.estimate_memory``."""
        hidden = self.mlp.fc1.out_features
        return min(n, max(64, self.INFERENCE_CHUNK_BYTES // (hidden * element_size)))

    def inference_chunk_rows(self, x) -> int:
        """Token rows per chunk of the per-token tail in :meth:`_inference_forward`."""
        n = x.numel() // x.shape[-1]
        if _compiling():
            return n  # one chunk: the compiler plans the buffers itself
        return self.chunk_rows(n, x.element_size())

    def _inference_forward(self, x, x_size, owns_input):
        """The attention branches on the whole image, then everything per token in row chunks:

            y = x + res_scale * norm1(proj([window | stripe])) [+ CAB(x)]
            y = y + res_scale * norm2(mlp(y))

        The residual sums are done in place, into x when the block owns it and else into a
        fresh tensor, with the operands of the autograd path in the same order (bit-identical
        when the linear layers give the same bits per row for any row count, as oneDNN / MKL
        do). Only chunk-sized temporaries are made after the branches: no L x C projection,
        norm or sum and no L x hidden MLP tensor (GRL-B at 256x256: live peak 270 -> 250 MiB).
        """
        x_window, x_stripe = self.attn.branches(x, x_size)
        c = self.conv(x, x_size) if self.local_connection else None  # needs the block input intact
        C = x.shape[-1]
        n = x.numel() // C
        owns = owns_input and x.is_contiguous()
        out = x if owns else None
        xf = x.reshape(-1, C)
        of = xf if owns else None
        # [window, stripe, CAB] rows, dropped as soon as the last chunk has used them (with one
        # chunk the peak is then the unchunked one: branches freed after the concatenation)
        parts = [x_window.reshape(n, -1), x_stripe.reshape(n, -1), None if c is None else c.reshape(n, C)]
        del x_window, x_stripe, c
        rows = self.inference_chunk_rows(x)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            last = r1 == n
            t = torch.cat([parts[0][r0:r1], parts[1][r0:r1]], dim=-1)
            if last:
                parts[0] = parts[1] = None
            a = self.norm1(self.attn.project(t))
            del t
            if self.res_scale != 1.0:
                a = a.mul_(self.res_scale)
            if owns:
                y = of[r0:r1].add_(a)
            elif r1 - r0 == n:  # one chunk (and under torch.compile): a + x into a
                y = of = a.add_(xf)
                out = y.view(x.shape)
            else:
                if out is None:  # the dtype of x + a (float32 under autocast's float32 norms)
                    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, a.dtype), device=x.device)
                    of = out.view(-1, C)
                y = torch.add(xf[r0:r1], a, out=of[r0:r1])  # x + a (the autograd path's operands)
            del a
            if parts[2] is not None:
                y.add_(parts[2][r0:r1])
                if last:
                    parts[2] = None
            m = self.norm2(self.mlp(y))
            if self.res_scale != 1.0:
                m = m.mul_(self.res_scale)
            y.add_(m)
            del m
        return out


CONV_TYPES = ("1conv", "3conv", "1conv1x1", "linear")


class LinearBCHW(nn.Linear):
    """nn.Linear applied over the channel dimension of a (B, C, H, W) tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build_last_conv(conv_type: str, dim: int) -> nn.Module:
    if conv_type == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if conv_type == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    if conv_type == "1conv1x1":
        return nn.Conv2d(dim, dim, 1, 1, 0)
    if conv_type == "linear":
        return LinearBCHW(dim, dim)
    raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")


class TransformerStage(nn.Module):
    """Blocks with the published schedule, then conv3x3 on the image layout, plus the stage input."""

    def __init__(
        self, dim, input_resolution, depth, num_heads_window, num_heads_stripe, window_size, stripe_size,
        stripe_groups, stripe_shift, mlp_ratio=4.0, qkv_bias=True, qkv_proj_type="linear",
        anchor_proj_type="avgpool", anchor_one_stage=True, anchor_window_down_factor=1, drop=0.0,
        attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm, pretrained_window_size=(0, 0),
        pretrained_stripe_size=(0, 0), conv_type="1conv", init_method="", local_connection=False,
        separable_conv_act=False, backend=None,
    ):
        super().__init__()
        self.init_method = init_method
        self.blocks = nn.ModuleList(
            [
                EfficientMixAttnTransformerBlock(
                    dim=dim,
                    input_resolution=input_resolution,
                    num_heads_w=num_heads_window,
                    num_heads_s=num_heads_stripe,
                    window_size=window_size,
                    window_shift=i % 2 == 0,
                    stripe_size=stripe_size,
                    stripe_groups=stripe_groups,
                    stripe_type="H" if i % 2 == 0 else "W",
                    stripe_shift=(i % 4 in (2, 3)) if stripe_shift else False,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qkv_proj_type=qkv_proj_type,
                    anchor_proj_type=anchor_proj_type,
                    anchor_one_stage=anchor_one_stage,
                    anchor_window_down_factor=anchor_window_down_factor,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                    norm_layer=norm_layer,
                    pretrained_window_size=pretrained_window_size,
                    pretrained_stripe_size=pretrained_stripe_size,
                    res_scale=0.1 if init_method == "r" else 1.0,
                    local_connection=local_connection,
                    separable_conv_act=separable_conv_act,
                    backend=backend,
                )
                for i in range(depth)
            ]
        )
        self.conv = build_last_conv(conv_type, dim)

    def forward(self, x, x_size):
        res = x
        for i, blk in enumerate(self.blocks):
            res = blk(res, x_size, owns_input=i > 0)  # the stage keeps x itself for its residual
        res = bchw_to_blc(self.conv(blc_to_bchw(res, x_size)))
        return res + x


class Upsample(nn.Module):
    """conv3x3 + PixelShuffle(2) per factor of 2 (or one x3 step), keys ``up.0``, ``up.2``, ..."""

    def __init__(self, scale, num_feat):
        super().__init__()
        m = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                m += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            m += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale must be a power of 2 or 3 for upsampler 'pixelshuffle', got {scale}")
        self.up = nn.Sequential(*m)

    def forward(self, x):
        return self.up(x)


class UpsampleOneStep(nn.Module):
    """One conv3x3 to scale^2 * out channels, then PixelShuffle(scale)."""

    def __init__(self, scale, num_feat, num_out_ch):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(num_feat, scale ** 2 * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x):
        return self.up(x)
