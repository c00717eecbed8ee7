"""The model's fast paths give the numbers of the paths they replace.

Right-padded batches without a cache (every training batch) run SDPA's plain causal kernel instead
of a boolean (B, 1, T, T) mask: real positions must give bit-identical logits, and LoFiT gradients
identical ones (bit for bit with multi-head attention; with grouped-query attention the key/value
gradients are summed over each group in another order, so to fp32 rounding).
"""
import pytest
import torch

import lofit
import model as model_module
from hf_reference import make_checkpoint
from model import Llama


def right_padded(vocab: int, lengths: list[int], seed: int = 0):
    """input_ids and attention_mask (B, max(lengths)) padded on the right, as data.collate pads."""
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, 0), mask


def explicit_mask(attention_mask, B, past, T, device):
    """The general path: positions from the real tokens and the boolean mask, whatever the padding."""
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None, :]
    return positions, ((k <= q) & (attention_mask.bool()[:, None, :] | (k == q)))[:, None]


def test_right_padding_needs_no_mask():
    _, mask = right_padded(128, [7, 5, 3])
    positions, attn = model_module.positions_and_mask(mask, 3, 0, 7, "cpu")
    assert attn is None and torch.equal(positions, explicit_mask(mask, 3, 0, 7, "cpu")[0])
    left = mask.flip(-1)  # left padding (generation) still needs the mask
    assert model_module.positions_and_mask(left, 3, 0, 7, "cpu")[1] is not None


@pytest.mark.parametrize("family,dtype", [("llama2", torch.float32), ("llama3.1", torch.float32),
                                          ("llama2", torch.bfloat16), ("smollm2", torch.bfloat16)])
def test_right_padded_logits_are_bit_identical(tmp_path, monkeypatch, family, dtype):
    path, _ = make_checkpoint(tmp_path, family)
    model = Llama.from_pretrained(path, dtype=dtype)
    ids, mask = right_padded(128, [24, 17, 9, 24])
    real = mask.bool()
    with torch.no_grad():
        fast = model(ids, mask)
        monkeypatch.setattr(model_module, "positions_and_mask", explicit_mask)
        general = model(ids, mask)
    assert torch.equal(fast[real], general[real])


@pytest.mark.parametrize("family", ["llama2", "llama3.1"])
def test_right_padded_lofit_gradients_match(tmp_path, monkeypatch, family):
    path, _ = make_checkpoint(tmp_path, family)
    model = Llama.from_pretrained(path)
    params = lofit.setup_stage1(model, generator=torch.Generator().manual_seed(0))
    ids, mask = right_padded(128, [24, 17, 9, 24])
    loss_mask = mask.bool() & (torch.arange(24)[None, :] >= torch.tensor([18, 11, 4, 18])[:, None])
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}

    def grads():
        for p in params:
            p.grad = None
        lofit.ce_loss(model, batch).backward()
        return [p.grad.clone() for p in params]

    fast = grads()
    monkeypatch.setattr(model_module, "positions_and_mask", explicit_mask)
    general = grads()
    for a, b in zip(fast, general):
        if family == "llama2":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_frozen_layers_below_the_lowest_trained_head_record_no_backward(tmp_path):
    """Stage 2 needs no backward below its lowest trained layer, and autograd already records none:
    the hidden state entering that layer does not require grad, so wrapping the layers below it in
    no_grad (measured: no faster, identical gradients) would change nothing."""
    path, _ = make_checkpoint(tmp_path, "llama2", num_hidden_layers=4)
    model = Llama.from_pretrained(path)
    lofit.setup_stage2(model, [(2, 1), (3, 0)], generator=torch.Generator().manual_seed(0))
    needs_grad = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda module, args: needs_grad.append(args[0].requires_grad))
    ids, mask = right_padded(128, [12, 9])
    loss_mask = mask.bool() & (torch.arange(12)[None, :] >= 6)
    loss = lofit.ce_loss(model, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask})
    assert needs_grad == [False, False, False, True] and loss.requires_grad
