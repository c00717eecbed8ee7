"""iti.py: directions, sigma, probes and ranking against hand computations; the intervention
against a forward pre-hook on o_proj (how ITI's own code edits heads); activations against
transformers' LlamaForCausalLM read the same way.
"""
import math

import numpy as np
import pytest
import torch

import adapter
import iti
import lofit
from conftest import STORIES260K
from data import Example
from model import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, max_position_embeddings=64)


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for attn in lofit.attentions(model):
            attn.lofit_A.zero_()
            attn.lofit_v.zero_()
    return model


# ---------------------------------------------------------------------------------------------
# Directions and sigma


def test_directions_and_sigma_by_hand():
    """Head 0: true answers at (1, 0), (3, 0), false at (0, 1), (0, 3).
    Mean shift (2, 0) - (0, 2) = (2, -2), so u = (1, -1) / sqrt(2). Projections on u:
    1/sqrt2, 3/sqrt2, -1/sqrt2, -3/sqrt2: mean 0, population variance (1 + 9 + 1 + 9) / 2 / 4 = 2.5.
    Head 1: both classes have mean (1, 1): no direction, u = 0 and sigma = 0."""
    acts = torch.zeros(4, 1, 2, 2)  # (N, L, H, hd)
    acts[:, 0, 0] = torch.tensor([[1., 0.], [3., 0.], [0., 1.], [0., 3.]])
    acts[:, 0, 1] = torch.tensor([[0., 2.], [2., 0.], [2., 2.], [0., 0.]])
    labels = torch.tensor([1, 1, 0, 0])
    u, sigma = iti.iti_directions(acts, labels)
    assert u.shape == (1, 2, 2) and sigma.shape == (1, 2)
    torch.testing.assert_close(u[0, 0], torch.tensor([1., -1.]) / math.sqrt(2))
    torch.testing.assert_close(sigma[0, 0], torch.tensor(math.sqrt(2.5)))
    assert torch.equal(u[0, 1], torch.zeros(2)) and sigma[0, 1] == 0


def test_directions_and_sigma_match_numpy_on_random_activations():
    """ITI's get_com_directions / get_interventions_dict arithmetic, written in numpy."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(30, 3, 4, 5)) + 0.3 * rng.normal(size=(1, 3, 4, 5))
    labels = rng.integers(0, 2, size=30)
    u, sigma = iti.iti_directions(torch.tensor(acts, dtype=torch.float32), torch.tensor(labels))
    for layer in range(3):
        for head in range(4):
            x = acts[:, layer, head, :].astype(np.float32).astype(np.float64)
            direction = x[labels == 1].mean(0) - x[labels == 0].mean(0)
            direction = direction / np.linalg.norm(direction)
            np.testing.assert_allclose(u[layer, head].numpy(), direction, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(sigma[layer, head]), np.std(x @ direction), rtol=1e-5)


def test_directions_need_both_classes():
    with pytest.raises(ValueError, match="both true"):
        iti.iti_directions(torch.zeros(3, 1, 1, 2), torch.tensor([1, 1, 1]))


# ---------------------------------------------------------------------------------------------
# Probes


def test_probe_solves_the_one_dimensional_case_found_by_bisection():
    """x = +1 (label 1) and x = -1 (label 0), n of each. By symmetry b = 0, and the objective
    0.5 w^2 + 2n log(1 + exp(-w)) has its minimum where w = 2n * sigmoid(-w)."""
    n = 5
    X = torch.tensor([1.0] * n + [-1.0] * n).view(1, 2 * n, 1)  # (G=1, N, d=1)
    y = torch.tensor([1] * n + [0] * n)
    w, b = iti.fit_probes(X, y)
    lo, hi = 0.0, 2.0 * n
    for _ in range(200):  # w - 2n sigmoid(-w) is increasing in w
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - 2 * n / (1 + math.exp(mid)) < 0 else (lo, mid)
    assert abs(float(w[0, 0]) - lo) < 1e-9 and abs(float(b[0])) < 1e-9


@pytest.mark.parametrize("l2", [1.0, 0.1])
def test_probe_gradient_of_sklearn_objective_is_zero(l2):
    """The objective is strictly convex: a zero gradient (computed here in numpy) is its unique minimum."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, 40, 6))
    y = (X[..., 0] + 0.5 * rng.normal(size=(3, 40)) > 0.3).astype(np.float64)[0]  # labels of head 0's data
    w, b = iti.fit_probes(torch.tensor(X), torch.tensor(y), l2=l2)
    for g in range(3):
        p = 1 / (1 + np.exp(-(X[g] @ w[g].numpy() + float(b[g]))))
        np.testing.assert_allclose(X[g].T @ (p - y) + l2 * w[g].numpy(), 0, atol=1e-7)
        np.testing.assert_allclose((p - y).sum(), 0, atol=1e-7)


def test_probe_on_separable_data_stays_finite():
    X = torch.tensor([[[-2.0, 0.0], [-1.0, 0.5], [1.0, 0.1], [2.0, -0.3]]])  # separable on feature 0
    w, b = iti.fit_probes(X, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(w).all() and w[0, 0] > 0
    with pytest.raises(ValueError, match="l2 must be positive"):
        iti.fit_probes(X, torch.tensor([0, 0, 1, 1]), l2=0.0)


def test_probe_accuracies_and_ranking_by_hand():
    """Four heads (2 layers x 2), hd = 2; training data separable along feature 0 for every head.
    Validation: head (0, 0) sees 3 of 4 points on the right side -> 0.75; (0, 1) all flipped -> 0;
    (1, 0) all right -> 1; (1, 1) 3 of 4 -> 0.75, tied with (0, 0) and ranked after it."""
    train = torch.tensor([[-2., 0.], [-1., 1.], [1., -1.], [2., 0.]])  # labels 0, 0, 1, 1
    acts = train[:, None, None, :].expand(4, 2, 2, 2).clone()  # (N, L, H, hd)
    labels = torch.tensor([0, 0, 1, 1])
    val_labels = torch.tensor([0, 0, 1, 1])
    val = torch.zeros(4, 2, 2, 2)
    val[:, 0, 0] = torch.tensor([[-3., 0.], [2., 0.], [3., 0.], [4., 0.]])  # second point wrong
    val[:, 0, 1] = torch.tensor([[3., 0.], [4., 0.], [-3., 0.], [-4., 0.]])  # all wrong
    val[:, 1, 0] = torch.tensor([[-3., 0.], [-4., 0.], [3., 0.], [4., 0.]])  # all right
    val[:, 1, 1] = torch.tensor([[-3., 0.], [-4., 0.], [3., 0.], [-5., 0.]])  # last point wrong
    accuracies = iti.probe_accuracies(acts, labels, val, val_labels, heads_per_chunk=3)
    torch.testing.assert_close(accuracies, torch.tensor([[0.75, 0.0], [1.0, 0.75]]))
    ranking = iti.rank_heads_iti(accuracies)
    assert [(r.layer, r.head) for r in ranking] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert isinstance(ranking[0], lofit.HeadScore) and ranking[0].score == 1.0
    assert lofit.select_heads(ranking, k=2) == [(1, 0), (0, 0)]


# ---------------------------------------------------------------------------------------------
# The intervention is a LoFiT v


def test_alpha_zero_is_the_base_model_bit_for_bit():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with lofit.offsets_disabled(model):
        base = model(ids)
    u = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    iti.apply_iti(model, [(0, 1), (1, 3)], u, torch.rand(2, 4) + 0.5, alpha=0.0)
    assert torch.equal(model(ids), base)


def test_apply_iti_equals_a_pre_hook_adding_alpha_sigma_u_to_each_head():
    """The original's mechanism (an edit of o_proj's input, head by head) on an untouched copy."""
    model, reference = tiny_model(), tiny_model()
    u = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    sigma, alpha, heads = torch.rand(2, 4) + 0.5, 15.0, [(0, 1), (1, 3), (1, 0)]
    iti.apply_iti(model, heads, u, sigma, alpha)

    def edit(hooked):
        def hook(module, inputs):
            z = inputs[0].view(*inputs[0].shape[:2], 4, 8).clone()  # (B, T, H, hd)
            for layer, h in heads:
                if layer == hooked:
                    z[:, :, h] += alpha * sigma[layer, h] * u[layer, h]
            return (z.view(inputs[0].shape),)
        return hook

    for layer, attn in enumerate(lofit.attentions(reference)):
        attn.o_proj.register_forward_pre_hook(edit(layer))
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids), reference(ids))
    for layer, attn in enumerate(lofit.attentions(model)):  # A = 0; v only on the chosen heads
        assert not attn.lofit_A.any()
        for head in range(4):
            assert bool(attn.lofit_v[head].any()) == ((layer, head) in heads)
            if (layer, head) in heads:
                torch.testing.assert_close(attn.lofit_v[head].norm(), alpha * sigma[layer, head])


def test_iti_adapter_round_trips_and_merges_into_o_proj(tmp_path):
    model = tiny_model()
    u = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    iti.apply_iti(model, [(1, 2), (0, 0)], u, torch.rand(2, 4) + 0.5, alpha=15.0)
    ids = torch.randint(0, TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with_offsets = model(ids)
    adapter.save_adapter(tmp_path / "iti.safetensors", model, [(1, 2), (0, 0)], stage=2, task="truthfulqa",
                       hparams={"method": "iti"})
    fresh = tiny_model()
    meta = adapter.load_adapter(tmp_path / "iti.safetensors", fresh)
    assert meta["heads"] == [(1, 2), (0, 0)] and meta["hparams"]["method"] == "iti"
    assert torch.equal(fresh(ids), with_offsets)
    adapter.merge_offsets(fresh)
    assert all(not attn.lofit_v.any() for attn in lofit.attentions(fresh))
    torch.testing.assert_close(fresh(ids), with_offsets, rtol=1e-5, atol=1e-5)


def test_apply_iti_rejects_heads_the_model_lacks():
    with pytest.raises(ValueError, match="outside this model"):
        iti.apply_iti(tiny_model(), [(2, 0)], torch.zeros(2, 4, 8), torch.zeros(2, 4), 1.0)


# ---------------------------------------------------------------------------------------------
# Texts and activations


def test_texts_are_q_a_with_every_true_then_false_answer():
    ex = Example(id="0", prompt="", answer="", question="Is it?", true_answers=["Yes.", "Sure."],
                 false_answers=["No."])
    texts, labels = iti.iti_texts([ex])
    assert texts == ["Q: Is it? A: Yes.", "Q: Is it? A: Sure.", "Q: Is it? A: No."]
    assert labels.tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="true and false answers"):
        iti.iti_texts([Example(id="7", prompt="Q: x A:", answer=" y")])


def test_activations_equal_transformers_o_proj_inputs_at_the_last_token():
    """stories260K in transformers, one unpadded text at a time, a pre-hook reading o_proj's input."""
    from hf_reference import load_hf
    from tokenizer import load_tokenizer
    weights = STORIES260K
    model, tokenizer, hf = Llama.from_pretrained(str(weights)), load_tokenizer(str(weights)), load_hf(weights)
    texts = ["Q: Who is Tom? A: A cat.", "Q: Where? A: Home.", "Q: Why did the dog run so fast? A: It was late."]
    lofit.attentions(model)[0].lofit_v.data.fill_(3.0)  # ignored: activations come from the base model
    ours = iti.collect_head_activations(model, tokenizer, texts, batch_size=2)  # (N, L, H, hd)
    seen = {}
    hooks = [block.self_attn.o_proj.register_forward_pre_hook(
        lambda m, inputs, layer=layer: seen.__setitem__(layer, inputs[0][0, -1].view(8, 8)))
        for layer, block in enumerate(hf.model.layers)]
    for n, text in enumerate(texts):
        with torch.no_grad():
            hf(torch.tensor([tokenizer.encode(text, bos=True)]))
        for layer in range(5):
            torch.testing.assert_close(ours[n, layer], seen[layer], rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()
    assert lofit.attentions(model)[0].lofit_enabled  # switched back on afterwards
