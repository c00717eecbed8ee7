"""lofit.pair_answer_logprobs (the shared-prompt DPO forward) against the full sequences.

Running each pair's common prefix once and the two suffixes on its KV cache must give the summed
answer log-probs of running both full sequences (answer_logprobs over data.collate's batch), and
the same LoFiT gradients, to fp32 rounding: the matrix products have other shapes, nothing else
differs.
"""
import pytest
import torch

import lofit
from data import collate
from hf_reference import make_checkpoint
from model import Llama


def random_pairs(n: int, vocab: int = 128, seed: int = 0) -> list[dict]:
    """tokenize_dpo-like pairs: BOS + prompt + answer + EOS, masks True on answer + EOS."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        prompt = [1] + ids(int(torch.randint(3, 20, (1,), generator=g)))
        chosen, rejected = ids(int(torch.randint(1, 9, (1,), generator=g))) + [2], ids(5) + [2]
        rejected_prompt = prompt[:-1] + ids(1) if i % 3 == 0 else prompt  # trl's merged last prompt token
        pairs.append({"chosen_input_ids": prompt + chosen,
                      "chosen_loss_mask": [False] * len(prompt) + [True] * len(chosen),
                      "rejected_input_ids": rejected_prompt + rejected,
                      "rejected_loss_mask": [False] * len(rejected_prompt) + [True] * len(rejected)})
    return pairs


def full_sequences(model, pairs):
    """The general path: both full sequences of every pair in one right-padded batch (train.py's before)."""
    rows = [(p[f"{side}_input_ids"], p[f"{side}_loss_mask"]) for side in ("chosen", "rejected") for p in pairs]
    batch = collate(rows, 0)
    return lofit.answer_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).view(2, -1).T


@pytest.mark.parametrize("family,stage", [("llama2", 1), ("llama3.1", 2)])
def test_shared_prefix_matches_full_sequences(tmp_path, family, stage):
    path, _ = make_checkpoint(tmp_path, family)
    model = Llama.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    params = lofit.setup_stage1(model, generator=g) if stage == 1 else \
        lofit.setup_stage2(model, [(0, 1), (1, 2), (1, 3)], init_std=0.1, generator=g)
    pairs = random_pairs(7)

    def run(fn):
        for p in params:
            p.grad = None
        logp = fn(model, pairs)
        (logp[:, 0] - 0.5 * logp[:, 1]).sum().backward()
        return logp.detach(), [p.grad.clone() for p in params]

    shared, shared_grads = run(lambda m, ps: lofit.pair_answer_logprobs(m, ps, pad_id=0))
    full, full_grads = run(full_sequences)
    assert shared.shape == (7, 2)
    with torch.no_grad():  # the sharded-model path is the full-sequence batch itself
        assert torch.equal(lofit.pair_answer_logprobs(model, pairs, pad_id=0, shared_prefix=False), full)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
