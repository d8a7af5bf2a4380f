"""grl_kernels.optimize and the in-place inference path of the model: same outputs as the eager
float32 model (bit-identical for the in-place residuals, within a stated tolerance per dtype),
the dtype choice per device, and one graph under torch.compile(fullgraph=True)."""
import importlib
import os

import pytest
import torch

import grl_kernels as G
from grl_kernels.models import GRL

opt_mod = importlib.import_module("grl_kernels.optimize")  # the module (G.optimize is the function)

# max |optimized - eager float32| / max |eager float32| on the golden model (observed: float32 ~6e-7,
# bfloat16 8.1e-3: weights, activations and attention inputs rounded to 8 bits, float32 accumulation)
# float16 (reference attention on the CPU; no fused CPU float16 kernel): see docs/restore.md, "float16"
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@pytest.fixture()
def golden(fixtures_dir):
    d = torch.load(fixtures_dir / "golden_grl_model.pt", weights_only=False)
    m = GRL(**d["kwargs"]).eval()
    m.load_state_dict(d["state_dict"], strict=False)
    return m, d["input"], d["output"]


@pytest.mark.parametrize("chunk_rows", [None, 100])
def test_inplace_inference_path_is_bit_identical(golden, monkeypatch, chunk_rows):
    """No-grad blocks: residuals in place and the per-token tail in row chunks (100 rows: a short
    last chunk; None: the default sizing), bit-identical to the autograd path."""
    from grl_kernels.models.layers import EfficientMixAttnTransformerBlock as Block

    if chunk_rows is not None:
        monkeypatch.setattr(Block, "inference_chunk_rows", lambda self, x: chunk_rows)
    m, x, _ = golden
    with torch.enable_grad():
        autograd_path = m(x).detach()
    with torch.no_grad():
        inplace = m(x)
    assert torch.equal(inplace, autograd_path)
    with torch.inference_mode():
        assert torch.equal(m(x), autograd_path)
    # res_scale 0.1 (init_method "r") takes the scaled branch
    kw = dict(embed_dim=24, depths=[2], num_heads_window=[1], num_heads_stripe=[1], stripe_size=[8, None],
              stripe_groups=[None, 2], anchor_window_down_factor=2, upscale=1, upsampler="", init_method="r",
              local_connection=True)
    m2 = GRL(**kw).eval()
    x2 = torch.rand(2, 3, 16, 24)  # batch 2: chunks cross from one image into the next
    with torch.enable_grad():
        a = m2(x2).detach()
    with torch.no_grad():
        assert torch.equal(m2(x2), a)


def test_inference_chunk_rows():
    from grl_kernels.models.layers import EfficientMixAttnTransformerBlock as Block

    blk = GRL(embed_dim=32, depths=[1], num_heads_window=[1], num_heads_stripe=[1], mlp_ratio=2).layers[0].blocks[0]
    x = torch.empty(2, 4096, 32)
    assert blk.inference_chunk_rows(x) == Block.INFERENCE_CHUNK_BYTES // (64 * 4)  # hidden rows of ~1 MiB
    assert blk.inference_chunk_rows(x.bfloat16()) == 2 * blk.inference_chunk_rows(x)
    assert blk.inference_chunk_rows(torch.empty(1, 10, 32)) == 10


def test_best_dtype(monkeypatch):
    monkeypatch.setattr(opt_mod, "cpu_has_fast_bfloat16", lambda: True)
    assert opt_mod.best_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(opt_mod, "cpu_has_fast_bfloat16", lambda: False)
    assert opt_mod.best_dtype("cpu") == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_optimize_matches_eager_float32(golden, dtype):
    m, x, expected = golden
    fast = G.optimize(m, dtype=dtype, compile=False)
    assert fast is m and not m.training
    assert next(m.parameters()).dtype == dtype
    with torch.no_grad():
        y = fast(x.to(dtype)).float()
    assert torch.isfinite(y).all()
    rel = ((y - expected).abs().max() / expected.abs().max()).item()
    assert rel <= TOL[dtype], rel
    m.float()


def test_input_dtype_other_than_the_weights(golden):
    """A float32 image for a bfloat16 model: a TypeError naming both dtypes from a plain model;
    after optimize, converted in and the output converted back (the same values as a bf16 input)."""
    m, x, expected = golden
    try:
        m.bfloat16()
        with torch.no_grad(), pytest.raises(TypeError, match="float32.*bfloat16"):
            m(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(x).shape == expected.shape  # autocast converts the input itself
        fast = G.optimize(m, dtype=torch.bfloat16, compile=False)
        with torch.no_grad():
            y = fast(x)
            assert y.dtype == torch.float32
            assert torch.equal(y, fast(x.bfloat16()).float())
    finally:
        m.float()
        m.cast_inputs = False


def test_optimize_arguments(golden):
    m, _, _ = golden
    with pytest.raises(TypeError, match="GRL"):
        G.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        G.optimize(m, dtype="half", compile=False)
    with pytest.raises(ValueError, match="floating"):
        G.optimize(m, dtype=torch.int8, compile=False)


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("GRL_KERNELS_INDUCTOR_TESTS"), reason="set GRL_KERNELS_INDUCTOR_TESTS=1 (Inductor codegen: "
    "~1 min on 2 idle cores, 6 min on a loaded one)"))])
def test_compile_whole_model_fullgraph(compiler):
    """torch.compile(fullgraph=True) of a tiny GRL with the fused cpu backend: one graph (Dynamo raises on
    any graph break; the 'eager' compiler checks exactly that, quickly), same output."""
    if "cpu" not in G.available_backends():
        pytest.skip("the cpu backend is not available here")
    torch.manual_seed(0)
    m = GRL(embed_dim=24, depths=[2], num_heads_window=[1], num_heads_stripe=[1], window_size=8,
            stripe_size=[8, None], stripe_groups=[None, 2], stripe_shift=True, mlp_ratio=2,
            anchor_window_down_factor=2, upscale=2, upsampler="pixelshuffledirect", local_connection=True).eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        ref = m(x)
    torch._dynamo.reset()
    # as in a fresh process: the availability of the backends "auto" may pick is not known yet
    # (checking it inside the graph was one graph break per attention call)
    from grl_kernels.backends import registry

    for b in registry._REGISTRY.values():
        if b.supports(torch.device("cpu"), torch.float32) and b.auto_ok(torch.device("cpu")):
            b._status = None
    c = torch.compile(G.optimize(m, dtype=torch.float32, compile=False), fullgraph=True,
                      dynamic=False, backend=compiler)
    with torch.no_grad():
        y = c(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert {a.backend for a in m.attention_modules()} == {"cpu"}


def test_conv_weights_channels_last_and_output_nchw(golden):
    """Conv weights are stored channels-last (the CPU convolution then keeps the tokens' channels-last
    layout instead of copying in and out), the output is NCHW-contiguous as the published model's,
    and optimize() stores them channels-last again after load_state_dict(assign=True)."""
    m, x, _ = golden
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        y = m(x)
    assert y.is_contiguous()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    assert not all(c.weight.is_contiguous(memory_format=torch.channels_last)
                   for c in m.modules() if isinstance(c, torch.nn.Conv2d))
    G.optimize(m, dtype=None, compile=False)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last)
               for c in m.modules() if isinstance(c, torch.nn.Conv2d))
    with torch.no_grad():
        assert torch.equal(m(x), y)
