"""torchrun with 2 processes (gloo, CPU, base weights sharded with FSDP2) against one process.

Same flags, so the same global batches: the ranking, the selected heads, the adapter and the test
metrics must agree to float rounding. The batch size 5 on 16 examples leaves a last batch of one
example, so one rank runs a zero-weight filler there; micro-batches of 2 add accumulation.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, shared_path

FLAGS = ["--epochs", "2", "--train-size", "16", "--batch-size", "5", "--micro-batch-size", "2",
         "--limit-eval", "2", "--k", "6", "--lr-a", "0.05", "--lr-v", "0.05", "--l1", "1e-3"]


def flags(task, out, *extra):
    return ["--task", task, "--model", str(shared_path("weights", "stories260K_hf")),
            "--data-dir", str(shared_path("datasets")), "--out", str(out), *FLAGS, *extra]


def torchrun(argv) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def assert_same_run(one, two):
    heads_one, heads_two = (json.loads((d / "heads.json").read_text()) for d in (one, two))
    assert heads_two["selected"] == heads_one["selected"]
    assert [(r["layer"], r["head"]) for r in heads_two["ranking"]] == \
        [(r["layer"], r["head"]) for r in heads_one["ranking"]]
    assert [r["score"] for r in heads_two["ranking"]] == \
        pytest.approx([r["score"] for r in heads_one["ranking"]], abs=1e-5)

    adapter_one, adapter_two = (load_file(str(d / "adapter.safetensors")) for d in (one, two))
    assert adapter_one.keys() == adapter_two.keys()
    assert adapter_one["v"].abs().max() > 1e-2  # training moved the offsets well beyond the 1e-3 init
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=0, atol=1e-5, msg=name)

    metrics_one, metrics_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for stage in ("stage1", "stage2"):
        assert metrics_two["train_loss"][stage] == pytest.approx(metrics_one["train_loss"][stage], abs=1e-5)
    assert metrics_two["test"] == pytest.approx(metrics_one["test"], abs=1e-5)


def test_two_processes_match_one_dpo(tmp_path):
    """TruthfulQA (DPO): the whole pipeline, evaluation included, under torchrun."""
    assert train.main(flags("truthfulqa", tmp_path / "one")) == 0
    done = torchrun(flags("truthfulqa", tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # Only rank 0 reports: one set of epoch summaries in the combined output.
    assert done.stdout.count("stage 2 epoch 2/2: mean loss") == 1


def test_two_processes_checkpoint_resumes_in_one_ce(tmp_path):
    """MQuAKE (CE): 2 processes stop inside stage 2; one process resumes; same as one process throughout."""
    assert train.main(flags("mquake", tmp_path / "one")) == 0
    torchrun(flags("mquake", tmp_path / "two", "--stop-after", "3"))
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and not (tmp_path / "two" / "metrics.json").exists()
    assert train.main(flags("mquake", tmp_path / "two", "--resume")) == 0
    assert_same_run(tmp_path / "one", tmp_path / "two")
