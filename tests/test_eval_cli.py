"""eval.py's command line: results.json content, bad input (exit 2, nothing written), fold means."""
import json

import pytest

import eval as evaluation
from conftest import SPLITS_DIR, STORIES260K


@pytest.fixture(scope="module")
def paths():
    return {"model": str(STORIES260K), "data": str(SPLITS_DIR)}


def run_cli(paths, *extra):
    return evaluation.main(["--model", paths["model"], "--data-dir", paths["data"], "--quiet", *extra])


def test_truthfulqa_results_json(paths, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert run_cli(paths, "--task", "truthfulqa", "--limit", "3", "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert results["config"]["task"] == "truthfulqa" and results["config"]["dtype"] == "float32"
    assert results["summary"]["n"] == 3 and results["summary"]["fold"] == 0
    assert len(results["details"]) == 3
    row = results["details"][0]
    assert {"mc1", "mc2", "mc3", "true", "false", "question", "best_answer"} <= set(row)
    assert all(isinstance(c["score"], float) and c["score"] < 0 for c in row["true"] + row["false"])
    assert json.loads(capsys.readouterr().out) == results["summary"]  # the summary is printed too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.summary.md"]  # no temporary


def test_both_folds_report_the_mean(paths, tmp_path):
    out = tmp_path / "both.json"
    assert run_cli(paths, "--task", "truthfulqa", "--fold", "both", "--limit", "2", "--out", str(out)) == 0
    results = json.loads(out.read_text())
    folds = results["summary"]["folds"]
    assert [f["fold"] for f in folds] == [0, 1]
    for m in ("mc1", "mc2", "mc3"):
        assert results["summary"][m] == pytest.approx((folds[0][m] + folds[1][m]) / 2)
    assert [d["fold"] for d in results["details"]] == [0, 0, 1, 1]


def test_generation_task_results_json(paths, tmp_path):
    out = tmp_path / "mquake.json"
    assert run_cli(paths, "--task", "mquake", "--limit", "2", "--eval-batch-size", "2", "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert {"accuracy", "accuracy_stripped"} <= set(results["summary"])
    row = results["details"][0]
    assert {"generation", "prediction", "prediction_stripped", "correct", "correct_stripped", "references"} <= set(row)


@pytest.mark.parametrize("args, message", [
    (["--task", "squad"], "unknown task 'squad'"),
    (["--task", "mquake", "--fold", "1"], "--fold applies to truthfulqa only"),
    (["--task", "clutrr", "--split", "dev"], "unknown split 'dev'"),
    (["--task", "clutrr", "--adapter", "/nonexistent/adapter.safetensors"], "does not exist"),
    (["--task", "truthfulqa", "--fold", "both", "--adapter", __file__], "one --adapter per fold"),
    (["--task", "clutrr", "--limit", "0"], "--limit must be positive"),
    (["--task", "clutrr", "--eval-batch-size", "0"], "--eval-batch-size must be positive"),
    (["--task", "clutrr", "--tokenizer", "tokenizer.json"], "has no tokenizer.json"),
])
def test_bad_input_exits_2_with_one_message(paths, tmp_path, capsys, args, message):
    out = tmp_path / "results.json"
    assert run_cli(paths, *args, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_model_and_output_directory(paths, tmp_path, capsys):
    assert evaluation.main(["--task", "clutrr", "--model", str(tmp_path / "nope"), "--data-dir", paths["data"],
                            "--quiet"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert run_cli(paths, "--task", "clutrr", "--out", str(tmp_path / "missing" / "r.json")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(paths, "--task", "clutrr", "--out", str(tmp_path)) == 2  # checked before any work
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_results_are_written_atomically(tmp_path):
    out = tmp_path / "results.json"
    out.write_text('{"old": true}')
    with pytest.raises(TypeError):  # not JSON-serialisable: fails halfway through dumping
        evaluation.write_json_atomically(out, {"summary": {"a": 1}, "bad": object()})
    assert json.loads(out.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_cuda_requested_where_there_is_none(paths, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_cli(paths, "--task", "clutrr", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
