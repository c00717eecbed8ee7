"""machinery/memory_plan.py held to a measurement that shares none of its code.

The measurement runs real training steps of 2-layer models on the CPU (the project's model,
lofit.setup_stage1, the DPO and CE losses train.py uses, backward, gradient clipping, AdamW) under
a TorchDispatchMode that keeps the byte count of every tensor storage alive (a storage is added
when an op first returns it, removed by a weakref finalizer when it dies) and records the peak.
The formula's weights + LoFiT + activations must come within 5% of that peak. A 70B config
checks the verdicts: 8 x 80 GiB fits when sharded, 1 x 80 GiB does not and gets a fix.

Sharding is checked analytically only (FSDP2 needs a process group; its gathered-block term is
the formula's stated assumption): the sharded weights must be 1/world of the blocks plus the
replicated rest, and never more than the replicated plan.
"""
import json
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lofit
from machinery.memory_plan import Lengths, format_plan, lengths_from_items, plan_memory
from model import Llama, LlamaConfig


class LiveBytes(TorchDispatchMode):
    """Bytes of every tensor storage alive, and their peak, while the mode is on.

    Storages that exist before (the model's parameters) are registered with `hold`.
    """

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def hold(self, tensors):
        for t in tensors:
            self._track(t)

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def model_like_from_pretrained(config: LlamaConfig, dtype: torch.dtype) -> Llama:
    """A random Llama as train.py holds it: base in `dtype` and frozen, every lofit_* parameter fp32."""
    torch.manual_seed(0)
    model = Llama(config).to(dtype)
    for block in model.layers:
        attn = block.self_attn
        for name, p in list(attn.named_parameters(recurse=False)):
            if name.startswith("lofit_"):
                setattr(attn, name, nn.Parameter(torch.zeros(p.shape, dtype=torch.float32)))
    model.requires_grad_(False)
    return model


def dpo_pairs(n: int, prompt: int, answer: int, vocab: int):
    """n pairs whose prompt is `prompt` tokens and both answers `answer` tokens (every row at full length)."""
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(n):
        shared = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (answer,), generator=g).tolist()
        rejected = [(t + 1) % vocab or 3 for t in chosen]  # differs from the first answer token on
        mask = [False] * prompt + [True] * answer
        pairs.append({"chosen_input_ids": shared + chosen, "chosen_loss_mask": mask,
                      "rejected_input_ids": shared + rejected, "rejected_loss_mask": mask})
    return pairs


def measured_peak(config, dtype, loss, rows, prompt, answer, shared_prefix=True, steps=2) -> int:
    """Peak live bytes over `steps` stage-1 training steps of `rows` examples (pairs for DPO)."""
    model = model_like_from_pretrained(config, dtype)
    params = lofit.setup_stage1(model, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=False)
    pairs = dpo_pairs(rows, prompt, answer, config.vocab_size)
    reference = torch.zeros(rows, 2)
    mode = LiveBytes()
    mode.hold(list(model.parameters()) + list(model.buffers()) + [reference])
    with mode:
        for _ in range(steps):
            if loss == "dpo":
                policy = lofit.pair_answer_logprobs(model, pairs, 0, shared_prefix=shared_prefix)
                value = lofit.dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1])
            else:
                ids = torch.tensor([p["chosen_input_ids"] for p in pairs])
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "loss_mask": torch.tensor([p["chosen_loss_mask"] for p in pairs])}
                value = lofit.ce_loss(model, batch)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del value
    return mode.peak


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=8)
GQA = dict(vocab_size=384, hidden_size=96, intermediate_size=256, n_layers=2, n_heads=12, n_kv_heads=4, head_dim=8)
WIDE_VOCAB = dict(vocab_size=4096, hidden_size=64, intermediate_size=160, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16)

CASES = [  # (config, dtype, loss, rows, prompt, answer, shared_prefix)
    (TINY, torch.float32, "dpo", 4, 24, 12, True),
    (TINY, torch.bfloat16, "dpo", 4, 24, 12, True),
    (GQA, torch.float32, "dpo", 3, 30, 10, True),
    (GQA, torch.bfloat16, "dpo", 3, 30, 10, False),
    (TINY, torch.float32, "ce", 4, 30, 10, True),
    (GQA, torch.bfloat16, "ce", 4, 40, 6, True),
    (WIDE_VOCAB, torch.float32, "dpo", 2, 16, 16, True),
]


@pytest.mark.parametrize("shape, dtype, loss, rows, prompt, answer, shared_prefix", CASES)
def test_formula_within_5_percent_of_measured_peak(shape, dtype, loss, rows, prompt, answer, shared_prefix):
    config = LlamaConfig(**shape)
    measured = measured_peak(config, dtype, loss, rows, prompt, answer, shared_prefix)
    plan = plan_memory(config, lengths=Lengths(prompt, answer), batch=rows, loss=loss, dtype=dtype,
                       shared_prefix=shared_prefix, overhead_gib=0.0)
    predicted = plan.tensor_gib * 2 ** 30
    assert abs(predicted / measured - 1) <= 0.05, (predicted, measured, predicted / measured)


LLAMA_2_70B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
               "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
               "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 4096}
TRUTHFULQA = Lengths(prompt=76, answer=35)  # the longest TruthfulQA prompt and answer with Llama-2's tokenizer


def test_70b_on_eight_80gib_gpus_fits_sharded():
    plan = plan_memory(LLAMA_2_70B, lengths=TRUTHFULQA, batch=8, loss="dpo", dtype="bfloat16",
                       sharding="shard", world=8, gpu_memory_gib=80)
    assert plan.sharding == "shard" and plan.fits, format_plan(plan)
    replicated = plan_memory(LLAMA_2_70B, lengths=TRUTHFULQA, batch=8, loss="dpo", dtype="bfloat16",
                             sharding="replicate", world=8, gpu_memory_gib=80)
    assert not replicated.fits and "--sharding shard" in replicated.fix


def test_70b_on_one_80gib_gpu_does_not_fit_and_names_a_fix():
    plan = plan_memory(LLAMA_2_70B, lengths=TRUTHFULQA, batch=8, loss="dpo", dtype="float32",
                       sharding="replicate", world=1, gpu_memory_gib=80)
    assert not plan.fits and plan.fix and "GPUs" in plan.fix, plan.fix
    text = format_plan(plan)
    last = json.loads(text.splitlines()[-1])
    assert last["fits"] is False and last["sharding"] == "replicate" and last["per_gpu_gib"] > 80
    assert "cheapest fix" in text


def test_sharded_weights_are_a_world_share_of_the_blocks():
    one = plan_memory(LLAMA_2_70B, lengths=TRUTHFULQA, batch=8, dtype="bfloat16", world=1)
    eight = plan_memory(LLAMA_2_70B, lengths=TRUTHFULQA, batch=8, dtype="bfloat16", sharding="shard", world=8)
    outside = (2 * 32000 * 8192 + 8192) * 2 / 2 ** 30  # embeddings, lm_head, final norm: replicated
    assert eight.weights_gib == pytest.approx((one.weights_gib - outside) / 8 + outside, rel=1e-3)
    assert eight.gathered_gib == pytest.approx(3 * (one.weights_gib - outside) / 80, rel=1e-6)


def test_lengths_from_items_takes_the_longest_prompt_and_answer():
    pairs = dpo_pairs(2, 5, 3, 100)
    pairs[1]["rejected_input_ids"] = pairs[1]["rejected_input_ids"] + [7, 7]
    pairs[1]["rejected_loss_mask"] = pairs[1]["rejected_loss_mask"] + [True, True]
    assert lengths_from_items("dpo", pairs) == Lengths(5, 5)
    assert lengths_from_items("ce", [([1, 2, 3, 4], [False, False, True, True])]) == Lengths(2, 2)
