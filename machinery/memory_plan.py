"""Per-GPU peak memory of a LoFiT training run, from the model's config alone (no weights read).

    plan = plan_memory(config, lengths=Lengths(prompt=76, answer=35), batch=8, loss="dpo",
                       dtype="bfloat16", sharding="replicate", world=1, gpu_memory_gib=80)
    print(format_plan(plan))   # a table, a verdict, and last one JSON line

What one rank holds at the peak of a training step (train.py: micro_batch_loss, then backward):

- weights: the frozen base in the run's dtype. replicate: all of it. shard (FSDP2, distributed.py
  load_sharded): 1/world of every block tensor's rows (FSDP2's torch.chunk layout), plus the
  replicated embeddings, final norm and lm_head (a tied lm_head counted once).
- gathered (shard only): unsharded block weights alive at once. FSDP2 all-gathers a block just
  before it runs and frees it after, while the next block's all-gather is already in flight
  (forward prefetch, and backward prefetch of the block below); an all-gather lands in one flat
  buffer that is then copied out into the block's parameters, so for a moment the prefetched
  block is there twice: GATHERED_BLOCKS = 3 blocks (the running one, the next one's flat buffer
  and its copy). Not measured here (no process group in the tests); issue 26's FSDPMemTracker
  simulation of 7B/13B/70B agrees with 3 within 2% and not with 2 (docs/gpu.md).
- lofit: every layer's lofit_A and lofit_v (n_heads, head_dim) in fp32, plus, for the trained
  tensors, their fp32 gradient and AdamW's two fp32 slots (exp_avg, exp_avg_sq). Stage 1 trains
  lofit_A of every layer; stage 2 trains lofit_v of the layers holding one of the K heads (the
  whole tensor carries state; a gradient hook zeroes the other rows), so stage 1 is the larger.
- activations: what autograd saves for the backward of one micro-batch, plus what the last
  pass adds at the step's peak moment. Only the LoFiT offsets require gradients, so an op saves
  only what the gradient of its activation input needs (a frozen Linear saves its weight, which
  is already counted, and not its input). Per token of a pass through layer l (stage 1; b =
  bytes of the model dtype):
    z.float()                   H*hd*4      for lofit_A's gradient (in fp32 it is SDPA's output)
    post_attention_layernorm    D*4 + 4     x in fp32 and its rsqrt
    MLP                         3*I*b       gate_proj(x), up_proj(x) and silu(gate)
  and, in layers l >= 1 only (layer 0's input does not depend on a trained parameter):
    input_layernorm             D*4 + 4
    attention                   q H*hd*b, k and v H_kv*hd*b each (causal, no mask), SDPA's
                                logsumexp H*4, SDPA's output H*hd*b when the dtype is not fp32
                                (in fp32 the output is z itself, counted above)
  and once per pass RoPE's cos and sin (2*hd*b). On top, the largest of (peak_over_saved): the
  loss's backward (final norm, plus 3*N*V*4 for N answer tokens: logits are computed at answer
  positions only, lofit.answer_token_logprobs), its forward (2*N*V*4 plus DPO's KV cache), the
  final norm's backward (fp32 gradients, 5*D*4 per token) or the last MLP's backward (3*I*b +
  2*D*b per token).
  DPO with a replicated base runs each pair's prompt once (lofit.pair_answer_logprobs): a prefix
  pass of r rows x (prompt - 1) tokens, whose hidden states are dropped (its last layer keeps
  only input_layernorm's tensors; its k and v live on in the cache), then a suffix pass of 2r
  rows x (answer + 1) tokens on top of the cache; the suffix pass attends with a mask, so SDPA
  saves k and v over prompt + answer keys (repeated to all n_heads when n_kv_heads < n_heads)
  and the mask as a float (T x keys), and the cache stays alive until the loss has been computed
  (layer 0's always, the others' too when SDPA saved repeated copies).
  A sharded base runs the 2r full sequences in one causal pass (an FSDP2 block cannot run twice
  before one backward). CE runs r full sequences.
  Each row is counted at the longest prompt and the longest answer (padding to the batch's
  longest row), so the estimate is an upper bound for real batches.
- overhead: a stated fixed amount for what no tensor accounts for: the CUDA context and kernels
  (~0.5-1 GiB), NCCL buffers, and the caching allocator's rounding and fragmentation.

Not counted: the DPO reference pass and evaluation (no gradients, so far smaller than a training
step at the same batch), and kernels' private workspaces (e.g. attention's).
tests/test_memory_plan.py holds the activation and weight terms to an independent measurement
(every storage alive during a real CPU step) within 5% on 2-layer configs.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from data import TASK_INFO, load_examples, tokenize_training_set
from machinery import distributed
from machinery.flags import UsageError
from model import LlamaConfig
from tokenizer import TokenizerError, load_tokenizer

GiB = 2 ** 30
FP32 = 4
GATHERED_BLOCKS = 3  # unsharded blocks alive at once under FSDP2: the running one, the next one gathered and copied out
OVERHEAD_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: stated, not derived
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
SHARDINGS = ("replicate", "shard")
LOSSES = ("ce", "dpo")


@dataclass(frozen=True)
class Lengths:
    """Token counts of the longest training row: the prompt (BOS included) and the answer (EOS included).

    DPO: the prompt both answers share and the longer of the two answers; CE: the example's
    prompt and answer (the loss falls on the answer tokens).
    """
    prompt: int
    answer: int

    @property
    def sequence(self) -> int:
        return self.prompt + self.answer


def lengths_from_items(loss: str, items: list) -> Lengths:
    """The longest prompt and the longest answer in tokenized training items (train.TrainData.items).

    CE items are (ids, loss_mask) pairs; DPO items are data.tokenize_dpo dicts. Taking the two
    maxima separately can only overestimate a real row.
    """
    if not items:
        raise ValueError("no training items to measure")
    prompts, answers = [], []
    for item in items:
        sides = [(item[f"{s}_input_ids"], item[f"{s}_loss_mask"]) for s in ("chosen", "rejected")] \
            if loss == "dpo" else [item]
        for ids, mask in sides:
            start = mask.index(True) if True in mask else len(ids)
            prompts.append(start)
            answers.append(len(ids) - start)
    return Lengths(max(prompts), max(max(answers), 1))


def task_limit_lengths(task: str) -> Lengths:
    """The longest rows a task's tokenization allows (data.TASK_INFO), for a plan made without the data.

    DPO: a prompt cut to max_prompt_len and an answer cut to max_len - max_prompt_len (trl's rule);
    CE: max_len tokens, counted as 1 prompt token and max_len - 1 answer tokens (the most logits).
    """
    info = TASK_INFO[task]
    if info.loss == "dpo":
        return Lengths(info.max_prompt_len, info.max_len - info.max_prompt_len)
    return Lengths(1, info.max_len - 1)


@dataclass
class MemoryPlan:
    """One rank's peak memory for a training step, by component (GiB), and whether it fits."""
    weights_gib: float
    gathered_gib: float
    lofit_gib: float
    activations_gib: float
    overhead_gib: float
    per_gpu_gib: float
    gpu_memory_gib: float
    fits: bool
    sharding: str
    world: int
    dtype: str
    loss: str
    batch: int
    micro_batch: int
    lengths: Lengths
    fix: str | None = None  # the cheapest change that fits, when this does not

    @property
    def tensor_gib(self) -> float:
        """The peak of live tensors alone (per_gpu_gib without the fixed overhead)."""
        return self.per_gpu_gib - self.overhead_gib

    def summary(self) -> dict:
        """The JSON-able record: every component plus the verdict."""
        out = asdict(self)
        out["lengths"] = {"prompt": self.lengths.prompt, "answer": self.lengths.answer}
        out["tensor_gib"] = self.tensor_gib
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Counting


def config_from(config):
    """A model.LlamaConfig from one, or from a Hugging Face config.json dict."""
    if isinstance(config, dict):
        return LlamaConfig.from_hf(config)
    return config


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype name ("float32", "bf16", ...) or a torch.dtype."""
    if hasattr(dtype, "itemsize"):
        return dtype.itemsize
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.") if hasattr(dtype, "itemsize") else \
        {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def block_tensor_shapes(c) -> list[tuple[int, ...]]:
    """The frozen tensors of one block, as Block builds them (LoFiT's excluded)."""
    D, inter, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    shapes = [(q, D), (kv, D), (kv, D), (D, q), (inter, D), (inter, D), (D, inter), (D,), (D,)]
    if c.attention_bias:
        shapes += [(q,), (kv,), (kv,), (D,)]
    if c.mlp_bias:
        shapes += [(inter,), (inter,), (D,)]
    return shapes


def outside_block_numel(c) -> int:
    """Embeddings, final norm and lm_head (one matrix when tied): what FSDP sharding leaves replicated."""
    embed = c.vocab_size * c.hidden_size
    return embed * (1 if c.tie_word_embeddings else 2) + c.hidden_size


def base_numel(c) -> int:
    """Frozen base parameters (a tied embedding counted once)."""
    return c.n_layers * sum(math.prod(s) for s in block_tensor_shapes(c)) + outside_block_numel(c)


def sharded_block_numel(c, world: int) -> int:
    """Elements of one block a rank keeps under FSDP2: ceil(rows / world) rows of every tensor."""
    return sum(-(-s[0] // world) * math.prod(s[1:]) for s in block_tensor_shapes(c))


def lofit_bytes(c, k_heads: int | None = None) -> int:
    """lofit_A and lofit_v (fp32) plus the trained tensors' gradients and AdamW's two slots, max over the stages."""
    per_layer = c.n_heads * c.head_dim * FP32
    stage1_layers = c.n_layers  # lofit_A of every layer
    stage2_layers = c.n_layers if k_heads is None else min(c.n_layers, k_heads)  # layers with a selected head
    return 2 * c.n_layers * per_layer + 3 * per_layer * max(stage1_layers, stage2_layers)


def layer_saved_bytes(c, rows: int, tokens: int, b: int, grad_input: bool,
                      keys: int | None = None) -> int:
    """Bytes autograd saves in one block for `rows` x `tokens` new positions (stage 1).

    grad_input: the block's input depends on a trained parameter (every layer but the first).
    keys: attention with a mask over `keys` key positions (cached prompt + new tokens); None is
    plain causal attention over the new tokens.
    """
    H, Hkv, hd, D, inter = c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    tok = rows * tokens
    n = tok * H * hd * FP32  # z.float(), for lofit_A's gradient
    n += tok * (D * FP32 + FP32)  # post_attention_layernorm: x in fp32, rsqrt
    n += 3 * tok * inter * b  # gate_proj(x), up_proj(x), silu(gate)
    if grad_input:
        n += tok * (D * FP32 + FP32)  # input_layernorm
        n += tok * H * hd * b  # q after RoPE
        if keys is None:
            n += 2 * tok * Hkv * hd * b  # k after RoPE, v
        else:
            kv_heads = H if H != Hkv else Hkv  # repeat_interleave'd to every head under a mask
            n += 2 * rows * kv_heads * keys * hd * b
            n += rows * tokens * keys * b  # the boolean mask as SDPA's additive float mask
        n += tok * H * FP32  # SDPA's logsumexp
        if b != FP32:
            n += tok * H * hd * b  # SDPA's output (in fp32 it is z.float() itself)
    return n


def pass_saved_bytes(c, rows: int, tokens: int, b: int, keys: int | None = None, output_used: bool = True) -> int:
    """Every block of one pass, plus RoPE's cos and sin (saved once, shared by the layers).

    output_used False: a pass whose hidden states are dropped and only its KV cache is used (DPO's
    prompt pass). Autograd then frees what only led to the output: of the last layer only its
    input_layernorm stays (its k and v live on in the cache).
    """
    last = c.n_layers - 1
    kept = c.n_layers if output_used else last
    n = sum(layer_saved_bytes(c, rows, tokens, b, layer > 0, keys) for layer in range(kept))
    if not output_used and last > 0:
        n += rows * tokens * (c.hidden_size * FP32 + FP32)  # the last layer's input_layernorm
    if c.n_layers > 1:
        n += 2 * rows * tokens * c.head_dim * b
    return n


def peak_over_saved(c, rows: int, tokens: int, answers: int, b: int, forward_extra: int = 0) -> int:
    """What the loss pass adds to the saved activations at the step's peak: the largest of three moments.

    - the loss's backward: the final norm's saved x and rsqrt, log_softmax's saved fp32 output and
      the incoming and outgoing fp32 gradients of its backward (3 * N * V * 4);
    - the loss's forward: the final norm, log_softmax's fp32 input and output (2 * N * V * 4) and
      `forward_extra`, what lives only until the loss function returns (DPO's KV cache);
    - the final norm's backward (the loss freed by then): its saved x and rsqrt, the incoming
      gradient (D * b per token) and the fp32 gradients its backward builds on the way to x's
      (through x * rsqrt, and through mean(x^2) and pow: 5 * D * 4 per token at once);
    - the backward of the last MLP (the loss and the final norm freed by then): the gradients of
      down_proj's input, of silu(gate) and of up_proj's output (3 * I * b per token) and two
      residual-stream gradients (2 * D * b per token).
    """
    tok = rows * tokens
    logits = answers * c.vocab_size * FP32
    final_norm = tok * (c.hidden_size * FP32 + FP32)
    return max(final_norm + 3 * logits, final_norm + 2 * logits + forward_extra,
               final_norm + tok * c.hidden_size * (b + 5 * FP32),
               tok * (3 * c.intermediate_size + 2 * c.hidden_size) * b)


def activation_bytes(c, lengths: Lengths, rows: int, loss: str, b: int, shared_prefix: bool) -> int:
    """Saved activations and the loss pass's peak buffers for one micro-batch of `rows` examples (pairs for DPO)."""
    P, A = lengths.prompt, lengths.answer
    if loss == "ce":
        return pass_saved_bytes(c, rows, P + A, b) + peak_over_saved(c, rows, P + A, rows * A, b)
    if not shared_prefix:  # both full sequences of every pair in one causal pass
        return pass_saved_bytes(c, 2 * rows, P + A, b) + peak_over_saved(c, 2 * rows, P + A, 2 * rows * A, b)
    prefix = max(1, P - 1)  # the shared prefix ends a token before the answers (pair_answer_logprobs)
    suffix = P + A - prefix
    n = pass_saved_bytes(c, rows, prefix, b, output_used=False)  # the prompt once per pair: the KV cache
    n += pass_saved_bytes(c, 2 * rows, suffix, b, keys=P + A)  # both answers on top of the cache
    # The cache, per layer k and v of (2r, H_kv, P + A, hd), lives until pair_answer_logprobs
    # returns; SDPA saved the same tensors in layers >= 1 unless it repeated them to every head.
    cache_layer = 2 * (2 * rows) * c.n_kv_heads * (P + A) * c.head_dim * b
    cache_extra = cache_layer * (c.n_layers if c.n_kv_heads != c.n_heads else 1)
    return n + peak_over_saved(c, 2 * rows, suffix, 2 * rows * A, b, forward_extra=cache_extra)


# ----------------------------------------------------------------------------------------------
# The plan


def plan_memory(config, *, lengths: Lengths, batch: int, micro_batch: int | None = None, loss: str = "dpo",
                dtype="float32", sharding: str = "replicate", world: int = 1, k_heads: int | None = None,
                gpu_memory_gib: float = 80.0, overhead_gib: float = OVERHEAD_GIB,
                shared_prefix: bool | None = None, with_fix: bool = True) -> MemoryPlan:
    """One rank's peak memory for a LoFiT training step of this model and run, without any weights.

    Args:
        config: a model.LlamaConfig, or a config.json dict.
        lengths: the longest prompt and answer of a training row (Lengths; lengths_from_items for
            tokenized data, task_limit_lengths for a task's worst case).
        batch: global batch size (pairs for DPO, examples for CE).
        micro_batch: train.py --micro-batch-size; None is train.py's default, ceil(batch / world).
        loss: "dpo" or "ce".
        dtype: the base model's dtype ("float32", "bfloat16" or a torch.dtype).
        sharding: "replicate" (every rank holds the whole base) or "shard" (FSDP2 on each block).
        world: number of processes (GPUs).
        k_heads: stage 2's K (None: any; stage 1 is the larger either way).
        gpu_memory_gib: memory of one GPU.
        overhead_gib: the fixed amount added for what is not a tensor.
        shared_prefix: DPO's prompt-once path; None as train.py does it (on unless sharded).
        with_fix: when it does not fit, look for the cheapest change that does (choose_fix).
    """
    c = config_from(config)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    if batch < 1 or world < 1 or (micro_batch is not None and micro_batch < 1):
        raise ValueError(f"batch, world and micro_batch must be at least 1 (got {batch}, {world}, {micro_batch})")
    b = dtype_bytes(dtype)
    share = -(-batch // world)
    rows = min(micro_batch or share, share)
    if shared_prefix is None:
        shared_prefix = sharding == "replicate"
    if sharding == "replicate":
        weights, gathered = base_numel(c) * b, 0
    else:
        weights = (c.n_layers * sharded_block_numel(c, world) + outside_block_numel(c)) * b
        block = sum(math.prod(s) for s in block_tensor_shapes(c)) * b
        gathered = min(GATHERED_BLOCKS, c.n_layers) * block
    lofit = lofit_bytes(c, k_heads)
    acts = activation_bytes(c, lengths, rows, loss, b, shared_prefix)
    total = (weights + gathered + lofit + acts) / GiB + overhead_gib
    plan = MemoryPlan(weights / GiB, gathered / GiB, lofit / GiB, acts / GiB, overhead_gib, total,
                      gpu_memory_gib, total <= gpu_memory_gib, sharding, world, dtype_name(dtype), loss, batch,
                      rows, lengths)
    if not plan.fits and with_fix:
        plan.fix = choose_fix(c, plan, k_heads=k_heads)
    return plan


def choose_fix(config, plan: MemoryPlan, *, k_heads: int | None = None, max_world: int = 64) -> str | None:
    """The cheapest change that makes `plan` fit, as a sentence; None when nothing tried fits.

    Tried in order of what it gives up, keeping the hardware first: sharding the base over the
    GPUs the run already has (same numbers up to rounding, more communication), a smaller
    micro-batch (the same gradient, accumulated over more, slower passes), bfloat16 (a coarser
    base; LoFiT's parameters stay fp32), then the fewest more GPUs (2, 4, 8, ...: in the run's
    dtype, then in bfloat16; replicated, then sharded). Each candidate is a fresh plan_memory.
    """
    c = config_from(config)
    base = dict(lengths=plan.lengths, batch=plan.batch, micro_batch=plan.micro_batch, loss=plan.loss,
                dtype=plan.dtype, sharding=plan.sharding, world=plan.world, k_heads=k_heads,
                gpu_memory_gib=plan.gpu_memory_gib, overhead_gib=plan.overhead_gib, with_fix=False)

    def attempt(**change):
        return plan_memory(c, **{**base, **change})

    def smaller_micro(**change) -> int | None:
        for m in range(min(plan.micro_batch, base["batch"]) - 1, 0, -1):
            if attempt(micro_batch=m, **change).fits:
                return m
        return None

    bf16 = dtype_bytes(plan.dtype) > 2
    if plan.sharding == "replicate" and plan.world > 1 and (p := attempt(sharding="shard")).fits:
        return f"--sharding shard ({p.per_gpu_gib:.1f} GiB per GPU)"
    if (m := smaller_micro()) is not None:
        return f"--micro-batch-size {m} ({attempt(micro_batch=m).per_gpu_gib:.1f} GiB per GPU)"
    if bf16:
        for change in ({}, {"sharding": "shard"} if plan.world > 1 else None):
            if change is not None and (p := attempt(dtype="bfloat16", **change)).fits:
                words = "--dtype bfloat16" + (" --sharding shard" if change else "")
                return f"{words} ({p.per_gpu_gib:.1f} GiB per GPU)"
    dtypes = [plan.dtype] + (["bfloat16"] if bf16 else [])
    for world in [w for w in (2, 4, 8, 16, 32, 64) if plan.world < w <= max_world]:  # the fewest GPUs first
        for dtype in dtypes:
            for sharding in SHARDINGS:
                p = attempt(world=world, sharding=sharding, dtype=dtype, micro_batch=None)
                if p.fits:
                    words = f"{world} GPUs with --sharding {sharding}"
                    words += " --dtype bfloat16" if dtype != plan.dtype else ""
                    return f"{words} ({p.per_gpu_gib:.1f} GiB per GPU)"
    return None


def format_plan(plan: MemoryPlan) -> str:
    """A short table of the components, the verdict (and the fix), and last one JSON line."""
    rows = [("frozen base weights" + (" (1/world of the blocks)" if plan.sharding == "shard" else ""),
             plan.weights_gib)]
    if plan.sharding == "shard":
        rows.append((f"gathered blocks ({GATHERED_BLOCKS} unsharded)", plan.gathered_gib))
    rows += [("LoFiT parameters, gradients, AdamW state (fp32)", plan.lofit_gib),
             (f"activations ({plan.micro_batch} {'pair' if plan.loss == 'dpo' else 'example'}(s) per micro-batch, "
              f"prompt {plan.lengths.prompt} + answer {plan.lengths.answer} tokens)", plan.activations_gib),
             ("fixed overhead (CUDA context, NCCL, allocator)", plan.overhead_gib)]
    width = max(len(name) for name, _ in rows)
    lines = [f"memory plan: {plan.dtype}, {plan.loss}, batch {plan.batch}, {plan.world} GPU(s), "
             f"--sharding {plan.sharding}"]
    lines += [f"  {name:<{width}}  {gib:8.2f} GiB" for name, gib in rows]
    lines.append(f"  {'per GPU':<{width}}  {plan.per_gpu_gib:8.2f} GiB of {plan.gpu_memory_gib:g} GiB")
    if plan.fits:
        lines.append("fits")
    else:
        lines.append("does not fit; " + (f"cheapest fix: {plan.fix}" if plan.fix else
                                         "no single change tried fits (more GPUs, shorter rows)"))
    lines.append(json.dumps(plan.summary(), sort_keys=True))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The table in docs/gpu.md: python -m machinery.memory_plan


LLAMA_2 = {  # config.json sizes of Meta's Llama-2 checkpoints
    "7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32,
               n_kv_heads=32, head_dim=128),
    "13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, n_layers=40, n_heads=40,
                n_kv_heads=40, head_dim=128),
    "70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, n_layers=80, n_heads=64,
                n_kv_heads=8, head_dim=128),
}


def docs_table(lengths: list[tuple[str, Lengths]], batch: int = 8) -> str:
    """Markdown rows: tensor peak (and with the overhead) per GPU for Llama-2 7B/13B/70B, DPO, batch 8."""
    head = "| model | dtype | GPUs, sharding | " + " | ".join(f"plan, {name}: tensors (+ {OVERHEAD_GIB:g} GiB)"
                                                            for name, _ in lengths) + " |"
    out = [head, "|" + "---|" * (3 + len(lengths))]
    for size, shape in LLAMA_2.items():
        for dtype in ("float32", "bfloat16"):
            for world, sharding in ((1, "replicate"), (8, "replicate"), (8, "shard")):
                cells = []
                for _, length in lengths:
                    p = plan_memory(LlamaConfig(**shape), lengths=length, batch=batch, loss="dpo", dtype=dtype,
                                    sharding=sharding, world=world, with_fix=False)
                    cells.append(f"{p.tensor_gib:.1f} ({p.per_gpu_gib:.1f})")
                out.append(f"| {size} | {dtype} | {world}, {sharding} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plan_for_run(cfg, config, hp, data, world: int, sharding: str, gpu_memory_gib: float) -> MemoryPlan:
    """train.py's per-GPU peak: its longest tokenized rows (`data`, a data.TrainData), else the task's length
    limits. `cfg` is train.TrainConfig, `hp` train.Hparams."""
    lengths = lengths_from_items(data.loss, data.items) if data and data.items else task_limit_lengths(cfg.task)
    return plan_memory(config, lengths=lengths, batch=cfg.batch_size, micro_batch=cfg.micro_batch_size,
                       loss=TASK_INFO[cfg.task].loss, dtype=hp.dtype, sharding=sharding, world=world, k_heads=hp.k,
                       gpu_memory_gib=gpu_memory_gib)


def print_plan(cfg, config, hp) -> int:
    """train.py --plan: print the plan for --gpus GPUs of --gpu-memory GiB from `config` and the tokenized
    training set (read no weights, write nothing). `cfg` is train.TrainConfig, `hp` train.Hparams."""
    world = cfg.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    memory, where = cfg.gpu_memory, "--gpu-memory"
    if memory is None and torch.cuda.is_available():
        memory, where = distributed.device_memory(torch.device("cuda")) / GiB, torch.cuda.get_device_name()
    elif memory is None:
        memory, where = 80.0, "assumed: no GPU here; pass --gpu-memory"
    try:
        tokenizer = load_tokenizer(cfg.model, backend=cfg.tokenizer)
    except TokenizerError as e:
        data, rows = None, f"the task's length limits ({e})"
    else:
        examples = load_examples(cfg.task, "train", fold=cfg.fold, data_dir=cfg.data_dir, train_size=cfg.train_size,
                                 seed=cfg.seed)
        data, rows = tokenize_training_set(cfg.task, examples, tokenizer), f"the {len(examples)} training examples"
    sharding = distributed.pick_sharding(cfg.sharding, world,
                                         lambda s: plan_for_run(cfg, config, hp, data, world, s, memory))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one copy
        print(f"{cfg.model} on {cfg.task}: {world} GPU(s) of {memory:g} GiB ({where}); rows: {rows}; K = {hp.k}; "
              f"sharding: {sharding[0]} ({sharding[1]})")
        print(format_plan(plan_for_run(cfg, config, hp, data, world, sharding[0], memory)))
    return 0


def sharding_for_run(cfg, config, hp, data, d) -> tuple[tuple[str, str], MemoryPlan]:
    """train.py's frozen-base sharding (auto follows the plan) and its plan, before anything is loaded.

    Raises:
        UsageError: on a GPU (whose memory is known; a CPU's is shared), a plan that does not fit,
            naming the cheapest fix.
    """
    gpu_memory = cfg.gpu_memory or distributed.device_memory(d.device) / GiB
    sharding = distributed.choose_sharding(cfg.sharding, config, getattr(torch, hp.dtype), d, plan_for=lambda s:
                                           plan_for_run(cfg, config, hp, data, d.world, s, gpu_memory))
    plan = plan_for_run(cfg, config, hp, data, d.world, sharding[0], gpu_memory)
    if d.device.type == "cuda" and not plan.fits:
        raise UsageError(f"the memory plan needs {plan.per_gpu_gib:.1f} GiB per GPU, more than {gpu_memory:.1f} GiB; "
                         f"{f'cheapest fix: {plan.fix}' if plan.fix else 'no single change tried fits'} "
                         f"(see it with --plan)")
    return sharding, plan


if __name__ == "__main__":
    print(docs_table([("100 + 100 tokens", Lengths(100, 100)), ("48 + 35 tokens", Lengths(48, 35)),
                      ("76 + 35 tokens", Lengths(76, 35))]))
