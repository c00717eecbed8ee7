"""LoFiT training steps, ours against transformers' LlamaForCausalLM with forward-pre-hooks.

The baseline is what the original implementation amounts to: a stock transformers Llama whose
`self_attn.o_proj` inputs are rewritten by a hook, (B, T, H*hd) -> (B, T, H, hd) -> (1 + A) * z + v
-> back, with A and v held outside the model; the loss is transformers' own (full logits, then
its shifted cross-entropy over labels with -100 outside the answer). Ours is model.py with LoFiT
built in (lofit.py sets the stages up) and the loss computed from the hidden states at the answer
positions only ("ours"), or, for a like-for-like comparison, from full logits ("ours, full logits"),
and that full-logits step once more with the forward compiled as train.py --compile does it
("ours, full logits, compiled": torch.compile of model.hidden_states, machinery/speed.py).

Every side gets the same checkpoint, the same batch, the same initial A / v, fp32 on CPU, AdamW
(HF Trainer's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) over the LoFiT parameters only,
and grad-norm clipping at 1.0. A step = forward + backward + clipping + optimiser step.

- Stage 1: A trainable on every head (init N(0, 1e-3)), v = 0, loss = CE + lambda * sum |A|.
- Stage 2: A = 0, v trainable on K heads (10% of all heads, drawn with a fixed seed), CE only.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import (  # first: puts the repo root on sys.path
    Row,
    interleaved_times,
    linear_params,
    median,
    peak_memory,
    tensor_bytes,
)

import lofit  # noqa: E402

L1_LAMBDA = 5e-4  # TruthfulQA / Llama-2-7B stage-1 lambda (method.md); its value does not change the cost
LR = 5e-3


@dataclass
class TrainShape:
    """The training batch: `batch` rows of at most `seq` tokens, the last `answer` of each in the loss.

    ragged: rows of random lengths in [3/4 seq, seq], right-padded as data.collate pads them;
    otherwise every row is `seq` tokens long (no padding, so attention needs no mask).
    """
    batch: int = 8
    seq: int = 256
    answer: int = 16  # answer tokens + EOS per row (MQuAKE/CLUTRR answers are shorter; TruthfulQA's similar)
    ragged: bool = True


def make_batch(vocab: int, shape: TrainShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random token ids like data.collate builds.

    Returns input_ids (B, T), attention_mask (B, T) and loss_mask (B, T), True on the last
    `shape.answer` real tokens of each row.
    """
    g = torch.Generator().manual_seed(seed)
    B, T = shape.batch, shape.seq
    lengths = torch.randint(3 * T // 4, T + 1, (B,), generator=g) if shape.ragged else torch.full((B,), T)
    lengths[0] = T  # the batch is as wide as its longest row
    input_ids = torch.randint(3, vocab, (B, T), generator=g)  # (B, T)
    positions = torch.arange(T)[None, :]  # (1, T)
    attention_mask = (positions < lengths[:, None]).long()  # (B, T)
    loss_mask = (positions >= (lengths - shape.answer)[:, None]) & attention_mask.bool()  # (B, T)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pick_heads(n_layers: int, n_heads: int, fraction: float = 0.1, seed: int = 0) -> list[tuple[int, int]]:
    """`fraction` of all (layer, head) pairs, drawn at random with a fixed seed (stage 2's K heads)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(fraction * n_layers * n_heads))
    order = torch.randperm(n_layers * n_heads, generator=g)[:k].tolist()
    return sorted((i // n_heads, i % n_heads) for i in order)


def trainable(offsets: list[nn.Parameter], masks: list[torch.Tensor]) -> list[nn.Parameter]:
    """Make the offsets of layers with a trainable head require grad; other heads' grads are zeroed
    (as lofit.setup_stage2 does for ours)."""
    params = []
    for p, mask in zip(offsets, masks):  # mask (H, 1): 1 on trainable heads
        if not mask.any():
            continue
        p.requires_grad_(True)
        if not mask.all():
            keep = mask.to(p.device).bool()
            p.register_hook(lambda grad, keep=keep: grad.masked_fill(~keep, 0))
        params.append(p)
    return params


# ----------------------------------------------------------------------------------------------
# The baseline: transformers + o_proj forward-pre-hooks


class HookedLoFiT:
    """LoFiT on a stock transformers Llama: A, v (n_heads, head_dim) per layer, applied by o_proj hooks."""

    def __init__(self, hf_model, A: list[torch.Tensor], v: list[torch.Tensor]):
        device, dtype = hf_model.device, hf_model.dtype
        self.A = [nn.Parameter(a.to(device, dtype, copy=True), requires_grad=False) for a in A]
        self.v = [nn.Parameter(b.to(device, dtype, copy=True), requires_grad=False) for b in v]
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(hf_model.model.layers)]

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]  # (B, T, H * hd): the concatenated head outputs
            B, T, _ = x.shape
            A, v = self.A[layer], self.v[layer]
            z = x.view(B, T, *A.shape)  # (B, T, H, hd)
            z = (1 + A) * z + v
            return (z.reshape(B, T, -1),) + tuple(args[1:])
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def hf_labels(batch) -> torch.Tensor:
    """transformers' labels: the token ids where the loss applies, -100 elsewhere."""
    return batch["input_ids"].masked_fill(~batch["loss_mask"], -100)


# ----------------------------------------------------------------------------------------------
# Our loss with full logits (the like-for-like variant; lofit.ce_loss is the one training uses)


def ce_loss_full_logits(model, batch) -> torch.Tensor:
    """The same loss from the full (B, T, V) logits, as transformers computes it."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
    labels = hf_labels(batch)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): position t predicts token t+1
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------
# Steps


@dataclass
class Side:
    """One contestant: a step function (returns the loss) and what it trains."""
    name: str
    step: callable
    params: list
    model: nn.Module


def make_step(loss_fn, params):
    """One training step: loss, backward, grad-norm clip at 1.0, AdamW (HF Trainer's defaults)."""
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    step.optimizer = optimizer
    return step


def ce_loss_full_logits_compiled(model, batch, compiled_hidden_states) -> torch.Tensor:
    """ce_loss_full_logits with the hidden states from a compiled model.hidden_states (--compile's)."""
    logits = model.lm_head(compiled_hidden_states(batch["input_ids"], batch["attention_mask"]))  # (B, T, V)
    shifted = F.pad(hf_labels(batch)[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)


def build_sides(ours_model, hf_model, stage: int, batch, heads, seed: int = 0,
                full_logits_variant: bool = True,
                compiled_variant: bool = False) -> tuple[list[Side], HookedLoFiT | None]:
    """The contestants of one stage, every one starting from the same A, v; and the baseline's hooks.

    Ours is set up by lofit.setup_stage1 / setup_stage2; the baseline's A, v are copies of ours.
    With hf_model None there is no baseline (and no hooks).
    """
    generator = torch.Generator().manual_seed(seed)
    if stage == 1:
        ours_params = lofit.setup_stage1(ours_model, generator=generator)
    else:
        ours_params = lofit.setup_stage2(ours_model, heads, generator=generator)
    attns = lofit.attentions(ours_model)
    n_heads = ours_model.config.n_heads
    masks = [torch.ones(n_heads, 1) if stage == 1 else
             torch.tensor([[float((layer, h) in heads)] for h in range(n_heads)]) for layer in range(len(attns))]

    sides, hooks = [], None
    if hf_model is not None:
        for p in hf_model.parameters():
            p.requires_grad_(False)
        hooks = HookedLoFiT(hf_model, [a.lofit_A.detach() for a in attns], [a.lofit_v.detach() for a in attns])
        hf_params = trainable(hooks.A if stage == 1 else hooks.v, masks)
        labels = hf_labels(batch)

        def hf_loss():
            loss = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=labels, use_cache=False).loss
            return loss + L1_LAMBDA * sum(a.abs().sum() for a in hooks.A) if stage == 1 else loss
        sides.append(Side("transformers+hooks", make_step(hf_loss, hf_params), hf_params, hf_model))

    def ours_loss(ce):
        def loss():
            return ce() + L1_LAMBDA * lofit.l1_penalty(ours_model) if stage == 1 else ce()
        return loss

    sides.append(Side("ours", make_step(ours_loss(lambda: lofit.ce_loss(ours_model, batch)), ours_params),
                      ours_params, ours_model))
    if full_logits_variant:
        # A second copy of our model would double the memory; the variant trains the same parameters,
        # so it starts where "ours" left off (the cost of a step does not depend on the values).
        sides.append(Side("ours, full logits",
                          make_step(ours_loss(lambda: ce_loss_full_logits(ours_model, batch)), ours_params),
                          ours_params, ours_model))
    if compiled_variant:  # the same step, the forward compiled (a separate callable: the model stays eager)
        compiled = torch.compile(ours_model.hidden_states)
        sides.append(Side("ours, full logits, compiled",
                          make_step(ours_loss(lambda: ce_loss_full_logits_compiled(ours_model, batch, compiled)),
                                    ours_params), ours_params, ours_model))
    return sides, hooks


def kernel_share(step, repeats: int = 3) -> dict:
    """Medians over `repeats` steps of the step's user and system CPU seconds and minor page faults.

    A step's large temporaries (the (B, T, vocab) logits, their log-softmax and gradients) are
    fresh memory each time: the allocator maps and unmaps them, and the kernel zeroes every new page
    (system time, one minor fault per 4 KiB page). `--clock cpu` counts that time, `--clock user`
    leaves it out.
    """
    samples = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF)
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        samples.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                        after.ru_minflt - before.ru_minflt))
    user, system, faults = (median([s[i] for s in samples]) for i in range(3))
    return {"user_s": user, "system_s": system, "minor_faults": faults}


def static_bytes(side: Side) -> int:
    """Weights, buffers, LoFiT parameters and optimiser state."""
    model = side.model
    tensors = list(model.parameters()) + list(model.buffers()) + list(side.params)
    for state in side.step.optimizer.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return tensor_bytes(tensors)


def run_stage(config: str, ours_model, hf_model, stage: int, shape: TrainShape, repeats: int,
              device="cpu", clock: str = "wall", heads=None, full_logits_variant: bool = True,
              peak_flops: float | None = None, compiled_variant: bool = False) -> tuple[list[Row], dict]:
    """Time one stage on one model; return the table rows and the raw numbers.

    With `peak_flops` (the machine's measured matmul FLOP/s), each side also gets a row "fraction
    of the 4N limit": 4N FLOPs per token (forward 2N, backward through the activations 2N, N the
    linear weights; a frozen base needs no weight gradients) at that peak, over the measured
    throughput. It ignores attention's T^2 work and the elementwise ops, and charges both sides
    the full 4N, so "ours" (logits at the answer positions only) can do less than the limit's work.
    """
    cfg = ours_model.config
    batch = {k: t.to(device) for k, t in make_batch(cfg.vocab_size, shape).items()}
    heads = heads if heads is not None else pick_heads(cfg.n_layers, cfg.n_heads)
    sides, hooks = build_sides(ours_model, hf_model, stage, batch, heads, full_logits_variant=full_logits_variant,
                               compiled_variant=compiled_variant)
    first_loss, peaks, warm_up = {}, {}, {}
    for side in sides:  # the first step of each side is its warm-up, and its memory is measured
        losses, began = [], time.perf_counter()
        peaks[side.name] = peak_memory(lambda: losses.append(side.step()), device)
        first_loss[side.name], warm_up[side.name] = losses[0], time.perf_counter() - began  # compiling included
    times = interleaved_times({s.name: s.step for s in sides}, repeats, device, clock)
    tokens = shape.batch * shape.seq
    tps = {name: tokens / median(t) for name, t in times.items()}
    kernel = {s.name: kernel_share(s.step) for s in sides} if device == "cpu" else {}
    base = "transformers+hooks"
    loss_gap = abs(first_loss["ours"] - first_loss[base])  # same weights, batch and A, v: same loss
    lowest = min(layer for layer, _ in heads) if stage == 2 else None
    label = f"stage {stage}" + (f" (K={len(heads)}, lowest layer {lowest})" if stage == 2 else "")
    rows = []
    for name in [s.name for s in sides][1:]:
        main = name == "ours"
        target = (1.2 if main else 1.0) if config == "medium" else None  # full logits: >= transformers
        rows.append(Row("train", config, f"{label} tokens/s" + ("" if main else f" [{name}]"),
                        tps[base], tps[name], "tok/s", True, target,
                        note=f"first-step loss gap {loss_gap:.1e}" if main else
                        f"first step {warm_up[name]:.0f} s, compiling included" if "compiled" in name else ""))
        rows.append(Row("train", config, f"{label} peak step memory" + ("" if main else f" [{name}]"),
                        peaks[base] / 2**20, peaks[name] / 2**20, "MiB", False,
                        1.0 if main and config == "medium" else None))
        if kernel:
            rows.append(Row("train", config, f"{label} system CPU s per step" + ("" if main else f" [{name}]"),
                            kernel[base]["system_s"], kernel[name]["system_s"], "s", False,
                            note=f"minor page faults per step {kernel[base]['minor_faults']:,.0f} / "
                                 f"{kernel[name]['minor_faults']:,.0f}; user CPU s "
                                 f"{kernel[base]['user_s']:.2f} / {kernel[name]['user_s']:.2f}"))
    limit = {}
    if peak_flops:
        n_params = linear_params(ours_model)
        limit = {name: t * 4 * n_params / peak_flops for name, t in tps.items()}
        for name in [s.name for s in sides][1:]:
            rows.append(Row("train", config, f"{label} fraction of the 4N-FLOP limit"
                            + ("" if name == "ours" else f" [{name}]"), limit[base], limit[name], "", True,
                            note=f"N = {n_params / 1e6:.1f}M, matmul peak {peak_flops / 1e9:.0f} GFLOP/s"))
    raw = {"stage": stage, "heads": heads, "limit_fraction": limit, "matmul_peak_flops": peak_flops,
           "shape": vars(shape), "times_s": times, "tokens_per_s": tps,
           "peak_step_bytes": peaks, "kernel_share": kernel, "static_bytes": {s.name: static_bytes(s) for s in sides},
           "first_step_loss": first_loss, "first_step_s": warm_up}
    hooks.remove()  # leave the baseline model stock for the next stage
    return rows, raw
