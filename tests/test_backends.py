"""The backend registry: names, defaults, the context manager, and clear errors."""
import pytest
import torch

import grl_kernels as G
from grl_kernels.backends import registry


def test_reference_always_available():
    assert "reference" in G.available_backends()
    names = [n for n, _, _ in G.backend_info()]
    assert "reference" in names


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'; expected 'auto' or one of"):
        G.set_default_backend("nope")
    with pytest.raises(ValueError, match="unknown backend"):
        with G.use_backend("nope"):
            pass
    m = G.WindowAttention((8, 8), 4, 1, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        m(torch.randn(1, 64, 3), (8, 8))


def test_use_backend_nests_and_restores():
    assert G.get_default_backend() == "auto"
    with G.use_backend("reference"):
        assert G.get_default_backend() == "reference"
        with G.use_backend("auto"):
            assert G.get_default_backend() == "auto"
        assert G.get_default_backend() == "reference"
    assert G.get_default_backend() == "auto"


def test_set_default_backend():
    try:
        G.set_default_backend("reference")
        assert G.get_default_backend() == "reference"
    finally:
        G.set_default_backend("auto")


def test_unavailable_backend_is_a_clear_error():
    fake = registry.Backend(
        name="_test_unavailable", stripe=None, window=None, devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}), priority=99, check_available=lambda: (False, "no compiler here"),
    )
    registry.register_backend(fake)
    try:
        assert "_test_unavailable" not in G.available_backends()
        with pytest.raises(G.BackendUnavailableError, match="no compiler here"):
            registry.resolve_backend("_test_unavailable", torch.device("cpu"), torch.float32)
        # "auto" skips it even though its priority is the highest
        assert registry.resolve_backend("auto", torch.device("cpu"), torch.float32).name != "_test_unavailable"
    finally:
        registry._REGISTRY.pop("_test_unavailable")


def test_explicit_backend_wrong_device_is_an_error():
    fake = registry.Backend(
        name="_test_cuda_only", stripe=None, window=None, devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32}), priority=-1,
    )
    registry.register_backend(fake)
    try:
        with pytest.raises(ValueError, match="does not handle torch.float32 tensors on cpu"):
            registry.resolve_backend("_test_cuda_only", torch.device("cpu"), torch.float32)
    finally:
        registry._REGISTRY.pop("_test_cuda_only")


def _best(device, dtype):
    """The documented rule: the available backend of highest priority that takes the inputs."""
    ok = [b for b in sorted(registry._REGISTRY.values(), key=lambda b: -b.priority)
          if b.supports(device, dtype) and b.availability()[0]]
    return ok[0].name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_auto_on_cpu_picks_the_best_backend(dtype):
    cpu = torch.device("cpu")
    got = registry.resolve_backend("auto", cpu, dtype).name
    assert got == _best(cpu, dtype)
    if dtype != torch.float16 and "cpu" in G.available_backends():
        assert got == "cpu"  # the fused kernels (priority 20) take float64 / float32 / bfloat16
    if dtype == torch.float16 and "triton" not in [b for b in G.available_backends()
                                                   if registry._REGISTRY[b].supports(cpu, dtype)]:
        assert got == "reference"  # no compiled CPU backend takes float16
