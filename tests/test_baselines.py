"""The paper's comparisons end to end on stories260K: ITI (iti.py, scored by eval.py) and stage 2 on
heads chosen by LoFiT, at random, by ITI's probes, or from another task's heads.json (train.py).

Runs are tiny (8 TruthfulQA training questions, 1 epoch, 3 test questions) so each takes seconds.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import iti
import train
from adapter import load_adapter
from conftest import STORIES260K
from data import load_examples
from lofit import select_heads
from machinery.heads_file import random_ranking
from model import Llama
from tokenizer import load_tokenizer

K = 5
TINY_TRAIN = ["--epochs", "1", "--train-size", "8", "--batch-size", "4", "--limit-eval", "3", "--k", str(K),
              "--lr-a", "0.05", "--lr-v", "0.05", "--l1", "1e-3"]


def common(task, out):
    return ["--task", task, "--model", str(STORIES260K), "--out", str(out)]


def train_run(task, out, *extra):
    assert train.main([*common(task, out), *TINY_TRAIN, *extra]) == 0
    return json.loads((out / "heads.json").read_text()), json.loads((out / "metrics.json").read_text())


def heads_with_v(out) -> set[tuple[int, int]]:
    tensors = load_file(str(out / "adapter.safetensors"))
    assert "A" not in tensors  # stage 2 and ITI keep no scale
    return {tuple(h) for h, v in zip(tensors["heads"].tolist(), tensors["v"]) if v.any()}


@pytest.fixture(scope="module")
def iti_run(tmp_path_factory):
    """ITI on TruthfulQA fold 0: probes on 8 training questions, scored on the 82 validation ones."""
    out = tmp_path_factory.mktemp("iti")
    argv = [*common("truthfulqa", out), "--k", str(K), "--alpha", "15", "--train-size", "8", "--limit-eval", "3"]
    assert iti.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def stories():
    weights = STORIES260K
    return str(weights), load_tokenizer(str(weights))


def tiny_examples():
    return (load_examples("truthfulqa", "train", train_size=8, seed=42), load_examples("truthfulqa", "val"))


# ---------------------------------------------------------------------------------------------
# ITI, learning-free


def test_iti_cli_writes_the_iti_model_as_an_adapter(iti_run, stories):
    """The adapter holds v = 15 * sigma * u on the top-K probe heads, as computed here step by step."""
    weights, tokenizer = stories
    model = Llama.from_pretrained(weights)
    probes = iti.fit_iti(model, tokenizer, *tiny_examples())
    heads = json.loads((iti_run / "heads.json").read_text())
    expected = select_heads(probes.ranking(), k=K)
    assert [tuple(h) for h in heads["selected"]] == expected
    assert [(r["layer"], r["head"]) for r in heads["ranking"]] == [(r.layer, r.head) for r in probes.ranking()]
    tensors = load_file(str(iti_run / "adapter.safetensors"))
    assert [tuple(h) for h in tensors["heads"].tolist()] == expected and "A" not in tensors
    for (layer, head), v in zip(expected, tensors["v"]):
        torch.testing.assert_close(v, 15 * probes.sigma[layer, head] * probes.u[layer, head])
    metrics = json.loads((iti_run / "metrics.json").read_text())
    assert metrics["probe_texts"]["val"] == probes.n_val and metrics["test"]["n"] == 3


def test_eval_cli_scores_the_iti_adapter_as_iti_did(iti_run, tmp_path, capsys):
    adapter = iti_run / "adapter.safetensors"
    argv = [*common("truthfulqa", tmp_path)[:-2], "--adapter", str(adapter), "--limit", "3", "--quiet",
            "--out", str(tmp_path / "results.json")]
    assert eval_cli.main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    expected = json.loads((iti_run / "metrics.json").read_text())["test"]
    assert summary["mc1"] == expected["mc1"] and summary["mc2"] == pytest.approx(expected["mc2"], abs=1e-6)
    assert eval_cli.main([*argv[:-2], "--fold", "1"]) == 2  # trained on fold 0's questions
    assert "fold 0" in capsys.readouterr().err


def test_iti_alpha_zero_scores_like_the_base_model(tmp_path, stories):
    out = tmp_path / "alpha0"
    assert iti.main([*common("truthfulqa", out), "--k", "3", "--alpha", "0", "--train-size", "4",
                     "--limit-eval", "2"]) == 0
    weights, tokenizer = stories
    test = load_examples("truthfulqa", "test")[:2]
    base = eval_cli.evaluate(Llama.from_pretrained(weights), tokenizer, "truthfulqa", test, progress=False)
    assert json.loads((out / "metrics.json").read_text())["test"] == base["summary"]


@pytest.mark.parametrize("extra, message", [
    (["--k", "41"], "K = 41 is more than the model's 40 heads"),
    (["--k", "0"], "--k must be positive"),
    (["--task", "mquake"], "which only truthfulqa has"),
])
def test_iti_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    assert iti.main([*common("truthfulqa", tmp_path / "out"), "--train-size", "2", "--no-eval", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_iti_cli_refuses_another_runs_outputs(iti_run, capsys):
    assert iti.main([*common("truthfulqa", iti_run), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Stage 2 on heads chosen four ways


def test_random_ranking_is_reproducible_by_seed_and_covers_every_head_once():
    a, b, c = random_ranking(5, 8, 42), random_ranking(5, 8, 42), random_ranking(5, 8, 43)
    assert a == b and a != c
    assert sorted((layer, h) for layer, h, _ in a) == [(layer, h) for layer in range(5) for h in range(8)]
    assert all(score is None for _, _, score in a)
    for k in (1, 7, 40):
        assert select_heads(a, k=k) == [(layer, h) for layer, h, _ in a[:k]]
    with pytest.raises(ValueError, match="cannot select k=41"):
        select_heads(a, k=41)


def test_random_heads_run_end_to_end(tmp_path):
    heads, metrics = train_run("truthfulqa", tmp_path, "--head-selection", "random", "--seed", "7")
    expected = [[layer, h] for layer, h, _ in random_ranking(5, 8, 7)[:K]]
    assert heads["selected"] == expected and heads["source"] == "random heads, seed 7"
    assert heads_with_v(tmp_path) == {tuple(h) for h in expected}
    assert "stage1" not in metrics["train_loss"] and len(metrics["train_loss"]["stage2"]) == 1
    assert metrics["trainable_parameters"] == K * 8 and metrics["test"]["n"] == 3


def test_iti_heads_run_end_to_end(tmp_path, stories):
    heads, metrics = train_run("truthfulqa", tmp_path, "--head-selection", "iti")
    weights, tokenizer = stories
    probes = iti.fit_iti(Llama.from_pretrained(weights), tokenizer, *tiny_examples())
    expected = select_heads(probes.ranking(), k=K)
    assert [tuple(h) for h in heads["selected"]] == expected
    assert [r["score"] for r in heads["ranking"]] == pytest.approx([r.score for r in probes.ranking()])
    assert heads_with_v(tmp_path) == set(expected)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["flags"]["head_selection"] == "iti" and config["flags"]["stage"] == "2"
    assert "stage1" not in metrics["train_loss"] and metrics["test"]["n"] == 3


def test_lofit_heads_are_the_default(tmp_path):
    heads, metrics = train_run("truthfulqa", tmp_path, "--head-selection", "lofit")
    assert heads["source"] == "stage 1 of this run" and len(metrics["train_loss"]["stage1"]) == 1
    scores = [r["score"] for r in heads["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert heads_with_v(tmp_path) == {tuple(h) for h in heads["selected"]}
    model = Llama.from_pretrained(str(STORIES260K))
    assert load_adapter(tmp_path / "adapter.safetensors", model)["hparams"]["head_selection"] == "lofit"
    assert train.parse_args(common("truthfulqa", tmp_path)).head_selection == "lofit"


def test_heads_file_from_another_task(tmp_path, iti_run):
    """Task transfer: MQuAKE's stage 2 on the heads ITI chose for TruthfulQA."""
    heads, metrics = train_run("mquake", tmp_path, "--head-selection", "file",
                               "--heads", str(iti_run / "heads.json"))
    chosen_for_truthfulqa = json.loads((iti_run / "heads.json").read_text())["selected"]
    assert heads["selected"] == chosen_for_truthfulqa and heads["source"].startswith("--heads ")
    assert heads_with_v(tmp_path) == {tuple(h) for h in chosen_for_truthfulqa}
    assert metrics["test"]["task"] == "mquake" and metrics["test"]["n"] == 3
    assert train.parse_args([*common("mquake", tmp_path), "--heads", "x.json"]).head_selection == "file"


def test_random_heads_resume_to_the_same_adapter(tmp_path):
    argv = [*common("truthfulqa", tmp_path / "a"), *TINY_TRAIN, "--epochs", "2", "--head-selection", "random"]
    assert train.main(argv) == 0
    resumed = [*common("truthfulqa", tmp_path / "b"), *TINY_TRAIN, "--epochs", "2", "--head-selection", "random"]
    assert train.main([*resumed, "--stop-after", "1"]) == 0
    assert train.main([*resumed, "--resume"]) == 0
    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--head-selection", "iti", "--task", "mquake"], "only truthfulqa has"),
    (["--head-selection", "file"], "--head-selection file needs --heads FILE"),
    (["--head-selection", "random", "--heads", "x.json"], "--heads FILE goes with --head-selection file"),
    (["--head-selection", "random", "--stage", "1"], "--head-selection random replaces stage 1"),
    (["--head-selection", "lofit", "--stage", "2"], "--stage 2 needs --heads FILE"),
])
def test_bad_head_selection_flags_exit_2(tmp_path, capsys, extra, message):
    assert train.main([*common("truthfulqa", tmp_path / "out"), *TINY_TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_heads_file_of_a_model_with_another_shape_is_refused(tmp_path, capsys):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"model": "other", "n_layers": 2, "n_heads": 4,
                                 "ranking": [{"layer": 0, "head": 1, "score": 1.0}]}))
    assert train.main([*common("mquake", tmp_path / "out"), *TINY_TRAIN, "--k", "1", "--heads", str(heads)]) == 2
    assert "ranks the heads of a 2 x 4 model (other); this model has 5 layers x 8 heads" in capsys.readouterr().err
