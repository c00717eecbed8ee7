"""The end-of-run report (machinery/report.py): base vs tuned with paired intervals, the base scores' cache,
--no-baseline, phase times and versions in the outputs, loss.png, and eval.py --compare."""
import json

import pytest
from test_train import has_matplotlib, tiny_args

import eval as evaluation
import train
from conftest import STORIES260K
from machinery.report import compare, per_question


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache):
    """A tiny clutrr run with an empty baseline cache; then a second run that should find it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOFIT_CACHE", str(cache))
        out = tmp_path_factory.mktemp("report_run")
        assert train.main(tiny_args("clutrr", out, "--overwrite")) == 0
        again = tmp_path_factory.mktemp("report_again")
        assert train.main(tiny_args("clutrr", again, "--overwrite")) == 0
    return out, again


def test_report_compares_tuned_with_base(first_run, cache):
    out, _ = first_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["seconds"]) == {"load", "stage 1", "stage 2", "evaluation", "base model"}
    assert metrics["base"]["cached"] is False and metrics["base"]["summary"]["n"] == 4
    stats = metrics["comparison"]["accuracy"]
    assert stats["n"] == 4 and stats["mean_b"] == metrics["test"]["accuracy"]
    assert stats["mean_a"] == metrics["base"]["summary"]["accuracy"]
    assert stats["interval_diff"][0] <= stats["mean_diff"] <= stats["interval_diff"][1]
    assert 0 <= stats["p_value"] <= 1 and stats["test"] == "McNemar"
    summary = (out / "summary.md").read_text()
    for words in ("| accuracy |", "tuned - base", "computed in this run", "stage 1 loss per epoch", "heads: K = 6",
                  "time: load", "python eval.py --compare", "python export.py", "--split val"):
        assert words in summary, words
    assert len(list(cache.glob("baselines/*.json"))) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["code_version"] and config["versions"]["torch"] and "safetensors" in config["versions"]


def test_second_run_reads_the_cached_base_scores(first_run):
    out, again = first_run
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (out, again))
    assert second["base"]["cached"] is True and second["base"]["summary"] == first["base"]["summary"]
    assert second["base"]["computed_at"] == first["base"]["computed_at"]
    assert "read from the cache" in (again / "summary.md").read_text()


def test_no_baseline_reports_the_tuned_scores_alone(tmp_path, capsys):
    assert train.main(tiny_args("clutrr", tmp_path, "--no-baseline", "--epochs", "1")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "base" not in metrics and "comparison" not in metrics and "base model" not in metrics["seconds"]
    assert metrics["intervals"]["accuracy"]["mean"] == metrics["test"]["accuracy"]
    text = capsys.readouterr().out
    assert "not scored (--no-baseline)" in text and (tmp_path / "summary.md").read_text() in text


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib is not installed")
def test_loss_png_beside_heads_png(first_run):
    out, _ = first_run
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "heads.png").is_file()


# ---------------------------------------------------------------------------------------------
# Paired values and eval.py --compare


def test_per_question_pairs_on_shared_questions():
    a = [{"id": 1, "correct": True, "correct_stripped": True}, {"id": 2, "correct": False, "correct_stripped": True},
         {"id": 3, "correct": False, "correct_stripped": False}]
    b = [{"id": 3, "correct": True, "correct_stripped": True}, {"id": 2, "correct": True, "correct_stripped": True}]
    assert per_question(a)["accuracy"] == {"1": 1.0, "2": 0.0, "3": 0.0}
    result = compare(a, b, n_resamples=200)
    assert result["accuracy"]["n"] == 2 and result["accuracy"]["mean_diff"] == 1.0
    assert result["accuracy_stripped"]["mean_diff"] == 0.5 and result["accuracy"]["test"] == "McNemar"
    mc = [{"id": 1, "fold": 0, "mc1": 1.0, "mc2": 0.6, "mc3": 0.5}, {"id": 2, "fold": 0, "mc1": 0.0, "mc2": 0.3,
                                                                       "mc3": 0.0}]
    worse = [{**row, "mc2": row["mc2"] - 0.1} for row in mc]
    result = compare(mc, worse, n_resamples=200)
    assert result["mc2"]["mean_diff"] == pytest.approx(-0.1) and result["mc2"]["test"] == "sign"
    assert result["mc1"]["p_value"] == 1.0
    # train.py's rows carry no fold, eval.py's TruthfulQA rows do: fold 1's questions still pair
    from_eval = [{**row, "fold": 1} for row in worse]
    assert compare([{k: v for k, v in row.items() if k != "fold"} for row in mc], from_eval,
                   n_resamples=200)["mc2"]["n"] == 2


@pytest.fixture(scope="module")
def two_evals(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    common = ["--model", str(STORIES260K), "--quiet", "--no-baseline"]
    assert evaluation.main([*common, "--task", "truthfulqa", "--limit", "4", "--out", str(d / "a.json")]) == 0
    assert evaluation.main([*common, "--task", "truthfulqa", "--limit", "3", "--out", str(d / "b.json")]) == 0
    assert evaluation.main([*common, "--task", "truthfulqa", "--fold", "1", "--limit", "3",
                            "--out", str(d / "fold1.json")]) == 0
    return d


def test_compare_prints_a_table_and_writes_json(two_evals, capsys):
    d = two_evals
    capsys.readouterr()
    assert evaluation.main(["--compare", str(d / "a.json"), str(d / "b.json"), "--out", str(d / "ab.json")]) == 0
    table = capsys.readouterr().out
    assert "| mc2 |" in table and "3 questions" in table
    result = json.loads((d / "ab.json").read_text())
    assert result["task"] == "truthfulqa" and result["fold"] == 0 and result["split"] == "test"
    for metric in ("mc1", "mc2", "mc3"):  # the same model on the same 3 questions: no difference
        stats = result["metrics"][metric]
        assert stats["n"] == 3 and abs(stats["mean_diff"]) < 1e-6 and stats["p_value"] == 1.0


def test_compare_refuses_another_fold_in_one_line(two_evals, capsys):
    d = two_evals
    assert evaluation.main(["--compare", str(d / "a.json"), str(d / "fold1.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fold 0" in err and "fold 1" in err and len(err.splitlines()) == 1


def test_compare_reads_run_directories(first_run, capsys):
    out, again = first_run
    capsys.readouterr()
    assert evaluation.main(["--compare", str(out), str(again)]) == 0
    assert "| accuracy |" in capsys.readouterr().out


def test_eval_with_adapter_reports_against_the_cached_base(first_run, cache, tmp_path, monkeypatch, capsys):
    out, _ = first_run
    monkeypatch.setenv("LOFIT_CACHE", str(cache))  # train.py scored this base on these 4 questions already
    results_file = tmp_path / "results.json"
    assert evaluation.main(["--task", "clutrr", "--model", str(STORIES260K), "--limit", "4", "--quiet",
                            "--adapter", str(out / "adapter.safetensors"), "--out", str(results_file)]) == 0
    results = json.loads(results_file.read_text())
    trained = json.loads((out / "metrics.json").read_text())
    assert results["base"][0]["cached"] is True and results["base"][0]["summary"] == trained["base"]["summary"]
    assert results["comparison"]["accuracy"]["mean_b"] == trained["test"]["accuracy"]
    report = (tmp_path / "results.summary.md").read_text()
    assert "read from the cache" in report and report in capsys.readouterr().err
