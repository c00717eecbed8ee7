"""adapter.py: adapter files round trip and refuse the wrong model; merged and exported models match.

The export is checked by loading it with transformers' own LlamaForCausalLM / GemmaForCausalLM.
"""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapter
import lofit
from hf_reference import load_hf, load_hf_gemma, make_checkpoint, make_gemma_checkpoint
from model import Llama

VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("llama2"), "llama2", vocab_size=VOCAB)
    return path


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ids(B=2, T=10, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=gen(seed))


def adapted(path, heads=((1, 2), (0, 1), (0, 3)), scale_std=0.0, seed=0, loader=Llama.from_pretrained):
    """A model after stage 2 on `heads` with sizeable v (std 0.3), and optionally a random A too."""
    model = loader(path)
    lofit.setup_stage2(model, list(heads), init_std=0.3, generator=gen(seed))
    if scale_std:
        with torch.no_grad():
            for a in lofit.attentions(model):
                a.lofit_A.copy_(scale_std * torch.randn(a.lofit_A.shape, generator=gen(seed + 1)))
    return model


def offsets(model):
    return [(a.lofit_A.detach().clone(), a.lofit_v.detach().clone()) for a in lofit.attentions(model)]


# ---------------------------------------------------------------------------------------------
# Adapter files


def test_adapter_round_trip(tmp_path, checkpoint):
    heads = [(1, 2), (0, 1), (0, 3)]
    model = adapted(checkpoint, heads)
    file = tmp_path / "adapter.safetensors"
    adapter.save_adapter(file, model, heads, stage=2, task="mquake", hparams={"lr": 0.01, "k": 3})
    with safe_open(str(file), framework="pt") as f:  # only the selected heads' vectors are stored
        assert sorted(f.keys()) == ["heads", "v"]
        assert f.get_tensor("heads").tolist() == [list(h) for h in heads]
        assert f.get_tensor("v").shape == (3, 16)
    fresh = adapted(checkpoint, heads=[(0, 0), (1, 1)], scale_std=0.1, seed=3)  # earlier offsets get replaced
    meta = adapter.load_adapter(file, fresh)
    assert all(torch.equal(x, y) for (a, v), (b, w) in zip(offsets(model), offsets(fresh)) for x, y in [(a, b), (v, w)])
    with torch.no_grad():
        assert torch.equal(fresh(ids()), model(ids()))
    assert meta["heads"] == heads and meta["stage"] == 2 and meta["task"] == "mquake"
    assert meta["hparams"] == {"lr": 0.01, "k": 3} and meta["base_model"] == str(checkpoint)
    assert meta["config"]["hidden_size"] == 64 and meta["complete"] is True
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_stage1_adapter_keeps_A(tmp_path, checkpoint):
    model = Llama.from_pretrained(checkpoint)
    lofit.setup_stage1(model, init_std=0.2, generator=gen(0))
    file = tmp_path / "stage1.safetensors"
    adapter.save_adapter(file, model, None, stage=1, task="clutrr")  # None: every head
    fresh = Llama.from_pretrained(checkpoint)
    meta = adapter.load_adapter(file, fresh)
    assert len(meta["heads"]) == 8 and meta["stage"] == 1
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(offsets(model), offsets(fresh)))
    with pytest.warns(UserWarning, match="will not reproduce"):  # top heads only: the rest of A is lost
        adapter.save_adapter(tmp_path / "top2.safetensors", model, [(0, 0), (1, 1)], stage=1, task="clutrr")
    meta = adapter.load_adapter(tmp_path / "top2.safetensors", fresh)
    assert meta["complete"] is False
    nonzero = {(layer, h) for layer, a in enumerate(lofit.attentions(fresh)) for h in range(4) if a.lofit_A[h].any()}
    assert nonzero == {(0, 0), (1, 1)}  # loading replaced every earlier offset


def test_adapter_for_another_architecture_is_refused(tmp_path, checkpoint):
    model = adapted(checkpoint, heads=[(1, 2)])
    file = tmp_path / "a.safetensors"
    adapter.save_adapter(file, model, [(1, 2)], stage=2, task="mquake")
    gqa_path, _ = make_checkpoint(tmp_path / "gqa", "llama3.1", vocab_size=VOCAB)  # other shape
    other = Llama.from_pretrained(gqa_path)
    with pytest.raises(adapter.AdapterError) as err:
        adapter.load_adapter(file, other)
    message = str(err.value)
    assert str(checkpoint) in message and str(gqa_path) in message and "n_heads: adapter 4 vs model 8" in message
    assert not any(a.lofit_v.any() for a in lofit.attentions(other))  # nothing half-loaded
    theta_path, _ = make_checkpoint(tmp_path / "theta", "llama2", vocab_size=VOCAB, rope_theta=20000.0)
    with pytest.raises(adapter.AdapterError, match="rope_theta: adapter 10000.0 vs model 20000.0"):
        adapter.load_adapter(file, Llama.from_pretrained(theta_path))  # same shapes, other config


def test_same_architecture_other_name_warns(tmp_path, checkpoint):
    file = tmp_path / "a.safetensors"
    adapter.save_adapter(file, adapted(checkpoint, heads=[(1, 2)]), [(1, 2)], stage=2, task="mquake")
    model = Llama.from_pretrained(checkpoint)
    model.source = "someone/another-model"
    with pytest.warns(UserWarning, match="make sure the weights are the same model"):
        adapter.load_adapter(file, model)
    model.source = f"/elsewhere/{checkpoint.name}"  # the same model in another directory: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.load_adapter(file, model)


def test_bad_adapter_files_get_clear_errors(tmp_path, checkpoint):
    model = Llama.from_pretrained(checkpoint)
    with pytest.raises(adapter.AdapterError, match="does not exist"):
        adapter.load_adapter(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(adapter.AdapterError, match="not a readable safetensors file"):
        adapter.load_adapter(tmp_path / "junk.safetensors", model)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(adapter.AdapterError, match="not a LoFiT adapter"):
        adapter.load_adapter(tmp_path / "plain.safetensors", model)
    good = tmp_path / "good.safetensors"
    adapter.save_adapter(good, adapted(checkpoint, heads=[(1, 2)]), [(1, 2)], stage=2, task="mquake")
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    for name, tensors, changes in [
        ("range", {"heads": torch.tensor([[2, 0]]), "v": torch.zeros(1, 16)}, {"heads": "[[2, 0]]"}),
        ("shape", {"heads": torch.tensor([[1, 2]]), "v": torch.zeros(1, 8)}, {}),
        ("version", {"heads": torch.tensor([[1, 2]]), "v": torch.zeros(1, 16)}, {"format_version": "99"}),
        ("version_text", {"heads": torch.tensor([[1, 2]]), "v": torch.zeros(1, 16)}, {"format_version": "two"}),
        ("hparams_null", {"heads": torch.tensor([[1, 2]]), "v": torch.zeros(1, 16)}, {"hparams": "null"}),
    ]:
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={**meta, **changes})
        with pytest.raises(adapter.AdapterError, match={"range": "outside", "shape": "inconsistent",
                                                      "version": "update the code",
                                                      "version_text": "broken adapter metadata",
                                                      "hparams_null": "broken adapter metadata"}[name]):
            adapter.load_adapter(tmp_path / f"{name}.safetensors", model)


def test_failed_save_leaves_the_old_file(tmp_path, checkpoint, monkeypatch):
    file = tmp_path / "adapter.safetensors"
    adapter.save_adapter(file, adapted(checkpoint, heads=[(1, 2)]), [(1, 2)], stage=2, task="mquake")
    before = file.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        adapter.save_adapter(file, adapted(checkpoint, heads=[(1, 2)], seed=9), [(1, 2)], stage=2, task="mquake")
    assert file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


# ---------------------------------------------------------------------------------------------
# Merging into o_proj


@pytest.mark.parametrize("family", ["llama2", "biases", "llama3.1"])
def test_merge_gives_the_same_logits(tmp_path, family):
    path, _ = make_checkpoint(tmp_path, family, vocab_size=VOCAB)
    model = adapted(path, scale_std=0.3)
    with torch.no_grad():
        expected = model(ids())
        assert not torch.equal(expected, Llama.from_pretrained(path)(ids()))  # the offsets do something
        adapter.merge_offsets(model)
        assert all(not a.lofit_A.any() and not a.lofit_v.any() for a in lofit.attentions(model))
        assert all(a.o_proj.bias is not None for a in lofit.attentions(model))
        torch.testing.assert_close(model(ids()), expected)
        with lofit.offsets_disabled(model):  # nothing is left in the LoFiT arithmetic
            torch.testing.assert_close(model(ids()), expected)


def test_merge_by_hand_one_layer(checkpoint):
    """bias = b + W_o v and column j of W_o times (1 + A)_j, checked in plain loops."""
    model = adapted(checkpoint, heads=[(0, 1)], scale_std=0.5)
    attn = model.layers[0].self_attn
    W = attn.o_proj.weight.detach().clone()
    A, v = attn.lofit_A.detach().flatten().clone(), attn.lofit_v.detach().flatten().clone()
    adapter.merge_offsets(model)
    for row in (0, 17, 63):
        expected_bias = sum(W[row, j].item() * v[j].item() for j in range(64))
        assert attn.o_proj.bias[row].item() == pytest.approx(expected_bias, rel=1e-5, abs=1e-7)
        for j in (0, 16, 31, 63):
            assert attn.o_proj.weight[row, j].item() == pytest.approx(W[row, j].item() * (1 + A[j].item()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Export as a Hugging Face checkpoint


@pytest.mark.parametrize("family", ["llama2", "biases", "llama3.2"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, family):
    path, _ = make_checkpoint(tmp_path / "base", family, vocab_size=VOCAB)
    model = adapted(path, scale_std=0.3)
    before = offsets(model)
    out = adapter.export_merged(model, tmp_path / "merged")
    assert all(torch.equal(x, y) for (a, v), (b, w) in zip(before, offsets(model)) for x, y in [(a, b), (v, w)])
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True
    hf = load_hf(out)
    with torch.no_grad():
        expected = model(ids())
        torch.testing.assert_close(hf(ids()).logits, expected)
        torch.testing.assert_close(Llama.from_pretrained(out)(ids()), expected)
    if family == "llama2":  # q/k/v had no bias: they get zero ones, as HF's attention_bias needs
        assert not hf.model.layers[0].self_attn.q_proj.bias.any()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_gemma(tmp_path):
    path, _ = make_gemma_checkpoint(tmp_path / "base")
    model = adapted(path, heads=[(0, 0), (1, 3)], scale_std=0.3)
    out = adapter.export_merged(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_hf_gemma(out)(ids()).logits, model(ids()))


def test_export_without_offsets_keeps_the_config(tmp_path, checkpoint):
    out = adapter.export_merged(Llama.from_pretrained(checkpoint), tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is False and config["num_attention_heads"] == 4
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(ids()).logits, load_hf(checkpoint)(ids()).logits)


def test_export_copies_tokenizer_and_refuses_to_overwrite(tmp_path, checkpoint):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    (tok / "tokenizer_config.json").write_text("{}")
    model = adapted(checkpoint)
    out = adapter.export_merged(model, tmp_path / "merged", tokenizer_dir=tok)
    assert (out / "tokenizer.model").read_bytes() == b"\x00sentencepiece"
    assert (out / "tokenizer_config.json").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapter.export_merged(model, out)
    (out / "stale.txt").write_text("old")
    adapter.export_merged(model, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        adapter.export_merged(model, tmp_path / "other", tokenizer_dir=tmp_path / "merged" / "nothing")
    assert not (tmp_path / "other").exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file, not a model directory"):
        adapter.export_merged(model, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "merged", "tok"]


def test_lofit_does_not_import_adapter():
    """One direction only: adapter.py builds on lofit.py; lofit.py re-exports nothing from adapter.py."""
    import ast
    tree = ast.parse(open(lofit.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "adapter" not in imported
    for name in ("AdapterError", "save_adapter", "load_adapter", "merge_offsets", "export_merged"):
        assert not hasattr(lofit, name) and hasattr(adapter, name)
