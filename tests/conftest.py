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
