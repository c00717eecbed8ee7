"""machinery/speed.py: --matmul-precision high and --compile give the eager fp32 numbers (CPU, stories260K).

Tolerances: TF32 exists on GPUs only, so on a CPU "high" must give the fp32 numbers to 1e-6
(relative); a compiled forward fuses and reorders fp32 arithmetic, so it is held to 1e-4 relative
on the loss and 1e-4 of each gradient's largest entry (observed: loss equal, gradients within 3e-6).
"""
import shutil

import pytest
import torch

import lofit
from conftest import STORIES260K
from data import collate, load_examples, tokenize_training_set
from machinery import speed
from machinery.checkpoints import load_model
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(str(STORIES260K))
    data = tokenize_training_set("mquake", load_examples("mquake", "train", train_size=4, seed=0), tokenizer)
    return collate(data.items, data.pad_id)


def stage1_model():
    model = load_model(STORIES260K)
    model.requires_grad_(False)
    params = lofit.setup_stage1(model, 1e-3, generator=torch.Generator().manual_seed(0))
    return model, params


def loss_and_grads(model, params, batch):
    """Stage 1's CE loss and the gradients of every lofit_A, as a training step computes them."""
    for p in params:
        p.grad = None
    loss = lofit.ce_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def assert_close_to(eager, other, rtol):
    (loss, grads), (loss2, grads2) = eager, other
    torch.testing.assert_close(loss2, loss, rtol=rtol, atol=0)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, rtol=0, atol=rtol * g.abs().max().item())


def test_high_matmul_precision_is_fp32_on_a_cpu_and_is_restored(batch):
    model, params = stage1_model()
    eager = loss_and_grads(model, params, batch)
    with speed.matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
        high = loss_and_grads(model, params, batch)
    assert torch.get_float32_matmul_precision() == "highest"
    assert_close_to(eager, high, rtol=1e-6)
    with pytest.raises(ValueError, match="one of"):
        with speed.matmul_precision("medium"):  # bf16 products: not offered
            pass


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU generates C++ and needs a C compiler (cc)")
def test_compiled_forward_trains_and_scores_as_the_eager_one(batch):
    model, params = stage1_model()
    eager = loss_and_grads(model, params, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
    speed.compile_forward(model)
    compiled = loss_and_grads(model, params, batch)
    assert_close_to(eager, compiled, rtol=1e-4)
    with torch.no_grad():  # scoring: the same forward without gradients
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), logits, rtol=1e-4, atol=1e-4)
