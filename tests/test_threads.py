"""--threads: one thread by default for a small model (docs/speed.md), the flag or OMP_NUM_THREADS otherwise."""
import pytest
import torch
from test_train import tiny_args

import train
from conftest import STORIES260K
from machinery.checkpoints import read_model_config
from machinery.flags import set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_small_model_gets_one_thread_unless_asked(monkeypatch, restore_threads):
    config = read_model_config(str(STORIES260K))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert set_threads(None, config) == 1
    assert set_threads(2, config) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(None, config) == 2  # OMP_NUM_THREADS is left to torch


def test_banner_says_the_thread_count(tmp_path, capsys, restore_threads):
    torch.set_num_threads(2)
    assert train.main(tiny_args("clutrr", tmp_path, "--threads", "1", "--epochs", "1", "--no-baseline")) == 0
    assert "1 thread(s)" in capsys.readouterr().out and torch.get_num_threads() == 1
    assert train.main(tiny_args("clutrr", tmp_path / "b", "--threads", "0")) == 2
    assert "--threads must be positive" in capsys.readouterr().err
