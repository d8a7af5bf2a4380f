"""The reference GRL model: published parameter names, every option, every size, the loader."""
import ast
import json

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import registry
from grl_kernels.models import GRL, PRESETS, build_preset, load_checkpoint, preset_kwargs

from conftest import max_scaled_error


def _cpu_backends(dtype):
    """Available non-reference backends that take CPU tensors of ``dtype``."""
    return [n for n in G.available_backends()
            if n != "reference" and registry._REGISTRY[n].supports(torch.device("cpu"), dtype)]

SMALL = dict(
    img_size=16, embed_dim=16, depths=[4], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
    stripe_size=[4, None], stripe_groups=[None, 2], stripe_shift=True, mlp_ratio=2, anchor_window_down_factor=2,
    upscale=2, upsampler="pixelshuffledirect",
)


def _read_keys(path):
    lines = path.read_text().splitlines()
    kwargs = json.loads(lines[0].split("GRL(**", 1)[1].rsplit(")", 1)[0])
    shapes = {l.split("\t")[0]: ast.literal_eval(l.split("\t")[1]) for l in lines if l and not l.startswith("#")}
    return kwargs, shapes


@pytest.mark.parametrize("name", ["grl_tiny_sr_x4", "grl_small_sr_x4", "grl_base_sr_x4", "grl_base_realsr_x4", "grl_base_denoise_color"])
def test_published_parameter_names_and_shapes(fixtures_dir, name):
    kwargs, shapes = _read_keys(fixtures_dir / f"{name}.keys.tsv")
    for model in (GRL(**kwargs), build_preset(name)):
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert own == shapes


@pytest.mark.parametrize("size", [(13, 21), (8, 40), (5, 3), (16, 16), (24, 8)])
def test_every_input_size(size):
    """Sizes that need padding, non-square ones (the published code crashes on those), tiny ones."""
    model = GRL(**SMALL)
    x = torch.rand(1, 3, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (1, 3, size[0] * 2, size[1] * 2)
    assert torch.isfinite(y).all()
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_non_square_vertical_blocks_use_their_own_geometry():
    """On a non-square padded input the vertical blocks' stripes come from the reversed config."""
    model = GRL(**SMALL)
    shapes = {}
    for blk in model.layers[0].blocks:
        geom = blk.attn.stripe_attn.geometry((8, 16))
        shapes.setdefault(blk.stripe_type, set()).add((geom.sh, geom.sw))
    assert shapes == {"H": {(4, 8)}, "W": {(4, 4)}}  # H: (4, W/2); W: (H/2, 4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(upsampler="pixelshuffle", upscale=2),
        dict(upsampler="pixelshuffle", upscale=3, stripe_groups=[None, None], stripe_size=[4, 4], img_size=12),
        dict(upsampler="nearest+conv", upscale=4),
        dict(upsampler="", upscale=1),
        dict(upsampler="", upscale=1, in_channels=1, out_channels=1),
        dict(upsampler="", upscale=1, in_channels=3, out_channels=1),
        dict(anchor_proj_type="maxpool"),
        dict(anchor_proj_type="conv2d"),
        dict(anchor_proj_type="separable_conv"),
        dict(anchor_proj_type="patchmerging"),
        dict(anchor_proj_type="conv2d", anchor_one_stage=False),
        dict(anchor_proj_type="patchmerging", anchor_one_stage=False, anchor_window_down_factor=4, stripe_size=[8, None], stripe_groups=[None, 2]),
        dict(qkv_proj_type="separable_conv"),
        dict(conv_type="3conv", embed_dim=32),
        dict(conv_type="1conv1x1"),
        dict(conv_type="linear"),
        dict(local_connection=True, embed_dim=36),
        dict(init_method="r"),
        dict(stripe_shift=False, window_size=8),
        dict(depths=[2, 4], num_heads_window=[1, 2], num_heads_stripe=[2, 1]),
    ],
)
def test_model_options(overrides):
    """Shape, and the same numbers on every CPU backend as on the reference (float64, so any
    index/mask/shift difference shows at O(1e-3) or more while the order of operations gives
    ~1e-15; limit 1e-10 of max(1, |ref|))."""
    kw = {**SMALL, **overrides}
    model = GRL(**kw, backend="reference").double().eval()  # eval: no drop-path randomness
    with torch.no_grad():  # logit scales spread up to and past the ln 100 clamp
        for n, p in model.named_parameters():
            if n.endswith("logit_scale"):
                p.uniform_(1.0, 5.5)
    cin = kw.get("in_channels", 3)
    cout = kw.get("out_channels", cin)
    x = torch.rand(1, cin, 12, 20, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    s = kw["upscale"] if kw["upsampler"] else 1
    assert y.shape == (1, cout, 12 * s, 20 * s)
    assert torch.isfinite(y).all()
    for name in _cpu_backends(torch.float64):
        model.set_backend(name)
        assert {m.backend for m in model.attention_modules()} == {name}
        with torch.no_grad():
            assert max_scaled_error(model(x), y) <= 1e-10, name


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(upsampler="bicubic"), ValueError, "upsampler must be one of"),
        (dict(conv_type="2conv"), ValueError, "conv_type must be one of"),
        (dict(anchor_proj_type="mean"), ValueError, "anchor_proj_type must be one of"),
        (dict(qkv_proj_type="conv"), ValueError, "qkv_proj_type must be"),
        (dict(num_heads_window=[2, 2]), ValueError, "num_heads_window must have one entry per stage"),
        (dict(euclidean_dist=True), ValueError, "euclidean_dist"),
        (dict(backend="nope"), ValueError, "unknown backend"),
        (dict(some_typo=1), TypeError, "unexpected keyword"),
    ],
)
def test_model_bad_arguments(overrides, exc, match):
    with pytest.raises(exc, match=match):
        GRL(**{**SMALL, **overrides})


def test_model_input_checked():
    model = GRL(**SMALL)
    with pytest.raises(ValueError, match="input has 1 channels, the model expects in_channels = 3"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.rand(3, 8, 8))


def test_backend_selectable_for_whole_model():
    """set_backend / use_backend route every attention module: each backend's output is
    reproduced bit for bit through the context manager, and differs (in rounding) from another's."""
    model = GRL(**SMALL, backend="reference").eval()  # eval: no drop-path randomness
    assert {m.backend for m in model.attention_modules()} == {"reference"}
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        outs = {"reference": model(x)}
        for name in _cpu_backends(torch.float32):
            model.set_backend(name)
            assert {m.backend for m in model.attention_modules()} == {name}
            outs[name] = model(x)
        model.set_backend(None)
        assert {m.backend for m in model.attention_modules()} == {None}
        for name, y in outs.items():
            with G.use_backend(name):
                assert torch.equal(model(x), y), name
            assert max_scaled_error(y, outs["reference"]) <= 1e-5, name
            if name != "reference":  # really another code path (float32 rounding differs)
                assert not torch.equal(y, outs["reference"]), name
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("nope")


def test_presets_and_task_geometries():
    assert {"grl_t", "grl_s", "grl_b"} <= set(PRESETS)
    kw = preset_kwargs("grl_b", task="jpeg")
    assert kw["window_size"] == 36 and kw["stripe_size"] == [72, 144] and kw["embed_dim"] == 180
    with pytest.raises(ValueError, match="unknown preset"):
        preset_kwargs("grl_xl")
    with pytest.raises(ValueError, match="unknown task geometry"):
        preset_kwargs("grl_t", task="inpaint")


# ---------------------------------------------------------------- checkpoint loader
def _lightning(model, prefix="model."):
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    # derived buffers of the published code, and unrelated keys of other sub-models
    sd[prefix + "table_w"] = torch.zeros(1, 7, 7, 2)
    sd[prefix + "index_sh_a2w"] = torch.zeros(4, 8, dtype=torch.long)
    sd[prefix + "mask_sv_w2a"] = torch.zeros(2, 8, 4)
    sd[prefix + "layers.0.blocks.0.attn.window_attn.relative_coords_table"] = torch.zeros(3)
    sd["loss.vgg.weight"] = torch.zeros(3)
    return {"state_dict": sd, "epoch": 3, "global_step": 10}


@pytest.mark.parametrize("prefix", ["model.", "model_g."])
def test_load_lightning_checkpoint(tmp_path, prefix):
    src = GRL(**SMALL)
    dst = GRL(**SMALL)
    path = tmp_path / "grl.ckpt"
    torch.save(_lightning(src, prefix), path)
    report = load_checkpoint(dst, path)
    assert report.ok and report.prefix == prefix and len(report.dropped_derived) == 4
    assert "dropped 4 derived buffers" in str(report)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_load_plain_state_dict_and_strictness():
    src = GRL(**SMALL)
    sd = src.state_dict()
    dst = GRL(**SMALL)
    assert load_checkpoint(dst, sd).ok
    bad = dict(sd)
    bad.pop("conv_first.bias")
    bad["conv_first.weight"] = torch.zeros(16, 3, 5, 5)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_checkpoint(dst, bad)
    msg = str(err.value)
    assert "conv_first.bias" in msg and "extra.weight" in msg and "(16, 3, 5, 5) vs (16, 3, 3, 3)" in msg
    report = load_checkpoint(dst, bad, strict=False)
    assert not report.ok and report.missing == ["conv_first.bias"] and "extra.weight" in report.unexpected


def test_load_missing_file_and_bad_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(GRL(**SMALL), tmp_path / "none.ckpt")
    with pytest.raises(TypeError, match="checkpoint must be a path or a dict"):
        load_checkpoint(GRL(**SMALL), [1, 2])
