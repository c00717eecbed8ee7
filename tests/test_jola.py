"""examples/jola.py: JoLA's HardConcrete-gated scale and offset per head, against a hand computation.

The gates (sampled while training from the form's own generator, deterministic at evaluation), the
edit, the expected-L0 penalty, the generator's state, the merge into o_proj; then the form through
train.py (every head, no stage 1, the penalty logged, --resume drawing the same gates), eval.py and the adapter.
"""
import json
import math

import pytest
import torch
from test_train import tiny_args

import adapter
import eval as evaluation
import lofit
import train
from conftest import ROOT, STORIES260K
from hf_reference import make_checkpoint
from machinery.flags import import_intervention_file
from model import EditContext, Llama

JOLA_FILE = str(ROOT / "examples" / "jola.py")
import_intervention_file(JOLA_FILE)
JoLA = lofit.INTERVENTIONS["jola"]
jola = __import__("sys").modules[JoLA.__module__]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_gates_by_hand():
    log_alpha = torch.tensor([0.0, 2.0, -3.0, 10.0])
    expected = [0.5, sigmoid(2.0) * 1.2 - 0.1, 0.0, 1.0]  # stretch to (-0.1, 1.1), clip to [0, 1]
    assert jola.gate(log_alpha).tolist() == pytest.approx(expected, abs=1e-6)
    u = torch.tensor([0.5, 0.5, 0.9, 0.01])
    sampled = [sigmoid((math.log(x / (1 - x)) + la) / 0.33) * 1.2 - 0.1
               for x, la in zip(u.tolist(), log_alpha.tolist())]
    assert jola.gate(log_alpha, u).tolist() == pytest.approx([min(max(s, 0), 1) for s in sampled], abs=1e-6)
    assert jola.expected_open(torch.tensor(0.0)).item() == pytest.approx(sigmoid(0.33 * math.log(1.1 / 0.1)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama2")  # 2 layers x 4 heads, head_dim 16
    return path


def installed(path, seed=0):
    model = Llama.from_pretrained(path)
    form = lofit.install(model, JoLA(l0=0.01))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in lofit.attentions(model):
            for name in ("m", "a", "p", "q"):
                p = attn.get_parameter("lofit_" + name)
                p.copy_(torch.randn(p.shape, generator=g))
    return model, form


def test_edit_penalty_and_merge_by_hand(tiny):
    model, form = installed(tiny)
    attn = model.layers[1].self_attn
    z = torch.randn(2, 3, 4, 16)
    ctx = EditContext(None, torch.zeros(2, 3, dtype=torch.long), None, 0, 1, False)
    with torch.no_grad():
        out = form.edit(attn, z, ctx)
    attn = attn.requires_grad_(False)
    for h in range(4):
        g_m = min(max(sigmoid(float(attn.lofit_p[h])) * 1.2 - 0.1, 0), 1)
        g_a = min(max(sigmoid(float(attn.lofit_q[h])) * 1.2 - 0.1, 0), 1)
        by_hand = (1 + g_m * attn.lofit_m[h]) * z[:, :, h] + g_a * attn.lofit_a[h]
        torch.testing.assert_close(out[:, :, h], by_hand, rtol=1e-6, atol=1e-6)
    penalty = sum(sigmoid(float(x) + 0.33 * math.log(11)) for a in lofit.attentions(model)
                  for x in torch.cat([a.lofit_p, a.lofit_q]).detach())
    assert float(form.penalty(model).detach()) == pytest.approx(0.01 * penalty, rel=1e-6)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)  # evaluation: deterministic gates
        adapter.merge_offsets(model)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_training_samples_gates_from_the_forms_generator_and_its_state_resumes(tiny):
    model, form = installed(tiny)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        evaluation_logits = model(ids)
        assert torch.equal(model(ids), evaluation_logits)  # deterministic
        model.train()
        form.rng.manual_seed(5)
        state = form.state_dict()
        first, second = model(ids), model(ids)
        assert not torch.equal(first, second) and not torch.equal(first, evaluation_logits)
        form.load_state_dict(state)
        assert torch.equal(model(ids), first)  # the same draws again from the kept state


def test_setup_seeds_the_generator_and_trains_the_given_heads_only(tiny):
    model = Llama.from_pretrained(tiny)
    heads = [(0, 1), (1, 3)]
    draws = []
    for _ in range(2):
        form = JoLA()
        lofit.setup_stage2(model, heads, generator=torch.Generator().manual_seed(7), intervention=form)
        draws.append(torch.rand(3, generator=form.rng))
    assert torch.equal(*draws)
    assert lofit.trainable_count(model) == 2 * (16 + 16 + 1 + 1)
    assert JoLA.selects_heads and not lofit.LoFiT.selects_heads


FORM = ["--intervention", JOLA_FILE]


@pytest.fixture(scope="module")
def jola_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jola")
    assert train.main(tiny_args("mquake", out, *FORM)) == 0
    return out


def test_jola_trains_every_head_with_sampled_gates_and_a_logged_penalty(jola_run):
    from safetensors.torch import load_file
    tensors = load_file(str(jola_run / "adapter.safetensors"))
    assert sorted(tensors) == ["a", "heads", "m", "p", "q"] and tensors["p"].shape == (40,)  # 5 layers x 8 heads
    assert tensors["a"].abs().min() > 0 and tensors["p"].abs().max() > 0  # every head moved, the gates too
    heads = json.loads((jola_run / "heads.json").read_text())
    assert len(heads["selected"]) == 40 and "jola intervention chooses its own" in heads["source"]
    rows = [json.loads(line) for line in (jola_run / "metrics.jsonl").read_text().splitlines()]
    assert all(("penalty" in r) == (r["stage"] == 2) for r in rows) and not any(r["stage"] == 1 for r in rows)
    assert rows[0]["penalty"] == pytest.approx(1e-3 * 2 * 40 * jola.expected_open(torch.tensor(0.0)).item())
    metrics = json.loads((jola_run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 40 * (8 + 8 + 1 + 1) and "stage1" not in metrics["train_loss"]


def test_jola_resume_draws_the_same_gates(jola_run, tmp_path):
    from test_train import assert_same_adapter
    assert train.main(tiny_args("mquake", tmp_path, *FORM, "--stop-after", "1")) == 0
    assert train.main(tiny_args("mquake", tmp_path, *FORM, "--resume")) == 0
    assert_same_adapter(tmp_path, jola_run)


def test_jola_run_saves_loads_evaluates_and_merges(jola_run, tmp_path):
    metrics = json.loads((jola_run / "metrics.json").read_text())
    argv = ["--task", "mquake", "--model", str(STORIES260K), "--limit", "4", "--quiet", *FORM,
            "--adapter", str(jola_run / "adapter.safetensors"), "--out", str(tmp_path / "r.json")]
    assert evaluation.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == metrics["test"]
    model = Llama.from_pretrained(str(STORIES260K))
    meta = adapter.load_adapter(jola_run / "adapter.safetensors", model)
    assert meta["intervention"] == {"name": "jola", "l0": 0.001}
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        exported = Llama.from_pretrained(str(adapter.export_merged(model, tmp_path / "merged")))
        torch.testing.assert_close(exported(ids), expected, rtol=1e-5, atol=1e-5)


def test_jola_refuses_another_head_choice(tmp_path, capsys):
    assert train.main(tiny_args("mquake", tmp_path / "out", *FORM, "--head-selection", "random")) == 2
    assert "--intervention jola chooses its own heads" in capsys.readouterr().err
