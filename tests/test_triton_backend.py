"""The "triton" backend without a GPU: registration, availability, settings, fake shapes.

(Numerics: test_triton_interpreter.py; compilation: test_triton_compile.py.)
"""
import warnings

import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import registry
from grl_kernels.backends import triton as T
from grl_kernels.backends.triton import autograd as A
from grl_kernels.backends.triton import config
from grl_kernels.geometry import stripe_geometry, window_geometry


def test_registered_with_priority_above_reference():
    assert "triton" in registry.registered_backends()
    b = registry._REGISTRY["triton"]
    assert b.priority > registry._REGISTRY["reference"].priority
    assert "cuda" in b.devices
    assert b.dtypes == frozenset({torch.float16, torch.bfloat16, torch.float32})


@pytest.mark.skipif(torch.cuda.is_available() or T.interpreting(), reason="CPU-only, non-interpreting process")
def test_unavailable_without_gpu_with_a_reason():
    ok, why = T.availability()
    assert not ok and why
    assert ("triton", False, why) in [(n, a, w) for n, a, w in G.backend_info()]
    qkv = torch.randn(1, 64, 48)
    with pytest.raises(G.BackendUnavailableError, match="triton"):
        G.window_attention(qkv, window_geometry((8, 8), 8, False), 2, torch.ones(2), torch.zeros(225, 2),
                           backend="triton")
    # "auto" on CPU never picks it
    assert registry.resolve_backend("auto", torch.device("cpu"), torch.float32).name != "triton"


@pytest.mark.skipif(T.interpreting(), reason="the interpreter takes CPU tensors")
def test_cpu_tensors_need_the_interpreter():
    pytest.importorskip("triton")
    from grl_kernels.backends.triton import launcher

    g = window_geometry((8, 8), 8, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        launcher.window_forward(torch.randn(1, 64, 48), g, 2, torch.ones(2), torch.zeros(225, 2))


def test_head_pad():
    assert [config.head_pad(d) for d in (1, 16, 17, 30, 32, 60, 64, 100, 128)] == [16, 16, 32, 32, 32, 64, 64, 128, 128]
    for d in (0, 129):
        with pytest.raises(NotImplementedError):
            config.head_pad(d)


def test_deterministic_switch_is_kept_and_always_on(monkeypatch):
    # the bias gradients are partials reduced in a fixed order: deterministic in every mode
    monkeypatch.delenv(config.ENV_DETERMINISTIC, raising=False)
    T.set_deterministic(None)
    assert T.is_deterministic()
    for flag in (True, False, None):
        T.set_deterministic(flag)
        assert T.is_deterministic()
    with pytest.raises(TypeError):
        T.set_deterministic(1)


def _fake_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_failed_first_use_probe_makes_the_backend_unavailable_with_a_hint(monkeypatch):
    """A toolchain that cannot load a kernel (e.g. a driver older than the PTX): unavailable with
    the reason and the TRITON_PTXAS_PATH hint, one warning, and "auto" falls back (no crash)."""
    pytest.importorskip("triton")
    from grl_kernels.backends.triton import probe

    def broken(device_index):
        raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain.")

    _fake_gpu(monkeypatch)
    monkeypatch.setattr(probe, "_run_probe_kernel", broken)
    monkeypatch.setattr(probe, "_warned", False)
    backend = registry._REGISTRY["triton"]
    monkeypatch.setattr(backend, "_status", None)
    monkeypatch.setattr(backend, "devices", frozenset({"cuda"}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ok, why = backend.availability()
        picked = [registry.resolve_backend("auto", torch.device("cuda"), torch.float16) for _ in range(3)]
        assert backend.availability() == (False, why)
    assert not ok and "unsupported toolchain" in why and "TRITON_PTXAS_PATH" in why and "cuda:0" in why
    assert all(b.name != "triton" for b in picked)
    mine = [x for x in w if "triton backend is unavailable" in str(x.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    with pytest.raises(G.BackendUnavailableError, match="TRITON_PTXAS_PATH"):
        registry.resolve_backend("triton", torch.device("cuda"), torch.float16)


def test_successful_probe_keeps_the_backend_available(monkeypatch):
    pytest.importorskip("triton")
    from grl_kernels.backends.triton import probe

    calls = []
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(probe, "_run_probe_kernel", calls.append)
    assert T.availability() == (True, "")
    assert calls == [0]


def test_fake_implementations_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = stripe_geometry((32, 64), (8, None), (None, 4), True, 4)
    nh, d, B = 2, 30, 3
    with FakeTensorMode():
        qkv = torch.empty(B, 32 * 64, 3 * nh * d, dtype=torch.bfloat16)
        anchor = torch.empty(B, 8, 16, nh * d, dtype=torch.bfloat16)
        s, b = torch.empty(nh), torch.empty(g.table_rows, nh)
        out, z, stat1, stat2 = A.stripe_fwd(qkv, anchor, s, b, s, b, A.stripe_geom_list(g), nh)
        bwh = B * g.num_windows * nh
        assert out.shape == (B, 32 * 64, nh * d) and out.dtype == torch.bfloat16
        assert z.shape == (bwh, g.n2, 32) and z.dtype == torch.float32
        assert stat1.shape == (bwh, g.n2, 2) and stat2.shape == (bwh, g.n1, 2)
        grads = A.stripe_bwd(out, qkv, anchor, s, b, s, b, out, z, stat1, stat2, A.stripe_geom_list(g), nh)
        assert [t.shape for t in grads] == [qkv.shape, anchor.shape, s.shape, b.shape, s.shape, b.shape]
        wg = window_geometry((32, 64), 16, True)
        out, stat = A.window_fwd(qkv, s, torch.empty(wg.table_rows, nh), A.window_geom_list(wg), nh)
        assert out.shape == (B, 32 * 64, nh * d) and stat.shape == (B * wg.num_windows * nh, wg.n, 2)


def test_geometry_lists_round_trip():
    g = stripe_geometry((48, 32), (16, 16), (None, None), True, 2)
    assert A._stripe_geom(A.stripe_geom_list(g)) == g
    wg = window_geometry((24, 24), 12, True)
    assert A._window_geom(A.window_geom_list(wg)) == wg


def test_wide_heads_fall_back_to_reference_with_a_warning():
    from grl_kernels.backends import triton_backend

    g = window_geometry((4, 4), 4, False)
    qkv = torch.randn(1, 16, 3 * 130)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = triton_backend._window(qkv, g, 1, torch.ones(1), torch.zeros(g.table_rows, 1))
    assert out.shape == (1, 16, 130)
    assert any("head dim 130" in str(x.message) for x in w)


def test_block_config_choices():
    pytest.importorskip("triton")
    from grl_kernels.backends.triton import launcher

    for kind in ("fwd", "bwd"):
        for rows, cols in ((8, 128), (24, 10368), (648, 10368), (10368, 648), (1296, 1296)):
            for D in (16, 32, 64, 128):
                for dt in (torch.float16, torch.bfloat16, torch.float32):
                    c = launcher.choose_config(kind, rows, cols, D, dt)
                    assert c.BM in (16, 32, 64) and c.BN in (16, 32, 64), (kind, rows, cols, D, dt, c)
                    assert c.BM <= max(16, 1 << (rows - 1).bit_length())
    n, per = launcher._splits(torch.device("meta"), 10, 162)  # few programs: split the long loop
    assert 8 <= n <= 16 and (n - 1) * per < 162 <= n * per
    assert launcher._splits(torch.device("meta"), 10_000, 162) == (1, 162)  # enough programs already
