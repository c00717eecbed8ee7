"""Shared test fixtures: the committed test data and model, paths to ../shared, and a fixed seed.

In the repository, so on every clone:
- SPLITS_DIR: LoFiT's official splits of TruthfulQA, MQuAKE and CLUTRR (data/splits/), which the data
  loaders read by default;
- STORIES260K: the real pretrained stories260K Llama (llama2.c, MIT) in HF layout
  (tests/assets/stories260K/).
Only in ../shared (skipped, with the reason, where it is absent): Meta's Llama-2 tokenizer, the
SmolLM2 GGUF file, and the SIQA / ARC-Challenge / BoolQ files (which otherwise download).
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
SPLITS_DIR = ROOT / "data" / "splits"
STORIES260K = ROOT / "tests" / "assets" / "stories260K"

# The test models are tiny: one thread is faster than paying for thread hand-offs on every op.
torch.set_num_threads(1)


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (tests that need the Llama-2 tokenizer, the SmolLM2 GGUF or the "
                    f"SIQA/ARC/BoolQ files run where ../shared exists)")
    return path


LOFIT_TASKS = ("truthfulqa", "mquake", "clutrr")


def data_dir_for(task: str) -> Path | None:
    """data_dir for `task`: None (the loaders' default: the committed splits) for LoFiT's three tasks,
    ../shared/datasets for SIQA / ARC-Challenge / BoolQ (skipping the test where it is absent)."""
    return None if task in LOFIT_TASKS else shared_path("datasets")


def data_dir_args(task: str) -> list[str]:
    """The same as command-line arguments: [] or ["--data-dir", ../shared/datasets]."""
    directory = data_dir_for(task)
    return [] if directory is None else ["--data-dir", str(directory)]


@pytest.fixture(autouse=True, scope="session")
def _baseline_cache(tmp_path_factory):
    """The base model's cached scores (machinery/report.py) go to a temporary directory, not ~/.cache/lofit."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LOFIT_CACHE", str(tmp_path_factory.mktemp("lofit_cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
