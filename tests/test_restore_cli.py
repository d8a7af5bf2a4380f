"""grl-kernels restore on generated images with the golden fixture model: outputs equal running
the model directly (untiled) or close to it (tiled); bad inputs give one-line errors naming the
file, a non-zero exit, no partial outputs, and the other images still complete."""
import os

import numpy as np
import pytest
import torch

import grl_kernels as G
from grl_kernels.cli import main
from grl_kernels.models import GRL
from grl_kernels.restore.config import infer_kwargs
from grl_kernels.restore.io import Picture, read_image, write_image

pytest.importorskip("PIL")
FAST = ["--no-compile", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def golden_data(fixtures_dir):
    return torch.load(fixtures_dir / "golden_grl_model.pt", weights_only=False)


@pytest.fixture(scope="module")
def golden_model(golden_data):
    m = GRL(**golden_data["kwargs"]).eval()
    m.load_state_dict(golden_data["state_dict"], strict=False)
    return m


@pytest.fixture()
def ckpt(tmp_path, golden_data):
    path = tmp_path / "golden.ckpt"  # Lightning layout: weights under "model."
    torch.save({"state_dict": {"model." + k: v for k, v in golden_data["state_dict"].items()}, "epoch": 3}, path)
    return str(path)


def _image(h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(yy / (5 + i) + xx / (7 + 2 * i)) * 0.4 + 0.5 for i in range(c)], axis=2)
    return np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32)


def _direct(model, px):
    x = torch.from_numpy(px.transpose(2, 0, 1).copy())
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    with torch.no_grad():
        y = model(x[None].float())[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return y


def test_infer_kwargs_from_the_checkpoint(golden_data):
    kw = infer_kwargs(golden_data["state_dict"])
    for k in ("embed_dim", "depths", "num_heads_window", "num_heads_stripe", "upscale", "upsampler",
              "mlp_ratio", "local_connection", "in_channels"):
        assert kw[k] == golden_data["kwargs"][k], k
    for extra in [dict(upsampler="pixelshuffle", upscale=4), dict(upsampler="nearest+conv", upscale=4),
                  dict(upsampler="", upscale=1, conv_type="3conv"), dict(upsampler="pixelshuffle", upscale=3),
                  dict(anchor_proj_type="conv2d", anchor_window_down_factor=4, qkv_proj_type="separable_conv"),
                  dict(anchor_proj_type="separable_conv", anchor_one_stage=False, anchor_window_down_factor=4)]:
        kw0 = dict(golden_data["kwargs"], **extra)
        sd = GRL(**kw0).state_dict()
        got = infer_kwargs(sd)
        for k, v in extra.items():
            assert got[k] == v, (extra, k, got.get(k))


def test_restore_files_untiled_and_tiled(tmp_path, ckpt, golden_model, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = _image(40, 44, 3)
    write_image(str(src / "rgb.png"), Picture(rgb, None, 8, "PNG"))
    gray16 = _image(36, 40, 1, seed=1)
    write_image(str(src / "gray16.png"), Picture(gray16, None, 16, "PNG"))
    rgba = _image(32, 48, 3, seed=2)
    alpha = _image(32, 48, 1, seed=3)[:, :, 0]
    write_image(str(src / "rgba.tif"), Picture(rgba, alpha, 16, "TIFF"))
    out = tmp_path / "out"
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", ckpt, "--tile", "none", *FAST]) == 0
    assert sorted(os.listdir(out)) == ["gray16.png", "rgb.png", "rgba.tif"]
    q8 = lambda a: np.rint(np.clip(a, 0, 1) * 255) / 255  # noqa: E731
    got = read_image(str(out / "rgb.png"))
    assert got.bits == 8 and got.pixels.shape == (80, 88, 3)
    assert np.abs(got.pixels - q8(_direct(golden_model, q8(rgb)))).max() <= 1 / 255 + 1e-6
    g = read_image(str(out / "gray16.png"))
    assert g.bits == 16 and g.pixels.shape == (72, 80, 1)
    gin = read_image(str(src / "gray16.png")).pixels
    assert np.abs(g.pixels[:, :, 0] - _direct(golden_model, gin).mean(axis=2)).max() < 1e-4
    a = read_image(str(out / "rgba.tif"))
    assert a.bits == 16 and a.pixels.shape == (64, 96, 3) and a.alpha.shape == (64, 96)
    assert abs(a.alpha.mean() - alpha.mean()) < 0.01
    # tiled: 32-px tiles (pad 16) with 16 px of overlap, the same as grl_kernels.restore with those tiles
    # (how close tiled is to untiled: tests/test_restore.py)
    out_t = tmp_path / "tiled"
    assert main(["restore", str(src / "rgb.png"), "-o", str(out_t), "--checkpoint", ckpt, "--tile", "32",
                 "--overlap", "16", *FAST]) == 0
    t = read_image(str(out_t / "rgb.png")).pixels
    x = torch.from_numpy(q8(rgb).transpose(2, 0, 1).copy())
    direct = G.restore(golden_model, x, tile=32, overlap=16).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(t - q8(direct)).max() <= 1 / 255 + 1e-6


def test_progress_bar_with_eta(tmp_path, ckpt, capsys):
    write_image(str(tmp_path / "a.png"), Picture(_image(32, 48, 3), None, 8, "PNG"))
    assert main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--checkpoint", ckpt,
                 "--tile", "32", "--overlap", "8", "--no-compile", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "tiles 2/2" in err and "ETA" in err and "1 image(s) written" in err


def test_bad_inputs_one_line_errors_and_the_rest_completes(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_image(str(src / "good.png"), Picture(_image(32, 32, 3), None, 8, "PNG"))
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from PIL import Image

    Image.new("F", (16, 16)).save(src / "float.tif")
    out = tmp_path / "out"
    rc = main(["restore", str(src), str(tmp_path / "missing.png"), "-o", str(out), "--checkpoint", ckpt, *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert os.listdir(out) == ["good.png"]  # no partial or temporary file
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 3, err
    assert any("corrupt.png: cannot read image" in ln for ln in lines)
    assert any("float.tif: unsupported image mode" in ln for ln in lines)
    assert any("missing.png: no such file" in ln for ln in lines)


def test_model_and_output_errors(tmp_path, ckpt, golden_data, capsys):
    img = tmp_path / "a.png"
    write_image(str(img), Picture(_image(32, 32, 3), None, 8, "PNG"))
    out = str(tmp_path / "o")
    assert main(["restore", str(img), "-o", out, "--checkpoint", ckpt, "--preset", "grl_huge", *FAST]) == 2
    assert "unknown preset 'grl_huge'" in capsys.readouterr().err
    # a checkpoint that the configuration cannot hold: a window size whose bias MLP differs is not in
    # the weights, so break a shape instead
    sd = dict(golden_data["state_dict"])
    sd["layers.0.blocks.0.attn.proj.weight"] = torch.zeros(32, 16)
    bad = tmp_path / "bad.ckpt"
    torch.save(sd, bad)
    assert main(["restore", str(img), "-o", out, "--checkpoint", str(bad), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: checkpoint does not match the model" in err and "proj.weight: (32, 16) vs (32, 32)" in err
    assert "Traceback" not in err
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    assert main(["restore", str(img), "-o", out, "--checkpoint", str(tmp_path / "junk.ckpt"), *FAST]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"window_size": 8, "no_such_keyword": 1}')
    assert main(["restore", str(img), "-o", out, "--checkpoint", ckpt, "--config", str(cfg), *FAST]) == 2
    assert "no_such_keyword" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["restore", str(img), "-o", str(tmp_path / "file" / "sub"), "--checkpoint", ckpt, *FAST]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # (root can write anywhere: the case above covers it)
            assert main(["restore", str(img), "-o", str(ro), "--checkpoint", ckpt, *FAST]) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_budget_too_small(tmp_path, ckpt, capsys):
    img = tmp_path / "a.png"
    write_image(str(img), Picture(_image(64, 64, 3), None, 8, "PNG"))
    rc = main(["restore", str(img), "-o", str(tmp_path / "o"), "--checkpoint", ckpt, "--max-memory", "100K", *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "a.png: memory budget of 0 MiB is too small" in err
    assert os.listdir(tmp_path / "o") == []
    # with progress output, the plan line says so too (not "untiled")
    args = ["restore", str(img), "-o", str(tmp_path / "o"), "--checkpoint", ckpt, "--max-memory", "100K"]
    assert main(args + FAST[:-1]) == 1
    err = capsys.readouterr().err
    assert "a.png: 64x64 px, does not fit the memory budget" in err and "untiled" not in err
