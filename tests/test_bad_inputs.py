"""A zoo of bad inputs across the public surface: functional API, modules, model constructor and
forward, checkpoint loader, command line. Each case asserts the exception type and that the
message names the argument and the value that was expected (all given as substrings)."""
from __future__ import annotations

import math

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import BackendUnavailableError
from grl_kernels.cli import main as cli_main
from grl_kernels.functional import stripe_attention, window_attention
from grl_kernels.geometry import stripe_geometry, window_geometry
from grl_kernels.models import GRL, load_checkpoint

LN10 = math.log(10.0)
X = (8, 8)  # image size of the functional cases
SS, SG, F = [4, 4], [None, None], 2  # stripes 4 x 4, anchors 2 x 2
R_S = stripe_geometry(X, SS, SG, True, F).table_rows  # (4 + 2 - 1)^2 = 25 bias-table rows
R_W = window_geometry(X, 4, True).table_rows


def _qkv(B=1, C=8, L=64, dtype=torch.float32):
    return torch.randn(B, L, 3 * C, dtype=dtype)


def _anchor(B=1, C=8, h=4, w=4, dtype=torch.float32):
    return torch.randn(B, h, w, C, dtype=dtype)


def _asa(**kw):
    """anchored_stripe_attention with good defaults, any argument overridden."""
    a = dict(qkv=_qkv(), anchor=_anchor(), x_size=X, stripe_size=SS, stripe_groups=SG, stripe_shift=True,
             num_heads=2, logit_scale1=torch.full((2,), LN10), bias_table1=torch.rand(R_S, 2),
             logit_scale2=torch.full((2,), LN10), bias_table2=torch.rand(R_S, 2), anchor_window_down_factor=F,
             backend="reference")
    a.update(kw)
    return G.anchored_stripe_attention(**a)


def _gwa(**kw):
    a = dict(qkv=_qkv(), x_size=X, window_size=4, window_shift=True, num_heads=2,
             logit_scale=torch.full((2,), LN10), bias_table=torch.rand(R_W, 2), backend="reference")
    a.update(kw)
    return G.grl_window_attention(**a)


def _sa(geom=None, **kw):
    geom = stripe_geometry(X, SS, SG, True, F) if geom is None else geom
    a = dict(qkv=_qkv(), anchor=_anchor(), geom=geom, num_heads=2, scale1=torch.full((2,), 10.0),
             bias1=torch.rand(R_S, 2), scale2=torch.full((2,), 10.0), bias2=torch.rand(R_S, 2), backend="reference")
    a.update(kw)
    return stripe_attention(**a)


def _wa(geom=None, **kw):
    geom = window_geometry(X, 4, True) if geom is None else geom
    a = dict(qkv=_qkv(), geom=geom, num_heads=2, scale=torch.full((2,), 10.0), bias=torch.rand(R_W, 2),
             backend="reference")
    a.update(kw)
    return window_attention(**a)


SMALL = dict(img_size=16, embed_dim=16, depths=[2], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
             stripe_size=[8, 8], stripe_groups=[None, None], mlp_ratio=2, anchor_window_down_factor=2,
             upscale=1, upsampler="")


def _grl(**kw):
    return GRL(**{**SMALL, **kw})


def _forward(x, **kw):
    return _grl(**kw).eval()(x)


def _stripe_module(**kw):
    a = dict(input_resolution=X, stripe_size=SS, stripe_groups=SG, stripe_shift=True, num_heads=2,
             anchor_window_down_factor=F)
    a.update(kw)
    return G.AnchoredStripeAttention(**a)


def _load(sd_edit=None, source=None, **kw):
    model = _grl()
    if source is None:
        sd = dict(model.state_dict())
        if sd_edit:
            sd_edit(sd)
        source = sd
    return load_checkpoint(model, source, **kw)


def _drop(key):
    return lambda sd: sd.pop(key)


def _add(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(1))


def _reshape(key):
    return lambda sd: sd.__setitem__(key, torch.zeros(3, 3))


CASES = [
    # ---- functional: anchored_stripe_attention / grl_window_attention
    ("asa-qkv-not-tensor", lambda: _asa(qkv=[1.0]), TypeError, ["qkv", "torch.Tensor"]),
    ("asa-qkv-2d", lambda: _asa(qkv=torch.randn(64, 24)), ValueError, ["qkv", "3 dimensions", "(B, H*W, 3*C)"]),
    ("asa-qkv-int", lambda: _asa(qkv=_qkv().int()), TypeError, ["qkv", "floating"]),
    ("asa-tokens-vs-x_size", lambda: _asa(x_size=(8, 16)), ValueError, ["qkv has 64 tokens", "x_size", "H*W = 128"]),
    ("asa-qkv-not-3C", lambda: _asa(qkv=_qkv()[..., :23]), ValueError, ["qkv last dimension", "3*C", "23"]),
    ("asa-C-vs-heads", lambda: _asa(num_heads=3, logit_scale1=torch.zeros(3), logit_scale2=torch.zeros(3),
                                    bias_table1=torch.rand(R_S, 3), bias_table2=torch.rand(R_S, 3)),
     ValueError, ["C = 8", "num_heads = 3"]),
    ("asa-anchor-shape", lambda: _asa(anchor=_anchor(h=2, w=2)), ValueError, ["anchor", "(1, 4, 4, 8)", "(1, 2, 2, 8)"]),
    ("asa-anchor-dtype", lambda: _asa(anchor=_anchor(dtype=torch.float64)), TypeError, ["anchor", "float64", "qkv"]),
    ("asa-anchor-device", lambda: _asa(anchor=_anchor().to("meta")), ValueError, ["anchor is on meta", "qkv is on cpu"]),
    ("asa-x_size-int", lambda: _asa(x_size=8), TypeError, ["x_size", "pair (H, W)"]),
    ("asa-x_size-float", lambda: _asa(x_size=(8.0, 8)), TypeError, ["x_size", "positive ints"]),
    ("asa-num_heads-zero", lambda: _asa(num_heads=0), TypeError, ["num_heads", "positive int", "0"]),
    ("asa-stripe_size-str", lambda: _asa(stripe_size="4"), TypeError, ["stripe_size", "pair"]),
    ("asa-stripe_size-zero", lambda: _asa(stripe_size=[0, 4]), ValueError, ["stripe_size", "positive ints or None", "[0, 4]"]),
    ("asa-stripe-none-none", lambda: _asa(stripe_size=[None, 4], stripe_groups=[None, None]), ValueError,
     ["stripe_size", "stripe_groups", "a size or a group count"]),
    ("asa-size-vs-stripe", lambda: _asa(qkv=_qkv(L=80), x_size=(10, 8)), ValueError,
     ["x_size height 10", "divisible by the stripe height 4"]),
    ("asa-stripe-vs-f", lambda: _asa(anchor_window_down_factor=3), ValueError,
     ["divisible by anchor_window_down_factor 3"]),
    ("asa-f-zero", lambda: _asa(anchor_window_down_factor=0), ValueError, ["anchor_window_down_factor", "positive int", "0"]),
    ("asa-logit_scale-shape", lambda: _asa(logit_scale1=torch.zeros(3)), ValueError,
     ["logit_scale1", "(2,) or (2, 1, 1)", "(3,)"]),
    ("asa-logit_scale-type", lambda: _asa(logit_scale2=2.3), TypeError, ["logit_scale2", "torch.Tensor", "float"]),
    ("asa-bias_table-rows", lambda: _asa(bias_table1=torch.rand(7, 2)), ValueError,
     ["bias_table1", f"({R_S}, 2)", "(7, 2)"]),
    ("asa-backend-unknown", lambda: _asa(backend="fast"), ValueError, ["unknown backend 'fast'", "'auto'", "reference"]),
    ("asa-backend-type", lambda: _asa(backend=1), TypeError, ["backend", "str"]),
    ("asa-backend-cuda-on-cpu", lambda: _asa(backend="cuda"), (BackendUnavailableError, ValueError), ["cuda"]),
    ("gwa-window-vs-size", lambda: _gwa(qkv=_qkv(L=48), x_size=(6, 8)), ValueError,
     ["x_size height 6", "divisible by window_size 4"]),
    ("gwa-logit_scale-shape", lambda: _gwa(logit_scale=torch.zeros(2, 2)), ValueError,
     ["logit_scale", "(2,) or (2, 1, 1)", "(2, 2)"]),
    ("gwa-bias_table-rows", lambda: _gwa(bias_table=torch.rand(R_W + 1, 2)), ValueError,
     ["bias_table", f"({R_W}, 2)", "window_size 4"]),
    ("gwa-window_size-zero", lambda: _gwa(window_size=0), ValueError, ["window_size", "0"]),
    ("gwa-empty-batch", lambda: _gwa(qkv=_qkv(B=0)), ValueError, ["qkv has batch size 0", "B >= 1"]),
    # ---- functional: low-level stripe_attention / window_attention
    ("sa-geom-type", lambda: _sa(geom=(8, 8)), TypeError, ["geom", "StripeGeometry", "stripe_geometry"]),
    ("wa-geom-type", lambda: _wa(geom=stripe_geometry(X, SS, SG, True, F)), TypeError,
     ["geom", "WindowGeometry", "window_geometry"]),
    ("sa-scale-shape", lambda: _sa(scale1=torch.ones(2, 1, 1)), ValueError, ["scale1", "(2,)", "(2, 1, 1)"]),
    ("wa-bias-shape", lambda: _wa(bias=torch.rand(3, 2)), ValueError, ["bias", f"({R_W}, 2)", "(3, 2)"]),
    ("sa-bias-device", lambda: _sa(bias2=torch.rand(R_S, 2, device="meta")), ValueError, ["bias2", "meta", "qkv"]),
    # ---- modules
    ("module-attn_drop-range", lambda: _stripe_module(attn_drop=1.5), ValueError, ["attn_drop", "[0, 1)", "1.5"]),
    ("module-num_heads-str", lambda: _stripe_module(num_heads="2"), TypeError, ["num_heads", "positive int", "'2'"]),
    ("module-f-str", lambda: _stripe_module(anchor_window_down_factor="2"), ValueError,
     ["anchor_window_down_factor", "positive int", "'2'"]),
    ("module-window-non-square", lambda: G.WindowAttention(X, (4, 8), 2), ValueError,
     ["window_size", "square pair", "(4, 8)"]),
    ("module-backend-type", lambda: _stripe_module(backend=3), TypeError, ["backend", "None or a backend name", "int"]),
    ("module-attn_drop-training", lambda: _stripe_module(attn_drop=0.1).train()(_qkv(), _anchor(), X),
     NotImplementedError, ["attn_drop = 0.1", "expected attn_drop = 0"]),
    ("module-x_size-zero", lambda: _stripe_module()(_qkv(L=0), _anchor(h=0), (0, 8)), TypeError,
     ["x_size", "H >= 1, W >= 1", "(0, 8)"]),
    ("use_backend-unknown", lambda: G.use_backend("fastest"), ValueError, ["unknown backend 'fastest'", "'auto'"]),
    ("set_default_backend-type", lambda: G.set_default_backend(None), TypeError, ["backend", "str", "NoneType"]),
    # ---- model constructor
    ("grl-upsampler", lambda: _grl(upsampler="bicubic"), ValueError, ["upsampler", "pixelshuffle", "'bicubic'"]),
    ("grl-conv_type", lambda: _grl(conv_type="2conv"), ValueError, ["conv_type", "1conv", "'2conv'"]),
    ("grl-anchor_proj_type", lambda: _grl(anchor_proj_type="mean"), ValueError, ["anchor_proj_type", "avgpool", "'mean'"]),
    ("grl-patchmerging-one-stage-f4", lambda: _grl(anchor_proj_type="patchmerging", anchor_window_down_factor=4),
     ValueError, ["'patchmerging'", "anchor_one_stage=True", "anchor_window_down_factor 2", "got 4"]),
    ("grl-conv2d-one-stage-odd-f", lambda: _grl(anchor_proj_type="conv2d", anchor_window_down_factor=1), ValueError,
     ["'conv2d'", "anchor_one_stage=True", "even anchor_window_down_factor", "got 1"]),
    ("grl-pool-multi-stage", lambda: _grl(anchor_proj_type="avgpool", anchor_one_stage=False), ValueError,
     ["'avgpool'", "needs anchor_one_stage=True", "anchor_one_stage=False"]),
    ("grl-multi-stage-f3", lambda: _grl(anchor_proj_type="conv2d", anchor_one_stage=False, anchor_window_down_factor=3),
     ValueError, ["anchor_one_stage=False", "power-of-two anchor_window_down_factor >= 2", "got 3"]),
    ("grl-qkv_proj_type", lambda: _grl(qkv_proj_type="conv"), ValueError, ["qkv_proj_type", "'linear'", "'conv'"]),
    ("grl-heads-per-stage", lambda: _grl(num_heads_window=[2, 2]), ValueError,
     ["num_heads_window", "one entry per stage", "[2, 2]"]),
    ("grl-heads-divide", lambda: _grl(num_heads_stripe=[3]), ValueError,
     ["num_heads_stripe[0] = 3", "dividing embed_dim / 2 = 8"]),
    ("grl-embed_dim-odd", lambda: _grl(embed_dim=15), ValueError, ["embed_dim", "even int", "15"]),
    ("grl-nearest-upscale", lambda: _grl(upsampler="nearest+conv", upscale=2), ValueError,
     ["nearest+conv", "upscale 4", "2"]),
    ("grl-pixelshuffle-upscale", lambda: _grl(upsampler="pixelshuffle", upscale=5), ValueError,
     ["upscale", "power of 2 or 3", "5"]),
    ("grl-out_proj_type", lambda: _grl(out_proj_type="conv2d"), ValueError, ["out_proj_type", "'linear'", "'conv2d'"]),
    ("grl-init_method", lambda: _grl(init_method="zeros"), ValueError, ["init_method", "'zeros'"]),
    ("grl-euclidean", lambda: _grl(euclidean_dist=True), ValueError, ["euclidean_dist", "cosine"]),
    ("grl-unknown-kwarg", lambda: _grl(window=8), TypeError, ["unexpected keyword", "window"]),
    ("grl-backend", lambda: _grl(backend="nope"), ValueError, ["unknown backend 'nope'"]),
    # ---- model forward
    ("forward-3d", lambda: _forward(torch.rand(3, 16, 16)), ValueError, ["input", "(B, C, H, W)", "(3, 16, 16)"]),
    ("forward-channels", lambda: _forward(torch.rand(1, 1, 16, 16)), ValueError,
     ["input has 1 channels", "in_channels = 3"]),
    ("forward-empty-batch", lambda: _forward(torch.rand(0, 3, 16, 16)), ValueError,
     ["batch size B >= 1", "(0, 3, 16, 16)"]),
    ("forward-zero-width", lambda: _forward(torch.rand(1, 3, 16, 0)), ValueError,
     ["height and width >= 1", "(1, 3, 16, 0)"]),
    ("forward-int-input", lambda: _forward(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), TypeError,
     ["input", "floating", "torch.uint8"]),
    ("forward-not-tensor", lambda: _forward([[0.0]]), ValueError, ["input", "(B, C, H, W)", "list"]),
    ("forward-backend-set", lambda: _grl().set_backend("nope"), ValueError, ["unknown backend 'nope'"]),
    # ---- checkpoint loader
    ("ckpt-missing-file", lambda: _load(source="/nonexistent-grl/ckpt.pth"), FileNotFoundError,
     ["checkpoint file not found", "/nonexistent-grl/ckpt.pth"]),
    ("ckpt-not-a-dict", lambda: _load(source=[1, 2]), TypeError, ["checkpoint", "a path or a dict", "list"]),
    ("ckpt-missing-key", lambda: _load(_drop("conv_first.weight")), ValueError,
     ["missing from the checkpoint", "conv_first.weight"]),
    ("ckpt-unexpected-key", lambda: _load(_add("layers.0.blocks.0.attn.anchor.body.0.norm.weight")), ValueError,
     ["not in the model", "anchor.body.0.norm.weight"]),
    ("ckpt-shape", lambda: _load(_reshape("conv_first.bias")), ValueError,
     ["different shape", "conv_first.bias", "(3, 3) vs (16,)"]),
]


def _corrupt_file(tmp_path):
    p = tmp_path / "bad.pth"
    p.write_bytes(b"this is not a torch file")
    return _load(source=str(p))


def _cli(argv):
    return cli_main(argv)


CLI_CASES = [
    ("cli-bench-batch-zero", ["bench", "--batch", "0"], ["--batch", "int >= 1", "0"]),
    ("cli-bench-reps-zero", ["bench", "--reps", "0"], ["--reps", "int >= 1", "0"]),
    ("cli-bench-warmup-negative", ["bench", "--warmup", "-1"], ["--warmup", "int >= 0", "-1"]),
    ("cli-bench-size-zero", ["bench", "--size", "0x8", "--no-progress"], ["--size", "H >= 1 and W >= 1", "0x8"]),
    ("cli-bench-size-format", ["bench", "--size", "8x8x8", "--no-progress"], ["--size", "128x128", "8x8x8"]),
    ("cli-bench-geometry-kind", ["bench", "--geometry", "cube:8x8", "--no-progress"], ["geometry", "'stripe:HxW,...'"]),
    ("cli-bench-geometry-heads-zero", ["bench", "--geometry", "window:16x16,ws=8,heads=0", "--no-progress"],
     ["geometry", "heads must be an int >= 1", "'0'"]),
    ("cli-bench-geometry-unknown-key", ["bench", "--geometry", "window:16x16,ws=8,bogus=1", "--no-progress"],
     ["unknown keys ['bogus']", "known"]),
    ("cli-bench-geometry-divisible", ["bench", "--geometry", "window:10x10,ws=8", "--no-progress"],
     ["x_size height 10", "divisible by window_size 8"]),
    ("cli-bench-baselines", ["bench", "--baselines", "sdpa", "--no-progress"], ["--baselines", "sdpa", "reference, compile, flex"]),
    ("cli-bench-backend", ["bench", "--backend", "nope", "--no-progress"], ["--backend", "unknown backend 'nope'"]),
    ("cli-bench-dtype-twice", ["bench", "--dtype", "float32", "--dtype", "float64"], ["--dtype", "given twice"]),
    ("cli-bench-model-preset", ["bench-model", "--preset", "GRL-X", "--no-progress"], ["unknown preset 'GRL-X'", "grl_t"]),
    ("cli-bench-model-image-size", ["bench-model", "--image-size", "0"], ["--image-size", "int >= 1", "0"]),
    ("cli-check-dtype", ["check", "--dtype", "int8"], ["--dtype", "invalid choice", "float32"]),
    ("cli-check-device", ["check", "--device", "tpu"], ["--device", "invalid choice", "'cpu'"]),
    ("cli-check-backend", ["check", "--backend", "nope", "--no-progress"], ["nope"]),
    ("cli-unknown-command", ["frobnicate"], ["COMMAND", "invalid choice", "'check'"]),
]


def _check_message(exc, needles):
    msg = str(exc)
    for n in needles:
        assert n in msg, f"{n!r} not in the message: {msg}"


@pytest.mark.parametrize("name,fn,exc,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, fn, exc, needles):
    with pytest.raises(exc) as info:
        fn()
    _check_message(info.value, needles)


def test_bad_checkpoint_file(tmp_path):
    with pytest.raises(ValueError) as info:
        _corrupt_file(tmp_path)
    _check_message(info.value, ["bad.pth", "could not be read with torch.load(weights_only=True)",
                                "torch.load(path, weights_only=False)"])


def test_non_strict_load_reports_instead_of_raising():
    report = _load(_reshape("conv_first.bias"), strict=False)
    assert not report.ok and report.mismatched == [("conv_first.bias", (3, 3), (16,))]


@pytest.mark.parametrize("name,argv,needles", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_arguments(capsys, name, argv, needles):
    """Exit status 2 (argparse's SystemExit(2) or the command's return value) and the message on stderr."""
    try:
        rc = _cli(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    _check_message(capsys.readouterr().err, needles)


def test_zoo_size():
    assert len(CASES) + len(CLI_CASES) + 1 >= 40
