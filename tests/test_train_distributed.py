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

from conftest import ROOT, shared_path

import train

FLAGS = ["--epochs", "2", "--train-size", "16", "--batch-size", "5", "--micro-batch-size", "2",
         "--limit-eval", "2", "--k", "6", "--lr-a", "0.05", "--lr-v", "0.05", "--l1", "1e-3"]


def flags(out):
    return ["--task", "truthfulqa", "--model", str(shared_path("weights", "stories260K_hf")),
            "--data-dir", str(shared_path("datasets")), "--out", str(out), *FLAGS]


def test_two_processes_match_one(tmp_path):
    assert train.main(flags(tmp_path / "one")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *flags(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "config.json").read_text())["world_size"] == 2

    heads_one, heads_two = (json.loads((d / "heads.json").read_text()) for d in (one, two))
    assert heads_two["selected"] == heads_one["selected"]
    assert [(r["layer"], r["head"]) for r in heads_two["ranking"]] == \
        [(r["layer"], r["head"]) for r in heads_one["ranking"]]
    assert [r["score"] for r in heads_two["ranking"]] == \
        pytest.approx([r["score"] for r in heads_one["ranking"]], abs=1e-5)

    adapter_one, adapter_two = (load_file(str(d / "adapter.safetensors")) for d in (one, two))
    assert adapter_one.keys() == adapter_two.keys()
    assert any(t.abs().max() > 1e-3 for t in adapter_one.values())  # training moved the offsets
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=0, atol=1e-5, msg=name)

    metrics_one, metrics_two = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for stage in ("stage1", "stage2"):
        assert metrics_two["train_loss"][stage] == pytest.approx(metrics_one["train_loss"][stage], abs=1e-5)
    for metric in ("mc1", "mc2", "mc3"):
        assert metrics_two["test"][metric] == pytest.approx(metrics_one["test"][metric], abs=1e-5)
    # Only rank 0 shows progress: one set of epoch summaries in the combined output.
    assert done.stdout.count("stage 2 epoch 2/2: mean loss") == 1
