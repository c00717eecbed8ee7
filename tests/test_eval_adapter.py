"""eval.py with a LoFiT adapter equals eval.py on the merged export of the same adapter (stories260K).

The adapter's offsets are random and large, so the adapted model's scores and generations differ
clearly from the base model's; that difference is checked too, so a CLI that silently ignored
--adapter would fail here.
"""
import json

import pytest
import torch

import eval as evaluation
from adapter import export_merged, save_adapter
from conftest import SPLITS_DIR, STORIES260K
from model import Llama

HEADS = [(0, 1), (1, 5), (2, 0), (3, 3), (4, 7)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base model dir, adapter file, merged checkpoint dir, data dir)."""
    stories = STORIES260K
    data = SPLITS_DIR
    out = tmp_path_factory.mktemp("adapter")
    model = Llama.from_pretrained(str(stories))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, head in HEADS:
            attn = model.layers[layer].self_attn
            attn.lofit_A[head] = 0.5 * torch.randn(attn.head_dim, generator=g)
            attn.lofit_v[head] = 1.0 * torch.randn(attn.head_dim, generator=g)
    save_adapter(out / "adapter.safetensors", model, HEADS, stage=2, task="truthfulqa", hparams={})
    merged = export_merged(model, out / "merged", tokenizer_dir=stories)
    return str(stories), str(out / "adapter.safetensors"), str(merged), str(data)


def run(tmp_path, name, model, data, task, *extra):
    out = tmp_path / f"{name}.json"
    assert evaluation.main(["--task", task, "--model", model, "--data-dir", data, "--quiet",
                            "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def candidate_scores(results):
    return [c["score"] for row in results["details"] for c in row["true"] + row["false"]]


def test_truthfulqa_adapter_equals_merged_export(exported, tmp_path):
    base_dir, adapter, merged, data = exported
    with_adapter = run(tmp_path, "adapter", base_dir, data, "truthfulqa", "--limit", "4", "--adapter", adapter)
    with_merge = run(tmp_path, "merged", merged, data, "truthfulqa", "--limit", "4")
    base = run(tmp_path, "base", base_dir, data, "truthfulqa", "--limit", "4")
    assert candidate_scores(with_adapter) == pytest.approx(candidate_scores(with_merge), abs=1e-4)
    for m in ("mc1", "mc2", "mc3"):
        assert with_adapter["summary"][m] == pytest.approx(with_merge["summary"][m], abs=1e-6)
    gaps = [abs(a - b) for a, b in zip(candidate_scores(with_adapter), candidate_scores(base))]
    assert min(gaps) > 1e-2  # the adapter really changes every score
    assert with_adapter["config"]["adapter"] == [adapter]


def test_generation_adapter_equals_merged_export(exported, tmp_path):
    base_dir, adapter, merged, data = exported
    with_adapter = run(tmp_path, "adapter", base_dir, data, "clutrr", "--limit", "4", "--adapter", adapter)
    with_merge = run(tmp_path, "merged", merged, data, "clutrr", "--limit", "4")
    base = run(tmp_path, "base", base_dir, data, "clutrr", "--limit", "4")
    assert with_adapter["summary"] == with_merge["summary"]
    assert with_adapter["details"] == with_merge["details"]  # the same text, example by example
    assert [r["generation"] for r in with_adapter["details"]] != [r["generation"] for r in base["details"]]


def test_adapter_of_another_architecture_exits_2(exported, tmp_path, capsys):
    from hf_reference import make_checkpoint
    base_dir, _, _, data = exported
    other_dir, _ = make_checkpoint(tmp_path / "other", "llama2", vocab_size=512)
    other = Llama.from_pretrained(str(other_dir))
    save_adapter(tmp_path / "other.safetensors", other, [(0, 0)], stage=2, task="clutrr")
    capsys.readouterr()  # drop transformers' own progress output
    out = tmp_path / "results.json"
    assert evaluation.main(["--task", "clutrr", "--model", base_dir, "--data-dir", data, "--quiet",
                            "--adapter", str(tmp_path / "other.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter") and "does not fit" in err
    assert not out.exists()


def test_a_file_that_is_not_an_adapter_exits_2(exported, tmp_path, capsys):
    base_dir, _, _, data = exported
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("not a safetensors file")
    assert evaluation.main(["--task", "clutrr", "--model", base_dir, "--data-dir", data, "--quiet",
                            "--adapter", str(bogus)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_adapter_of_the_other_truthfulqa_fold_exits_2(exported, tmp_path, capsys):
    """Fold 1's test questions are fold 0's training questions: refuse that pairing."""
    base_dir, _, _, data = exported
    model = Llama.from_pretrained(base_dir)
    model.layers[0].self_attn.lofit_v.data[0] = 1.0
    fold1 = tmp_path / "fold1.safetensors"
    save_adapter(fold1, model, [(0, 0)], stage=2, task="truthfulqa", hparams={"fold": 1})
    argv = ["--task", "truthfulqa", "--model", base_dir, "--data-dir", data, "--quiet", "--limit", "1"]
    assert evaluation.main(argv + ["--adapter", str(fold1)]) == 2
    assert "trained on TruthfulQA fold 1" in capsys.readouterr().err
    assert evaluation.main(argv + ["--fold", "1", "--adapter", str(fold1)]) == 0
    assert evaluation.main(argv + ["--split", "val", "--adapter", str(fold1)]) == 0  # fold 1's test questions
    mquake = tmp_path / "mquake.safetensors"  # the fold recorded by a non-TruthfulQA run means nothing
    save_adapter(mquake, model, [(0, 0)], stage=2, task="mquake", hparams={"fold": 1})
    assert evaluation.main(argv + ["--adapter", str(mquake)]) == 0
    assert "trained on mquake" in capsys.readouterr().err  # a warning, not a refusal
