"""Shared test helpers: fixture location, deterministic seeding, comparison with scaled tolerances."""
import os
import pathlib

import pytest
import torch

FIXTURES = pathlib.Path(os.environ.get("GRL_FIXTURES", pathlib.Path(__file__).parent / "fixtures"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixture folder {FIXTURES} is missing (set GRL_FIXTURES)")
    return FIXTURES


def max_scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|): absolute error for O(1) values, relative for large ones."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def pytest_sessionstart(session):
    """GRL_KERNELS_REQUIRE=cpu[,triton,...]: a required backend that is unavailable fails the run.

    Several test files build their per-backend cases from available_backends() at collection
    time; without this, a failed extension build would silently shrink the suite instead of
    failing it. CI (.ci/run) requires "cpu".
    """
    wanted = [n.strip() for n in os.environ.get("GRL_KERNELS_REQUIRE", "").split(",") if n.strip()]
    if not wanted:
        return
    import grl_kernels as G

    info = {name: (ok, why) for name, ok, why in G.backend_info()}
    unknown = [n for n in wanted if n not in info]
    missing = [f"{n}: {info[n][1]}" for n in wanted if n in info and not info[n][0]]
    if unknown:
        pytest.exit(f"GRL_KERNELS_REQUIRE names unknown backends {unknown}; expected some of {sorted(info)}", returncode=4)
    if missing:
        pytest.exit("GRL_KERNELS_REQUIRE: required backend(s) unavailable -- " + "; ".join(missing), returncode=1)
