"""torchrun with 2 processes (gloo, CPU) against one process, the frozen base sharded (FSDP2) or replicated.

Same flags, so the same global batches: the ranking, the selected heads, the adapter and the test
metrics must agree to float rounding. The batch size 5 on 16 examples leaves a last batch of one
example, so one rank runs a zero-weight filler there; micro-batches of 2 add accumulation. Every
run goes through tests/distributed_probe.py, which records at every backward whether a sharded
block still holds gathered weights and whether any base tensor requires or holds a gradient, and
every forward call (the reference pass and evaluation must be split across ranks).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, STORIES260K, data_dir_args

PROBE = str(ROOT / "tests" / "distributed_probe.py")
FLAGS = ["--epochs", "2", "--train-size", "16", "--batch-size", "5", "--micro-batch-size", "2",
         "--limit-eval", "3", "--eval-batch-size", "2", "--k", "6", "--lr-a", "0.05", "--lr-v", "0.05",
         "--l1", "1e-3"]


def flags(task, out, *extra):
    return ["--task", task, "--model", str(STORIES260K), *data_dir_args(task), "--out", str(out), *FLAGS, *extra]


def torchrun(argv) -> subprocess.CompletedProcess:
    """train.py under torchrun with 2 processes (no probe); it must succeed."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def probe(report, script, argv, processes=2) -> list[dict]:
    """Run train.py or eval.py through the probe (torchrun when processes > 1); each rank's report."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launch = launch if processes > 1 else []
    done = subprocess.run([sys.executable, *launch, PROBE, str(report), script, *argv], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return [json.loads(open(f"{report}.{rank}").read()) for rank in range(processes)]


def assert_clean_backwards(reports):
    """At every backward: no sharded block holds gathered weights, no base tensor requires or holds a gradient."""
    for rank in reports:
        assert len(rank["backward"]) >= 8  # both stages, every micro-batch
        for check in rank["backward"]:
            assert check["gathered"] == 0, check
            assert check["with_grad"] == [], check


def no_grad_rows(report) -> int:
    return sum(rows for grad, rows in report["calls"] if not grad)


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


@pytest.fixture(scope="module")
def one_process_dpo(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_one")
    [report] = probe(out / "report", "train", flags("truthfulqa", out / "run"), processes=1)
    return out / "run", report


@pytest.mark.parametrize("sharding", ["shard", "replicate"])
def test_two_processes_match_one_dpo(tmp_path, one_process_dpo, sharding):
    """TruthfulQA (DPO): the whole pipeline, evaluation included, under torchrun, either way of holding the base."""
    one, one_report = one_process_dpo
    reports = probe(tmp_path / "report", "train", flags("truthfulqa", tmp_path / "two", "--sharding", sharding))
    assert_same_run(one, tmp_path / "two")
    assert_clean_backwards([one_report] + reports)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["sharding"] == {"choice": sharding, "reason": f"--sharding {sharding}"}
    # The reference pass (16 pairs) and evaluation (3 questions) are split: each rank runs about half the rows.
    for report in reports:
        assert no_grad_rows(report) <= 0.6 * no_grad_rows(one_report)
    if sharding == "shard":  # every forward joined by both ranks; each holds half of every block tensor
        assert len(reports[0]["calls"]) == len(reports[1]["calls"])
        for report in reports:
            assert report["load"]["n_sharded"] == 9 * 5 and report["load"]["max_share"] == 0.5
            assert report["load"]["max_abs_diff"] == 0.0  # the slices read are exactly the checkpoint's
    else:
        assert all(report["load"] is None for report in reports)


def test_two_processes_checkpoint_resumes_in_one_ce(tmp_path):
    """MQuAKE (CE), sharded: 2 processes stop inside stage 2; one process resumes; same as one process throughout."""
    assert train.main(flags("mquake", tmp_path / "one")) == 0
    reports = probe(tmp_path / "report", "train", flags("mquake", tmp_path / "two", "--stop-after", "3",
                                                        "--sharding", "shard"))
    assert_clean_backwards(reports)
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and not (tmp_path / "two" / "metrics.json").exists()
    assert train.main(flags("mquake", tmp_path / "two", "--resume")) == 0
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("task", ["mquake"])  # TruthfulQA's split scoring: test_two_processes_match_one_dpo
def test_distributed_evaluation_matches_one_process(tmp_path, task):
    """eval.py under torchrun, base sharded: 5 examples in batches of 2 give rank 0 two batches of
    greedy decoding and rank 1 one, so rank 1 must join rank 0's extra forward passes (lockstep) or
    the job would hang."""
    argv = ["--task", task, "--model", str(STORIES260K),
            "--limit", "5", "--eval-batch-size", "2", "--quiet"]
    [one_report] = probe(tmp_path / "one_report", "eval", argv + ["--out", str(tmp_path / "one.json")], processes=1)
    reports = probe(tmp_path / "report", "eval", argv + ["--out", str(tmp_path / "two.json"), "--sharding", "shard"])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["config"]["world_size"] == 2 and two["config"]["sharding"] == "shard"
    assert two["summary"] == pytest.approx(one["summary"], abs=1e-5)
    assert len(two["details"]) == len(one["details"]) == 5
    for a, b in zip(one["details"], two["details"]):
        if task == "truthfulqa":
            assert [c["score"] for c in b["true"] + b["false"]] == \
                pytest.approx([c["score"] for c in a["true"] + a["false"]], abs=1e-4)
        else:
            assert b["generation"] == a["generation"]
    assert len(reports[0]["calls"]) == len(reports[1]["calls"])  # lockstep: the same forward calls on both ranks
    assert max(no_grad_rows(r) for r in reports) < no_grad_rows(one_report)  # and each did part of the work


def test_iti_heads_two_processes_sharded(tmp_path):
    """Stage 2 on ITI's heads (no stage 1 first): the base stays frozen at every backward, and the
    probe ranking (rank 0's, broadcast) and the adapter are those of one process."""
    argv = ["--task", "truthfulqa", "--model", str(STORIES260K),
            "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--limit-eval",
            "3", "--eval-batch-size", "2", "--k", "4", "--lr-v", "0.05", "--head-selection", "iti"]
    assert train.main(argv + ["--out", str(tmp_path / "one")]) == 0
    reports = probe(tmp_path / "report", "train", argv + ["--out", str(tmp_path / "two"), "--sharding", "shard"])
    assert all(len(r["backward"]) == 4 for r in reports)  # 2 steps x (before, after)
    for rank in reports:
        for check in rank["backward"]:
            assert check["gathered"] == 0 and check["with_grad"] == [], check
    one, two = (json.loads((tmp_path / d / "heads.json").read_text()) for d in ("one", "two"))
    assert two["selected"] == one["selected"]
    adapter_one, adapter_two = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=0, atol=1e-5, msg=name)
