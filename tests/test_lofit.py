"""lofit.py: both stages, head ranking, the losses, and parity with the original's arithmetic.

The independent references: transformers' LlamaForCausalLM with a forward-pre-hook on each
o_proj (exactly how the original applies (1 + A) * z + v), HF's own cross-entropy, hand-computed
DPO values, and a task built so that the heads that matter are known in advance.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lofit
from hf_reference import load_hf, make_checkpoint
from model import Llama, LlamaConfig

VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama-2-shaped checkpoint: 2 layers x 4 heads, head_dim 16."""
    path, _ = make_checkpoint(tmp_path_factory.mktemp("llama2"), "llama2", vocab_size=VOCAB)
    return path


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ce_batch(B=3, T=12, seed=0):
    """Right-padded ids with the last few real tokens of each row as the 'answer'."""
    ids = torch.randint(3, VOCAB, (B, T), generator=gen(seed))
    lengths = torch.tensor([T, T - 3, T - 5][:B])
    positions = torch.arange(T)
    attention_mask = (positions < lengths[:, None]).long()
    loss_mask = (positions >= lengths[:, None] - 4) & attention_mask.bool()
    ids = ids * attention_mask  # pad id 0
    return {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lofit_" not in n}


def train_steps(model, params, batch, steps, l1=0.0, lr=1e-2):
    """AdamW as the paper used it (weight decay 0), linear decay, grad-norm clip 1.0."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (steps - s) / steps)
    for _ in range(steps):
        loss = lofit.ce_loss(model, batch) + l1 * lofit.l1_penalty(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Zero offsets are the base model


def test_zero_offsets_are_the_base_model_bitwise(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    batch = ce_batch()
    with torch.no_grad():
        with lofit.offsets_disabled(model):
            base = model(batch["input_ids"], batch["attention_mask"])
        lofit.setup_stage1(model, init_std=0.0)  # A = 0, v = 0, but now trainable
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), base)
        lofit.setup_stage2(model, [(0, 1), (1, 3)], init_std=0.0)
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), base)


def test_offsets_disabled_is_the_base_model_and_restores(checkpoint):
    model, base = Llama.from_pretrained(checkpoint), Llama.from_pretrained(checkpoint)
    lofit.setup_stage2(model, [(0, 0), (1, 2)], init_std=0.3, generator=gen(0))
    model.layers[1].self_attn.lofit_enabled = False  # a layer already off stays off afterwards
    ids = ce_batch()["input_ids"]
    with torch.no_grad():
        with lofit.offsets_disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert [b.self_attn.lofit_enabled for b in model.layers] == [True, False]
        with pytest.raises(RuntimeError), lofit.offsets_disabled(model):
            raise RuntimeError("boom")
        assert [b.self_attn.lofit_enabled for b in model.layers] == [True, False]
        model.layers[1].self_attn.lofit_enabled = True
        assert not torch.equal(model(ids), base(ids))


# ---------------------------------------------------------------------------------------------
# The original's arithmetic: HF Llama + a forward-pre-hook on o_proj


@pytest.mark.parametrize("family", ["llama2", "llama3.1"])
def test_logits_and_gradients_match_hf_with_o_proj_pre_hook(tmp_path, family):
    path, _ = make_checkpoint(tmp_path, family, vocab_size=VOCAB)
    hf = load_hf(path, attn="eager")
    ours = Llama.from_pretrained(path)
    cfg = ours.config
    L, H, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
    A = (0.3 * torch.randn(L, H, hd, generator=gen(1))).requires_grad_(True)
    v = (0.3 * torch.randn(L, H, hd, generator=gen(2))).requires_grad_(True)

    def offset(layer):
        def pre_hook(module, args):
            x = args[0]  # (B, T, H*hd): the concatenated head outputs
            z = x.view(*x.shape[:-1], H, hd)  # (B, T, H, hd)
            return ((1 + A[layer]) * z + v[layer]).view(x.shape),
        return pre_hook

    for layer, block in enumerate(hf.model.layers):
        block.self_attn.o_proj.register_forward_pre_hook(offset(layer))
    with torch.no_grad():
        for layer, attn in enumerate(lofit.attentions(ours)):
            attn.lofit_A.copy_(A[layer])
            attn.lofit_v.copy_(v[layer])
    batch = ce_batch(seed=3)
    real = batch["attention_mask"].bool()  # compare real positions (right padding)
    weights = torch.randn(*batch["input_ids"].shape, VOCAB, generator=gen(4))

    hf_logits = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (hf_logits * weights)[real].sum().backward()
    our_logits = ours(batch["input_ids"], batch["attention_mask"])
    (our_logits * weights)[real].sum().backward()

    torch.testing.assert_close(our_logits[real], hf_logits[real])
    for layer, attn in enumerate(lofit.attentions(ours)):
        torch.testing.assert_close(attn.lofit_A.grad, A.grad[layer], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attn.lofit_v.grad, v.grad[layer], rtol=1e-4, atol=1e-5)
    assert A.grad.abs().min() > 0 and v.grad.abs().min() > 0  # every head's offsets matter


# ---------------------------------------------------------------------------------------------
# Stage 1


def test_stage1_setup(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    params = lofit.setup_stage1(model, generator=gen(7))
    assert [id(p) for p in params] == [id(a.lofit_A) for a in lofit.attentions(model)]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"layers.{i}.self_attn.lofit_A" for i in range(2)}
    A = torch.stack([p.detach() for p in params])  # (L, H, hd)
    assert abs(A.mean().item()) < 3e-4 and 0.8e-3 < A.std().item() < 1.2e-3  # N(0, 1e-3), 128 draws
    assert all(not a.lofit_v.any() and not a.lofit_v.requires_grad for a in lofit.attentions(model))
    again = lofit.setup_stage1(Llama.from_pretrained(checkpoint), generator=gen(7))
    assert all(torch.equal(p, q) for p, q in zip(params, again))  # the same seed gives the same A
    assert lofit.trainable_count(model) == 2 * 4 * 16


def test_l1_penalty_is_sum_of_abs_A(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    lofit.setup_stage1(model, init_std=0.5, generator=gen(0))
    by_hand = sum(abs(x) for a in lofit.attentions(model) for x in a.lofit_A.detach().flatten().tolist())
    assert lofit.l1_penalty(model).item() == pytest.approx(by_hand, rel=1e-6)
    lofit.l1_penalty(model).backward()
    for a in lofit.attentions(model):
        assert torch.equal(a.lofit_A.grad, a.lofit_A.detach().sign())


def test_stage1_training_moves_only_A(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    before = base_state(model)
    params = lofit.setup_stage1(model, generator=gen(0))
    start = [p.detach().clone() for p in params]
    batch = ce_batch()
    lofit.ce_loss(model, batch).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lofit_A" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    train_steps(model, params, batch, steps=5, l1=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in base_state(model).items())
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    assert all(not a.lofit_v.any() for a in lofit.attentions(model))


# ---------------------------------------------------------------------------------------------
# Ranking and selection


def test_rank_heads_by_l2_norm_of_A(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    lofit.setup_stage1(model, init_std=1.0, generator=gen(3))
    ranking = lofit.rank_heads(model)
    assert len(ranking) == 8 and all(isinstance(r, lofit.HeadScore) for r in ranking)
    for r in ranking:
        A = model.layers[r.layer].self_attn.lofit_A[r.head].tolist()
        assert r.score == pytest.approx(math.sqrt(sum(x * x for x in A)), rel=1e-6)
    assert [r.score for r in ranking] == sorted((r.score for r in ranking), reverse=True)
    assert {(r.layer, r.head) for r in ranking} == {(layer, h) for layer in range(2) for h in range(4)}


def test_rank_heads_ties_in_layer_head_order(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    with torch.no_grad():
        model.layers[1].self_attn.lofit_A[2] = 1.0
    ranking = lofit.rank_heads(model)
    assert ranking[0] == (1, 2, 4.0)  # ||(1, ..., 1)||_2 over head_dim 16
    assert [(r.layer, r.head) for r in ranking[1:]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]


def test_select_heads():
    ranking = [lofit.HeadScore(i // 4, i % 4, 10.0 - i) for i in range(40)]
    assert lofit.select_heads(ranking, k=3) == [(0, 0), (0, 1), (0, 2)]
    assert lofit.select_heads(ranking, k_percent=10) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert len(lofit.select_heads(ranking, k_percent=3)) == 1  # int(0.03 * 40), as the original rounds
    assert len(lofit.select_heads(ranking, k=40)) == 40
    assert lofit.select_heads([(5, 7, 0.1)], k=1) == [(5, 7)]  # plain tuples, e.g. from heads.json
    for bad in [dict(), dict(k=2, k_percent=5), dict(k=0), dict(k=41), dict(k_percent=1), dict(k_percent=150)]:
        with pytest.raises(ValueError):
            lofit.select_heads(ranking, **bad)


def test_stage1_ranks_the_heads_that_matter_first():
    """A task only some known heads can solve: stage 1 must rank exactly those heads first.

    The target distribution is the model's own output with the scales of three planted heads
    changed (+100%, -80%, +100%): the loss can be brought to 0 by finding those three A values, and
    every other head is a distraction. Three other heads are made 'loud' (their o_proj columns x3)
    so the ranking cannot succeed by picking the heads with the largest output. Stage 1 (A for
    every head from N(0, 1e-3), the L1 penalty, AdamW) must put the planted heads on top, far ahead.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, n_layers=3, n_heads=4,
                      n_kv_heads=4, head_dim=16)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # O(1) activations, so every head matters
            if p.dim() == 2 and ".lofit_" not in name:
                p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
        for layer, head in [(0, 0), (1, 2), (2, 1)]:  # loud distractors
            model.layers[layer].self_attn.o_proj.weight[:, head * 16:(head + 1) * 16] *= 3
    planted = {(0, 2): 1.0, (1, 1): -0.8, (2, 3): 1.0}
    ids = torch.randint(3, 64, (8, 16), generator=gen(1))
    with torch.no_grad():
        for (layer, head), scale in planted.items():
            model.layers[layer].self_attn.lofit_A[head] = scale
        target = F.log_softmax(model(ids), dim=-1)  # (B, T, V)

    params = lofit.setup_stage1(model, generator=gen(0))  # back to A ~ N(0, 1e-3) everywhere
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    for _ in range(30):
        logp = F.log_softmax(model(ids), dim=-1)
        kl = (target.exp() * (target - logp)).sum(-1).mean()  # soft-label cross-entropy minus entropy
        loss = kl + 1e-3 * lofit.l1_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    ranking = lofit.rank_heads(model)
    assert {(r.layer, r.head) for r in ranking[:3]} == set(planted), ranking
    assert lofit.select_heads(ranking, k=3) == [(r.layer, r.head) for r in ranking[:3]]
    assert ranking[2].score > 3 * ranking[3].score, ranking  # a clear gap, not a coin toss


# ---------------------------------------------------------------------------------------------
# Stage 2


def test_stage2_setup(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    lofit.setup_stage1(model, init_std=0.1, generator=gen(0))  # stage 1 leaves A behind...
    heads = [(1, 3), (0, 0), (1, 1)]
    params = lofit.setup_stage2(model, heads, generator=gen(5))
    attns = lofit.attentions(model)
    assert all(not a.lofit_A.any() and not a.lofit_A.requires_grad for a in attns)  # ...stage 2 resets it
    assert [id(p) for p in params] == [id(attns[0].lofit_v), id(attns[1].lofit_v)]
    draws = 1e-3 * torch.randn(3, 16, generator=gen(5))  # one row per head, in the order given
    for i, (layer, head) in enumerate(heads):
        assert torch.equal(attns[layer].lofit_v[head], draws[i])
    nonzero = {(layer, h) for layer in range(2) for h in range(4) if attns[layer].lofit_v[h].any()}
    assert nonzero == set(heads)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"layers.0.self_attn.lofit_v", "layers.1.self_attn.lofit_v"}
    assert lofit.trainable_count(model) == 3 * 16
    for bad in [[], [(0, 4)], [(2, 0)], [(0, 1), (0, 1)], [(-1, 0)]]:
        with pytest.raises(ValueError):
            lofit.setup_stage2(model, bad)


def test_trainable_count_llama2_7b_paper_numbers():
    """The paper's count for Llama-2-7B: K = 32 heads x head_dim 128 = 4,096 (no weights needed)."""
    with torch.device("meta"):
        model = Llama(LlamaConfig())  # the Llama-2-7B shape
    lofit.setup_stage2(model, [(layer, 7) for layer in range(32)])
    assert lofit.trainable_count(model) == 4096
    lofit.setup_stage1(model)
    assert lofit.trainable_count(model) == 32 * 32 * 128


def test_stage2_training_keeps_other_heads_exactly_zero(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    before = base_state(model)
    heads = [(0, 2), (1, 0), (1, 3)]
    params = lofit.setup_stage2(model, heads, generator=gen(0))
    batch = ce_batch()
    lofit.ce_loss(model, batch).backward()
    attns = lofit.attentions(model)
    for layer in range(2):
        for head in range(4):  # the hook zeroes other heads' gradients; selected ones get real ones
            assert bool(attns[layer].lofit_v.grad[head].any()) == ((layer, head) in heads)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lofit_v" not in n)
    start = {h: attns[h[0]].lofit_v[h[1]].detach().clone() for h in heads}
    train_steps(model, params, batch, steps=30, lr=0.05)
    for layer in range(2):
        assert not attns[layer].lofit_A.any()
        for head in range(4):
            row = attns[layer].lofit_v[head]
            if (layer, head) in heads:
                assert not torch.equal(row, start[(layer, head)])
            else:
                assert torch.equal(row, torch.zeros_like(row))  # exactly 0 after 30 AdamW steps
    assert all(torch.equal(p, before[n]) for n, p in base_state(model).items())


def test_setting_up_again_replaces_the_gradient_mask(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    lofit.setup_stage2(model, [(0, 0)], generator=gen(0))
    lofit.setup_stage2(model, [(0, 1), (1, 2)], generator=gen(0))  # the first mask must be gone
    lofit.ce_loss(model, ce_batch()).backward()
    v0, v1 = (a.lofit_v.grad for a in lofit.attentions(model))
    assert v0[1].any() and not v0[0].any() and v1[2].any() and not v1[[0, 1, 3]].any()
    params = lofit.setup_stage1(model, generator=gen(0))  # and stage 1 trains every head's A
    lofit.ce_loss(model, ce_batch()).backward()
    assert all(p.grad.abs().sum(-1).min() > 0 for p in params)
    assert all(not a.lofit_v.requires_grad and not a.lofit_v.any() for a in lofit.attentions(model))


# ---------------------------------------------------------------------------------------------
# Losses


def test_ce_loss_equals_hf_loss_with_masked_labels(checkpoint):
    hf, model = load_hf(checkpoint), Llama.from_pretrained(checkpoint)
    batch = ce_batch(seed=5)
    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    with torch.no_grad():
        expected = hf(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        torch.testing.assert_close(lofit.ce_loss(model, batch), expected)


def test_answer_logprobs_equal_full_logits_and_skip_the_rest(checkpoint):
    hf, model = load_hf(checkpoint), Llama.from_pretrained(checkpoint)
    batch = ce_batch(seed=6)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    with torch.no_grad():
        logp = F.log_softmax(hf(ids, attention_mask=batch["attention_mask"]).logits.float(), dim=-1)
    expected = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(1, ids.shape[1]) if mask[b, t])
                for b in range(ids.shape[0])]
    rows_seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape))
    with torch.no_grad():
        got = lofit.answer_logprobs(model, ids, batch["attention_mask"], mask)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected))
    assert rows_seen == [(int(mask[:, 1:].sum()), 64)]  # lm_head saw only the predicting positions


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0, -7.5]), torch.tensor([-12.0, -3.0, -7.5])
    rc, rr = torch.tensor([-11.0, -3.5, -6.0]), torch.tensor([-11.5, -3.5, -8.0])
    # margins: (2 - 0.5, -1 - 0, 0 - 2) = (1.5, -1, -2); loss_i = log(1 + exp(-beta * margin_i))
    for beta in (0.5, 0.1):
        expected = sum(math.log1p(math.exp(-beta * m)) for m in (1.5, -1.0, -2.0)) / 3
        assert lofit.dpo_loss(pc, pr, rc, rr, beta=beta).item() == pytest.approx(expected, rel=1e-6)
    assert lofit.dpo_loss(pc, pr, pc, pr).item() == pytest.approx(math.log(2), rel=1e-6)  # policy = reference
    policy = pc.clone().requires_grad_(True)
    lofit.dpo_loss(policy, pr, rc, rr, beta=0.5).backward()
    # d/d pc of mean log(1 + exp(-b m)) = -b * sigmoid(-b m) / P
    expected_grad = [-0.5 * (1 / (1 + math.exp(0.5 * m))) / 3 for m in (1.5, -1.0, -2.0)]
    torch.testing.assert_close(policy.grad, torch.tensor(expected_grad))


def test_dpo_reference_from_the_same_model_with_offsets_off(checkpoint):
    """Reference log-probs taken with offsets_disabled equal those of a separate base model."""
    model, base = Llama.from_pretrained(checkpoint), Llama.from_pretrained(checkpoint)
    lofit.setup_stage2(model, [(0, 1), (1, 1)], init_std=0.2, generator=gen(1))
    batch = ce_batch(seed=8)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        with lofit.offsets_disabled(model):
            ref = lofit.answer_logprobs(model, *args)
        assert torch.equal(ref, lofit.answer_logprobs(base, *args))
        assert not torch.equal(ref, lofit.answer_logprobs(model, *args))
    policy = lofit.answer_logprobs(model, *args)
    loss = lofit.dpo_loss(policy[:1], policy[1:2], ref[:1], ref[1:2])
    loss.backward()
    assert all(a.lofit_v.grad is not None for a in lofit.attentions(model))


def test_ce_loss_without_loss_tokens_is_zero_and_differentiable(checkpoint):
    model = Llama.from_pretrained(checkpoint)
    params = lofit.setup_stage1(model, generator=gen(0))
    batch = {**ce_batch(), "loss_mask": torch.zeros(3, 12, dtype=torch.bool)}
    loss = lofit.ce_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in params)
