"""Shared test fixtures: paths to ../shared (real data and weights) and a fixed seed."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

# The test models are tiny: one thread is faster than paying for thread hand-offs on every op.
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (tests that need the shared data and weights run where ../shared exists)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
