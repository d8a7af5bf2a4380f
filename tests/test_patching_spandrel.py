"""grl_kernels.patch on spandrel's copy of the published GRL code (a real third-party model).

spandrel (pinned 0.4.2, installed by scripts/setup_env.sh with --no-deps) keeps the published
GRL modules nearly verbatim. Its package __init__ imports every architecture, two of which
(LaMa, RestoreFormer) import torchvision at import time; GRL itself does not use it. Where
torchvision is not importable (the CPU torch 2.13 wheel has no matching torchvision build
here), a stub module with the three names those imports ask for is put in sys.modules so
the GRL architecture can be imported; calling the stub raises.

Checks:
- spandrel's GRL with the golden state_dict reproduces the published output, unpatched and
  patched on every CPU backend (the fixture was produced by the published code);
- on a deeper model with shifted stripes, both stripe directions, stripe groups and a
  non-square input (30 x 27; it pads to 32 x 32: the published code crashes when the padded
  size is not square and stripe_groups is set, spec section 6), patched forward and every gradient equal the unpatched ones, the
  state_dict is unchanged, and unpatch restores the original forwards bit for bit;
- our own GRL loads a spandrel state_dict strictly and gives the same output.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

import grl_kernels
from grl_kernels.models import GRL as OurGRL
from grl_kernels.backends import registry
from grl_kernels.bench.published import _stub_torchvision
from grl_kernels.patching import is_patched

SPANDREL_VERSION = "0.4.2"


@pytest.fixture(scope="module")
def SpandrelGRL():
    if importlib.util.find_spec("spandrel") is None:
        pytest.skip("spandrel not installed (scripts/setup_env.sh installs it)")
    _stub_torchvision()
    for name in [m for m in sys.modules if m == "spandrel" or m.startswith("spandrel.")]:
        del sys.modules[name]  # a failed import may have left half-initialized modules
    spandrel = importlib.import_module("spandrel")
    assert spandrel.__version__ == SPANDREL_VERSION, spandrel.__version__
    return importlib.import_module("spandrel.architectures.GRL.__arch.grl").GRL


def _cpu_backends():
    return [n for n in grl_kernels.available_backends()
            if registry._REGISTRY[n].supports(torch.device("cpu"), torch.float32)]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_spandrel_golden_model_patched(SpandrelGRL, fixtures_dir, backend):
    data = torch.load(fixtures_dir / "golden_grl_model.pt", weights_only=False)
    model = SpandrelGRL(**data["kwargs"]).eval()
    model.load_state_dict(data["state_dict"])
    with torch.no_grad():
        out0 = model(data["input"])
    # the fixture is the published forward; spandrel's copy reproduces it (float32 summation noise)
    assert (out0 - data["output"]).abs().max().item() < 5e-6

    report = grl_kernels.patch(model, backend=backend)
    # kwargs: depths [2, 2] -> 4 blocks, each with one window and one stripe attention
    assert report.count("window", "published") == 4 and report.count("stripe", "published") == 4
    with torch.no_grad():
        out1 = model(data["input"])
    assert (out1 - data["output"]).abs().max().item() < 5e-6
    assert not torch.equal(out1, out0) or backend == "reference"  # really another code path


SHIFTED = dict(upscale=2, img_size=32, embed_dim=24, depths=[4], num_heads_window=[2], num_heads_stripe=[3],
               window_size=8, stripe_size=[8, None], stripe_groups=[None, 2], stripe_shift=True, mlp_ratio=2,
               anchor_window_down_factor=2, upsampler="pixelshuffledirect", local_connection=True,
               drop_path_rate=0.0)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", _cpu_backends())
def test_spandrel_shifted_groups_gradients(SpandrelGRL, backend):
    torch.manual_seed(0)
    model = SpandrelGRL(**SHIFTED).train()
    with torch.no_grad():  # non-trivial logit scales (published init is ln 10 everywhere)
        for n, p in model.named_parameters():
            if n.endswith("logit_scale"):
                p.uniform_(1.0, 4.0)
    x = torch.rand(1, 3, 30, 27)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    out0, gx0, g0 = _run(model, x)

    report = grl_kernels.patch(model, backend=backend)
    text = str(report)
    assert len(report) == 8
    assert "stripe_size=[None, 8]" in text  # the vertical blocks' own (reversed) configuration
    assert "shift=True" in text and "shift=False" in text  # blocks 2, 3 shift their stripes
    out1, gx1, g1 = _run(model, x)
    # same math, another order of operations: float32 agrees to ~1e-6; the logit-scale
    # gradients (one reduction over every logit of a block) to ~1e-5
    assert _rel(out1, out0) < 1e-5
    assert _rel(gx1, gx0) < 1e-4
    assert set(g1) == set(g0)
    for n in g0:
        assert _rel(g1[n], g0[n]) < 1e-4, n
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    assert all(torch.equal(sd_after[k], sd_before[k]) for k in sd_before)

    assert grl_kernels.unpatch(model) == 8
    assert not any(is_patched(m) for m in model.modules())
    out2, gx2, _ = _run(model, x)
    assert torch.equal(out2, out0) and torch.equal(gx2, gx0)


def test_our_grl_loads_spandrel_weights(SpandrelGRL):
    torch.manual_seed(1)
    theirs = SpandrelGRL(**SHIFTED).eval()
    ours = OurGRL(**SHIFTED).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(1, 3, 30, 27)
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert a.shape == b.shape == (1, 3, 60, 54)
    assert (a - b).abs().max().item() < 5e-6
