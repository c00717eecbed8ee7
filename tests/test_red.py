"""examples/red.py: RED's scale and bias on every layer's MLP output, the second site a form may edit.

Trained by train.py on stories260K, evaluated by eval.py from the adapter, saved and loaded, merged
exactly into down_proj and exported, and switched off by offsets_disabled (DPO's reference).
"""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_args

import adapter
import eval as evaluation
import lofit
import train
from conftest import ROOT, STORIES260K
from hf_reference import make_checkpoint
from machinery.flags import import_intervention_file
from model import Llama

RED_FILE = str(ROOT / "examples" / "red.py")
import_intervention_file(RED_FILE)
FORM = ["--intervention", RED_FILE]


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("red")
    assert train.main(tiny_args("mquake", out, *FORM)) == 0
    return out


def test_red_edits_the_mlp_output_by_hand(tmp_path):
    path, _ = make_checkpoint(tmp_path / "m", "biases")  # down_proj has a bias
    model = Llama.from_pretrained(path)
    lofit.install(model, lofit.make_intervention("red"))
    mlp = model.layers[1].mlp
    with torch.no_grad():
        mlp.lofit_s.copy_(torch.linspace(-0.5, 0.5, 64))
        mlp.lofit_b.copy_(torch.linspace(1, 2, 64))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        base = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), (1 + mlp.lofit_s) * base + mlp.lofit_b, rtol=0, atol=0)


def test_red_run_trains_every_layer_and_eval_reproduces_it(red_run, tmp_path):
    tensors = load_file(str(red_run / "adapter.safetensors"))
    assert sorted(tensors) == ["heads", "mlp.b", "mlp.s"] and tensors["mlp.s"].shape == (5, 64)
    assert tensors["mlp.b"].abs().min(dim=1).values.gt(0).all()  # every layer moved
    metrics = json.loads((red_run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 2 * 5 * 64
    argv = ["--task", "mquake", "--model", str(STORIES260K), "--limit", "4", "--quiet", *FORM,
            "--adapter", str(red_run / "adapter.safetensors"), "--out", str(tmp_path / "r.json")]
    assert evaluation.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == metrics["test"]


def test_red_adapter_loads_saves_merges_and_exports(red_run, tmp_path):
    model = Llama.from_pretrained(str(STORIES260K))
    meta = adapter.load_adapter(red_run / "adapter.safetensors", model)
    assert meta["intervention"] == {"name": "red"}
    adapter.save_adapter(tmp_path / "again.safetensors", model, meta["heads"], stage=2, task="mquake")
    first, again = (load_file(str(f)) for f in (red_run / "adapter.safetensors", tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], first[k]) for k in first)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    base = Llama.from_pretrained(str(STORIES260K))
    with torch.no_grad():
        expected = model(ids)
        assert not torch.allclose(expected, base(ids))
        with lofit.offsets_disabled(model):  # DPO's reference: the MLP edit is off too
            assert torch.equal(model(ids), base(ids))
        exported = Llama.from_pretrained(str(adapter.export_merged(model, tmp_path / "merged")))
        assert exported.config.mlp_bias and exported.layers[0].mlp.down_proj.bias is not None
        torch.testing.assert_close(exported(ids), expected, rtol=1e-5, atol=1e-5)
        adapter.merge_offsets(model)
        assert not any(m.lofit_s.any() or m.lofit_b.any() for m in lofit.mlps(model))
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_missing_the_mlp_rows_is_refused(red_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(red_run / "adapter.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if k != "mlp.b"}, str(tmp_path / "cut.safetensors"), metadata=meta)
    model = Llama.from_pretrained(str(STORIES260K))
    with pytest.raises(adapter.AdapterError, match="needs mlp.b, which it lacks"):
        adapter.load_adapter(tmp_path / "cut.safetensors", model)
    assert type(lofit.intervention_of(model)) is lofit.LoFiT
