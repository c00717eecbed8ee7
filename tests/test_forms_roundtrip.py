"""The example forms' round trips that LoFiT has: --resume after a stop gives the uninterrupted adapter
bit for bit, and two torchrun processes give one process's adapter to float rounding."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, SPLITS_DIR, STORIES260K

FORMS = ["examples/red.py", "examples/steer_last_token.py", "examples/jola.py"]
FLAGS = ["--task", "mquake", "--model", str(STORIES260K), "--data-dir", str(SPLITS_DIR), "--epochs", "2",
         "--train-size", "16", "--batch-size", "5", "--micro-batch-size", "2", "--limit-eval", "2", "--k", "6",
         "--lr-a", "0.05", "--lr-v", "0.05", "--l1", "1e-3", "--no-baseline", "--no-eval"]


def args(form, out, *extra):
    return [*FLAGS, "--intervention", str(ROOT / form), "--out", str(out), *extra]


def adapter(out):
    return load_file(str(out / "adapter.safetensors"))


@pytest.mark.parametrize("form", FORMS)
def test_resume_after_a_stop_gives_the_uninterrupted_adapter(tmp_path, form):
    assert train.main(args(form, tmp_path / "full")) == 0
    stopped = tmp_path / "stopped"
    stop_after = "1" if form.endswith("jola.py") else "3"  # inside stage 2 (JoLA has no stage 1)
    assert train.main(args(form, stopped, "--stop-after", stop_after)) == 0
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "adapter.safetensors").exists()
    assert train.main(args(form, stopped, "--resume")) == 0
    full, resumed = adapter(tmp_path / "full"), adapter(stopped)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


@pytest.mark.parametrize("form", FORMS)
def test_two_processes_give_one_process_adapter(tmp_path, form):
    assert train.main(args(form, tmp_path / "one")) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *args(form, tmp_path / "two")], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
