"""What a form's edit sees (model.EditContext) on every path, and examples/steer_last_token.py built on it.

Paths: training (ce_loss on right-padded rows; DPO on a shared prefix), TruthfulQA scoring on the
prefix cache, generation (prefill and decode) and a plain forward. The steering example must hit the
last prompt token on each, and nothing else; then it goes through train.py, eval.py and the adapter.
"""
import json
from dataclasses import dataclass

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
from model import Llama

STEER = str(ROOT / "examples" / "steer_last_token.py")
import_intervention_file(STEER)
SteerLastToken = lofit.INTERVENTIONS["steer_last_token"]


@dataclass
class Recording(lofit.Intervention):
    """The base model (z unchanged), keeping every context it is given."""
    name = "test_recording"

    def __post_init__(self):
        self.seen = []

    def edit(self, attn, z, ctx):
        self.seen.append(ctx)
        return z


@dataclass
class SteerRecording(SteerLastToken):
    """The steering example, recording (past, [(row, column)] where it changed z) at layer 0."""
    name = "test_steer_recording"

    def __post_init__(self):
        self.hits = []

    def edit(self, attn, z, ctx):
        out = super().edit(attn, z, ctx)
        if ctx.layer == 0:
            rows, t = (out != z).any(-1).any(-1).nonzero(as_tuple=True)
            self.hits.append((ctx.past, [(int(b), ctx.past + int(c)) for b, c in zip(rows, t)]))
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama2")
    return path


def steered(path, form):
    model = Llama.from_pretrained(path)
    lofit.install(model, form)
    with torch.no_grad():
        for attn in lofit.attentions(model):
            attn.lofit_s.copy_(torch.randn(attn.lofit_s.shape, generator=torch.Generator().manual_seed(1)))
    form.hits.clear()  # install's own check ran the edit
    return model


def right_padded():
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    loss = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]]).bool()  # answers start at 3 and 2
    return {"input_ids": ids * mask, "attention_mask": mask, "loss_mask": loss}


def test_training_passes_masks_positions_answer_starts_and_layers(tiny):
    model, form = Llama.from_pretrained(tiny), Recording()
    lofit.install(model, form)
    form.seen.clear()
    batch = right_padded()
    lofit.ce_loss(model, batch)
    assert [c.layer for c in form.seen] == [0, 1]
    ctx = form.seen[0]
    assert ctx.answer_start.tolist() == [3, 2] and ctx.past == 0 and ctx.training is False
    assert torch.equal(ctx.attention_mask, batch["attention_mask"])
    assert ctx.positions.tolist() == [list(range(7)), [0, 1, 2, 3, 4, 4, 4]]
    model.train()
    form.seen.clear()
    lofit.ce_loss(model, batch)
    assert form.seen[0].training is True
    model.eval()
    form.seen.clear()
    with torch.no_grad():
        model(batch["input_ids"])  # a plain forward: no mask, no answer start
    assert form.seen[0].attention_mask is None and form.seen[0].answer_start is None and form.seen[0].past == 0


def test_steering_hits_the_last_prompt_token_in_training_and_dpo(tiny):
    form = SteerRecording()
    model = steered(tiny, form)
    lofit.ce_loss(model, right_padded())
    assert form.hits == [(0, [(0, 2), (1, 1)])]  # column answer_start - 1 of each row
    form.hits.clear()
    prompt = [1, 5, 6, 7, 8]
    pairs = [{"chosen_input_ids": prompt + [9, 10, 2], "chosen_loss_mask": [False] * 5 + [True] * 3,
              "rejected_input_ids": prompt + [11, 2], "rejected_loss_mask": [False] * 5 + [True] * 2}]
    shared = lofit.pair_answer_logprobs(model, pairs, pad_id=0)
    full = lofit.pair_answer_logprobs(model, pairs, pad_id=0, shared_prefix=False)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)  # the same token steered on both paths
    prefix_pass, suffix_pass, full_pass = form.hits
    assert prefix_pass == (0, []) and suffix_pass == (4, [(0, 4), (1, 4)])  # the prefix is 4 tokens; column 4
    assert full_pass == (0, [(0, 4), (1, 4)])


def test_steering_on_truthfulqa_scoring_is_the_same_with_and_without_the_prefix_cache(tiny):
    form = SteerRecording()
    model = steered(tiny, form)
    prompt = [1, 20, 21, 22, 23, 24]
    sequences = [prompt + [30, 31], prompt + [40], prompt[:-1] + [25, 50, 51]]
    starts = [6, 6, 6]
    cached = evaluation.answer_scores(model, sequences, starts, batch_size=2, prefix_cache=True)
    assert form.hits[0] == (0, [])  # the shared prefix (5 tokens: it stops before the last prompt token)
    assert all(hits == [(b, 5) for b in range(len(hits))] for _, hits in form.hits[1:])
    plain = evaluation.answer_scores(model, sequences, starts, batch_size=2, prefix_cache=False)
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-5)
    base = evaluation.answer_scores(Llama.from_pretrained(tiny), sequences, starts, batch_size=2)
    assert cached != pytest.approx(base, rel=1e-3)  # the steering changes the scores


def test_steering_in_generation_hits_the_prefill_only(tiny):
    form = SteerRecording()
    model = steered(tiny, form)
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])  # left-padded, as eval.py generates
    mask = (ids != 0).long()
    model.generate(ids, mask, max_new_tokens=3)
    assert form.hits == [(0, [(0, 4), (1, 4)]), (5, []), (6, [])]  # the prompt's last token, then nothing


def test_lofit_ignores_the_context(tiny):
    model = Llama.from_pretrained(tiny)
    lofit.setup_stage2(model, [(0, 1), (1, 2)], init_std=0.1, generator=torch.Generator().manual_seed(0))
    batch = right_padded()
    with torch.no_grad():
        plain = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        told = model.hidden_states(batch["input_ids"], batch["attention_mask"], None, torch.tensor([3, 2]))
    assert torch.equal(plain, told)


# ---------------------------------------------------------------------------------------------
# The steering example through the pipeline


FORM = ["--intervention", STEER]


@pytest.fixture(scope="module")
def steer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("steer")
    assert train.main(tiny_args("mquake", out, *FORM)) == 0
    return out


def test_steer_run_saves_loads_evaluates_and_refuses_merging(steer_run, tmp_path):
    from safetensors.torch import load_file
    tensors = load_file(str(steer_run / "adapter.safetensors"))
    assert sorted(tensors) == ["heads", "s"] and tensors["s"].shape == (6, 8) and tensors["s"].abs().max() > 0
    metrics = json.loads((steer_run / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 6 * 8
    argv = ["--task", "mquake", "--model", str(STORIES260K), "--limit", "4", "--quiet", *FORM,
            "--adapter", str(steer_run / "adapter.safetensors"), "--out", str(tmp_path / "r.json")]
    assert evaluation.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == metrics["test"]
    model = Llama.from_pretrained(str(STORIES260K))
    meta = adapter.load_adapter(steer_run / "adapter.safetensors", model)
    assert meta["intervention"] == {"name": "steer_last_token"}
    adapter.save_adapter(tmp_path / "again.safetensors", model, meta["heads"], stage=2, task="mquake")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    with pytest.raises(adapter.AdapterError, match="no exact merge"):
        adapter.merge_offsets(model)
