"""A new form of intervention (examples/low_rank.py) through the whole pipeline, and the generic refusals.

The example form is trained by train.py on stories260K, saved, loaded, evaluated (in Python and by
eval.py), resumed, merged into o_proj and exported, and run under torchrun: the same round trips as LoFiT.
"""
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import assert_same_adapter, tiny_args
from test_train_distributed import flags, torchrun

import adapter
import eval as evaluation
import lofit
import train
from conftest import ROOT
from hf_reference import make_checkpoint
from model import Llama

EXAMPLE = str(ROOT / "examples" / "low_rank.py")
FORM = ["--intervention", EXAMPLE, "--intervention-arg", "rank=2"]


@pytest.fixture(scope="module")
def low_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("low_rank")
    assert train.main(tiny_args("mquake", out, *FORM)) == 0
    return out


def fresh_model():
    from conftest import STORIES260K
    return Llama.from_pretrained(str(STORIES260K))


def test_trained_adapter_holds_the_form_and_its_rank(low_rank_run):
    with safe_open(str(low_rank_run / "adapter.safetensors"), framework="pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
        U, W = f.get_tensor("U"), f.get_tensor("W")
    assert keys == ["U", "W", "heads"] and U.shape == (6, 8, 2) and W.shape == (6, 2, 8)
    assert W.abs().max() > 1e-3  # W starts at 0: it moved, so the product form got a gradient
    assert json.loads(meta["intervention"]) == {"name": "low_rank", "rank": 2} and meta["format_version"] == "2"
    metrics = json.loads((low_rank_run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 6 * (8 * 2 + 2 * 8)  # K heads x (U + W), not every head's


def test_adapter_loads_evaluates_merges_and_exports(low_rank_run, tmp_path):
    from conftest import STORIES260K
    from data import load_examples
    from tokenizer import load_tokenizer
    model = fresh_model()
    meta = adapter.load_adapter(low_rank_run / "adapter.safetensors", model)
    assert meta["intervention"] == {"name": "low_rank", "rank": 2}
    assert isinstance(lofit.intervention_of(model), lofit.INTERVENTIONS["low_rank"])
    tokenizer = load_tokenizer(str(STORIES260K))
    test = load_examples("mquake", "test")[:4]
    again = evaluation.evaluate(model, tokenizer, "mquake", test, progress=False)
    assert again["summary"] == json.loads((low_rank_run / "metrics.json").read_text())["test"]

    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        assert not torch.equal(expected, fresh_model()(ids))  # the form changes the model
        exported = Llama.from_pretrained(str(adapter.export_merged(model, tmp_path / "merged")))
        torch.testing.assert_close(exported(ids), expected, rtol=1e-4, atol=1e-4)
        adapter.merge_offsets(model)
        assert not any(p.any() for a in lofit.attentions(model) for p in lofit.offset_parameters(a).values())
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(adapter.AdapterError, match="merged into o_proj already"):
        adapter.merge_offsets(model)
    with pytest.raises(adapter.AdapterError, match="already has offsets merged"):
        adapter.load_adapter(low_rank_run / "adapter.safetensors", model)


def test_a_refused_adapter_leaves_the_model_as_it_was(low_rank_run, tmp_path):
    from safetensors.torch import save_file
    model = fresh_model()
    adapter.load_adapter(low_rank_run / "adapter.safetensors", model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lofit_" in n}
    tensors = load_file(str(low_rank_run / "adapter.safetensors"))
    with safe_open(str(low_rank_run / "adapter.safetensors"), framework="pt") as f:
        meta = f.metadata()
    bad = tmp_path / "rank3.safetensors"  # says rank 3, holds rank-2 factors
    save_file(tensors, str(bad), metadata={**meta, "intervention": json.dumps({"name": "low_rank", "rank": 3})})
    with pytest.raises(adapter.AdapterError, match="does not fit the low_rank intervention"):
        adapter.load_adapter(bad, model)
    after = {n: p.detach() for n, p in model.named_parameters() if ".lofit_" in n}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    unknown = tmp_path / "unknown.safetensors"
    save_file(tensors, str(unknown), metadata={**meta, "intervention": json.dumps({"name": "nowhere"})})
    with pytest.raises(adapter.AdapterError, match="unknown intervention 'nowhere'.*--intervention FILE"):
        adapter.load_adapter(unknown, model)


def test_eval_cli_scores_the_adapter(low_rank_run, tmp_path):
    from conftest import STORIES260K
    argv = ["--task", "mquake", "--model", str(STORIES260K), "--limit", "4", "--quiet",
            "--adapter", str(low_rank_run / "adapter.safetensors"), "--out", str(tmp_path / "r.json")]
    assert evaluation.main(argv + ["--intervention", EXAMPLE]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == \
        json.loads((low_rank_run / "metrics.json").read_text())["test"]


def test_resume_gives_the_uninterrupted_adapter(low_rank_run, tmp_path):
    assert train.main(tiny_args("mquake", tmp_path, *FORM, "--stop-after", "3")) == 0  # inside stage 2
    assert train.main(tiny_args("mquake", tmp_path, *FORM, "--resume")) == 0
    assert_same_adapter(tmp_path, low_rank_run)
    assert train.main(tiny_args("mquake", tmp_path / "other", *FORM, "--stop-after", "3")) == 0
    assert train.main(tiny_args("mquake", tmp_path / "other", "--resume")) == 2  # another form: refused


def test_two_processes_match_one(tmp_path):
    assert train.main(flags("mquake", tmp_path / "one", *FORM)) == 0
    torchrun(flags("mquake", tmp_path / "two", *FORM))
    one, two = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    assert sorted(one) == sorted(two) == ["U", "W", "heads"] and one["W"].abs().max() > 1e-3
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    metrics_one, metrics_two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert metrics_two["train_loss"]["stage2"] == pytest.approx(metrics_one["train_loss"]["stage2"], abs=1e-5)
    assert metrics_two["test"] == pytest.approx(metrics_one["test"], abs=1e-5)


def test_bad_intervention_flags_exit_2(tmp_path, capsys):
    assert train.main(tiny_args("mquake", tmp_path / "a", "--intervention", "nope")) == 2
    assert "unknown intervention 'nope'; registered:" in capsys.readouterr().err
    assert train.main(tiny_args("mquake", tmp_path / "a", *FORM[:2], "--intervention-arg", "rank=0")) == 2
    assert "rank must be at least 1" in capsys.readouterr().err
    assert train.main(tiny_args("mquake", tmp_path / "a", *FORM[:2], "--intervention-arg", "size=3")) == 2
    assert "does not take these settings" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# Refusals of the generic machinery, on a tiny random model


@dataclass
class Shared(lofit.Intervention):
    """One shift for every head: not stored per head, so an adapter cannot hold it."""
    name = "test_shared"

    def parameters(self, config):
        return {"s": (config.head_dim,)}


@dataclass
class Gate(lofit.Intervention):
    """z + g * tanh(z): the base model at g = 0, not linear in z, so it defines no merge."""
    name = "test_gate"

    def parameters(self, config):
        return {"g": (config.n_heads, config.head_dim)}

    def edit(self, attn, z):
        return z + attn.lofit_g * torch.tanh(z)

    def setup(self, model, heads, init_std, generator):
        return [lofit.train_rows(a, "lofit_g", [h for at, h in heads if at == i])
                for i, a in enumerate(lofit.attentions(model))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama2")
    return path


def test_a_parameter_not_stored_per_head_is_refused(tiny, tmp_path):
    model = Llama.from_pretrained(tiny)
    with pytest.raises(ValueError, match="first dimension is n_heads"):
        lofit.install(model, Shared())
    assert not hasattr(model.layers[0].self_attn, "lofit_s")  # refused before anything changed
    model.layers[0].self_attn.lofit_s = torch.nn.Parameter(torch.ones(16))  # added by hand
    with pytest.raises(adapter.AdapterError, match="save_adapter cannot store it"):
        adapter.save_adapter(tmp_path / "a.safetensors", model, [(0, 1)], stage=2, task="mquake")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_form_without_a_merge_is_refused_and_masks_do_not_outlive_it(tiny, tmp_path):
    model = Llama.from_pretrained(tiny)
    heads = [(0, 1), (1, 3)]
    params = lofit.setup_stage2(model, heads, intervention=Gate())
    assert not Gate().mergeable and lofit.LoFiT().mergeable and lofit.INTERVENTIONS["low_rank"]().mergeable
    assert lofit.trainable_count(model) == 2 * 16 and len(params) == 2
    with pytest.raises(adapter.AdapterError, match="no exact merge"):
        adapter.merge_offsets(model)
    with pytest.raises(adapter.AdapterError, match="no exact merge"):
        adapter.export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    lofit.setup_stage2(model, heads, intervention=lofit.LoFiT())  # back to LoFiT: Gate's parameters go
    assert not hasattr(model.layers[0].self_attn, "lofit_g") and lofit.trainable_count(model) == 2 * 16
    assert all(set(a.lofit_masks) == {"lofit_v"} for a in lofit.attentions(model) if a.lofit_masks)


@dataclass
class Doubled(lofit.Intervention):
    """z -> 2 z: an edit with no parameters of its own; installing it must still change the model."""
    name = "test_doubled"

    def edit(self, attn, z):
        return 2 * z


def test_an_edit_without_parameters_is_installed(tiny):
    model = Llama.from_pretrained(tiny)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        base = model(ids)
        lofit.install(model, Doubled())
        assert not torch.allclose(model(ids), base)


def test_register_refuses_a_form_that_is_not_a_dataclass():
    class Plain(lofit.Intervention):
        name = "test_plain"
    with pytest.raises(TypeError, match="must be a @dataclass"):
        lofit.register(Plain)
    assert "test_plain" not in lofit.INTERVENTIONS


def test_eval_refuses_an_unknown_form_and_a_broken_form_file(tmp_path, capsys):
    from conftest import STORIES260K
    common = ["--task", "clutrr", "--model", str(STORIES260K), "--limit", "1"]
    assert evaluation.main([*common, "--intervention", "no_such_form"]) == 2
    assert "no_such_form: no such form" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    for _ in range(2):  # the second import fails the same way: nothing half-imported is left behind
        assert train.main(tiny_args("mquake", tmp_path / "a", "--intervention", str(broken))) == 2
        assert "broken.py failed to import (RuntimeError: boom)" in capsys.readouterr().err
