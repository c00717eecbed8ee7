"""benchmarks/vs_original.py's reduced workload: both sides read the same first rows of fold 0's splits.

The timed runs need the original's code and venv (not here); what is checked is the data both sides
get: the truncated copies the original reads, and that ours (through timed_train.py) accepts those
very files and reads exactly their rows, no more and no other.
"""
import csv
import sys

import pytest

from conftest import ROOT, SPLITS_DIR

sys.path.insert(0, str(ROOT / "benchmarks"))
import timed_train  # noqa: E402
import vs_original  # noqa: E402

from data import load_examples  # noqa: E402
from data.common import DataError  # noqa: E402
from data.files import FILES  # noqa: E402


@pytest.fixture
def files_restored():
    saved = dict(FILES)
    yield
    FILES.clear()
    FILES.update(saved)


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, strict=True))


def test_full_sizes_write_nothing(tmp_path):
    assert vs_original.reduced_data(tmp_path, dict(vs_original.FULL_SIZES), SPLITS_DIR) is None
    assert not (tmp_path / "data").exists()


def test_reduced_files_are_the_first_rows(tmp_path):
    sizes = {"train": 5, "val": 3, "test": 4}
    out = vs_original.reduced_data(tmp_path, sizes, SPLITS_DIR)
    for split, n in sizes.items():
        name = f"truthfulqa/fold_0_{split}_seed_42.csv"
        assert rows(out / name) == rows(SPLITS_DIR / name)[:1 + n]


def test_ours_reads_the_same_reduced_files(tmp_path, files_restored):
    out = vs_original.reduced_data(tmp_path, {"train": 7, "val": 2, "test": 3}, SPLITS_DIR)
    with pytest.raises(DataError, match="sha256"):  # unregistered, a truncated file is refused
        load_examples("truthfulqa", "train", fold=0, data_dir=out, train_size=0, seed=42)
    sizes = {"train": 7, "val": 2, "test": 3}
    def load(split, data_dir):
        return load_examples("truthfulqa", split, fold=0, data_dir=data_dir,
                             **({"train_size": 0, "seed": 42} if split == "train" else {}))
    official = {split: load(split, SPLITS_DIR)[:n] for split, n in sizes.items()}
    timed_train.register_data_files(out)  # from here on, only the reduced files pass the checks
    for split in sizes:
        reduced = load(split, out)
        assert reduced == official[split]


def test_candidate_count_matches_the_loader():
    test = load_examples("truthfulqa", "test", fold=0, data_dir=SPLITS_DIR)
    expected = sum(len(e.true_answers) + len(e.false_answers) for e in test)
    assert vs_original.mc_candidates(SPLITS_DIR) == expected == 3096
