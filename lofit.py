"""LoFiT: localized fine-tuning of per-head attention offsets (Yin, Ye, Durrett; NeurIPS 2024, arXiv 2406.01563).

Every attention head h of layer l carries a scale offset A[l, h] and a bias offset v[l, h] (both
(head_dim,), model.py's `lofit_A` / `lofit_v`); its output z becomes (1 + A) * z + v. The method:

1. Stage 1 (head selection): freeze the base model, train A for every head with an L1 penalty
   (setup_stage1, l1_penalty), then rank heads by ||A[l, h]||_2 (rank_heads) and keep the top K
   (select_heads).
2. Stage 2 (bias tuning): start again from the base model and train v on the K heads only
   (setup_stage2); every other head's v stays exactly zero.

Read top to bottom: the task losses (answer-only cross-entropy, ce_loss; DPO, dpo_loss, on summed
answer log-probs, with the base model as reference: offsets_disabled), stage 1, ranking and
selection, stage 2, then the intervention protocol they build on.

Interventions: stage 2's edit is one registered form (`Intervention`, INTERVENTIONS): LoFiT's bias
v by default, or another per-head edit of z with its own `lofit_*` parameters (examples/). Every
`lofit_*` parameter is found by name, so resetting, freezing, gradient masks, the trainable count,
adapter files and merging (adapter.py, which imports this module; never the other way) need no
change for a new form.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import collate
from model import EditContext, KVCache, LofitError


class HeadScore(NamedTuple):
    """One head's stage-1 importance: ||A[layer, head]||_2."""
    layer: int
    head: int
    score: float

# ----------------------------------------------------------------------------------------------
# Losses


def answer_token_logprobs(model, input_ids, attention_mask, loss_mask, cache=None):
    """Log-probabilities of the loss tokens, computing logits only where they are needed.

    Token t is predicted at position t - 1, so lm_head runs only on the N positions whose next
    token has loss_mask True, never on the whole (B, T, vocab).

    Args:
        input_ids: (B, T) token ids. attention_mask: (B, T_past + T), 1 on real tokens.
        loss_mask: (B, T), True on the tokens whose log-probability counts (loss_mask[:, 0] is never
            used: its prediction would come from a position before input_ids).
        cache: A KVCache of T_past earlier positions (e.g. a prompt prefix shared by every row).

    Returns:
        (rows, logp): the batch row (N,) of each loss token and its log-probability (N,) in fp32.
    """
    hidden = model.hidden_states(input_ids, attention_mask, cache, answer_start(loss_mask, cache))  # (B, T, D)
    predicts = loss_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    rows, cols = predicts.nonzero(as_tuple=True)  # (N,) each
    logits = model.lm_head(hidden[rows, cols]).float()  # (N, V)
    targets = input_ids[rows, cols + 1]  # (N,)
    return rows, -F.cross_entropy(logits, targets, reduction="none")  # (N,)


def answer_start(loss_mask, cache=None) -> torch.Tensor:
    """(B,) each row's first loss column counted over the cached past too (EditContext.answer_start), -1 if none."""
    first = loss_mask.int().argmax(dim=1) + (len(cache) if cache is not None else 0)  # (B,)
    return torch.where(loss_mask.any(dim=1), first, -1)


def answer_logprobs(model, input_ids, attention_mask, loss_mask, cache=None) -> torch.Tensor:
    """Summed log-probability (B,) of each row's loss tokens (for DPO: the answer and its EOS), fp32."""
    rows, logp = answer_token_logprobs(model, input_ids, attention_mask, loss_mask, cache)
    return torch.zeros(input_ids.shape[0], device=logp.device).index_add(0, rows, logp)  # (B,)


def pair_answer_logprobs(model, pairs: list[dict], pad_id: int, device="cpu", shared_prefix: bool = True
                         ) -> torch.Tensor:
    """(n, 2) summed answer log-probs of the chosen and rejected answers of n DPO pairs, in fp32.

    The two sequences of a pair start with the same tokens (BOS + the prompt), so that shared
    prefix runs once per pair, and only the two suffixes run on top of its KV cache: one forward
    of n prefix rows, then one of 2n suffix rows (the cache repeated), where two full rows of
    2n would repeat each prompt (~60% of a TruthfulQA pair's tokens). Gradients flow through the
    cache. The result equals running the full sequences (answer_logprobs) up to fp32 rounding
    (differently shaped matrix products: ~1e-6 relative; tests/test_lofit_speed.py holds it to
    that). The prefix ends at least one token before either answer, whose first token is predicted
    from the suffix's first position.

    Args:
        pairs: data.tokenize_dpo dicts (chosen/rejected input_ids and loss_mask lists).
        shared_prefix: False runs the 2n full sequences in one batch instead (the reference path;
            also what an FSDP-sharded model needs, which cannot run a block twice before a backward).
    """
    def padded(rows):  # input_ids, attention_mask, loss_mask, each (B, T), right-padded
        batch = collate(rows, pad_id)
        return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]

    if not shared_prefix:
        ids, mask, loss_mask = padded([(p[f"{side}_input_ids"], p[f"{side}_loss_mask"])
                                       for side in ("chosen", "rejected") for p in pairs])
        return answer_logprobs(model, ids.to(device), mask.to(device), loss_mask.to(device)).view(2, -1).T
    prefixes, suffixes = [], []
    for pair in pairs:
        chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
        common = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        n = max(1, min(common, pair["chosen_loss_mask"].index(True) - 1, pair["rejected_loss_mask"].index(True) - 1))
        prefixes.append(chosen[:n])
        suffixes.append((n, pair))
    prefix_ids, prefix_mask, _ = padded([(ids, [False] * len(ids)) for ids in prefixes])  # (n, P)
    suffix_ids, suffix_mask, loss_mask = padded(  # (2n, S): chosen rows, then rejected
        [(pair[f"{side}_input_ids"][n:], pair[f"{side}_loss_mask"][n:])
         for side in ("chosen", "rejected") for n, pair in suffixes])
    prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
    cache = KVCache()
    starts = answer_start(loss_mask[:len(pairs)]) + prefix_ids.shape[1]  # the suffix pass's columns (past P)
    model.hidden_states(prefix_ids, prefix_mask, cache, starts.to(device))  # fills the cache: (n, H_kv, P, hd)
    cache.layers = [(torch.cat([k, k]), torch.cat([v, v])) for k, v in cache.layers]  # (2n, H_kv, P, hd)
    attention_mask = torch.cat([prefix_mask.repeat(2, 1), suffix_mask.to(device)], dim=1)  # (2n, P + S)
    logp = answer_logprobs(model, suffix_ids.to(device), attention_mask, loss_mask.to(device), cache)  # (2n,)
    return logp.view(2, -1).T  # (n, 2)


def ce_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over every loss token of the batch (HF's loss with labels = -100 elsewhere).

    Args:
        batch: input_ids, attention_mask, loss_mask, each (B, T) (data.collate's output).

    Returns:
        A scalar; 0 (still connected to the graph) if the batch has no loss token.
    """
    _, logp = answer_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return -logp.sum() / max(logp.numel(), 1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.5) -> torch.Tensor:
    """DPO's sigmoid loss, averaged over pairs (Rafailov et al. 2023; trl 0.8.1 without label smoothing).

    L = -log sigmoid(beta * [(pc - pr) - (rc - rr)]), every argument (P,) of summed answer log-probs
    of the chosen and rejected answers under the policy and the reference (the base model).
    """
    ref_chosen = ref_chosen.to(policy_chosen.device, policy_chosen.dtype)
    ref_rejected = ref_rejected.to(policy_chosen.device, policy_chosen.dtype)
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (P,)
    return -F.logsigmoid(beta * margin).mean()


# ----------------------------------------------------------------------------------------------
# Stage 1: a scale A for every head, with an L1 penalty


def setup_stage1(model, init_std: float = 1e-3, generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Prepare head selection: base frozen, A ~ N(0, init_std) trainable for every head, all else 0 frozen.

    Args:
        model: A Llama (model.py). Its parameters are changed in place, never replaced, so this
            also works after the blocks were wrapped (e.g. FSDP2 with the LoFiT parameters ignored).
        init_std: Standard deviation of A's initialisation (the paper: 1e-3).
        generator: A CPU generator for A's draws (layer by layer, each (n_heads, head_dim)), so the
            same seed gives the same A on any device and in every process.

    Returns:
        The trainable parameters: each layer's lofit_A (n_heads, head_dim), in layer order.
    """
    _freeze_base(model)
    reset_offsets(model)
    params = []
    with torch.no_grad():
        for attn in attentions(model):
            attn.lofit_A.copy_(_normal(attn.lofit_A.shape, init_std, generator, attn.lofit_A))
            attn.lofit_A.requires_grad_(True)
            params.append(attn.lofit_A)
    return params

def l1_penalty(model) -> torch.Tensor:
    """sum |A| over every layer and head: stage 1's sparsity penalty (multiply by lambda)."""
    return sum(attn.lofit_A.abs().sum() for attn in attentions(model))

# ----------------------------------------------------------------------------------------------
# Head ranking and selection


def rank_heads(model) -> list[HeadScore]:
    """Every head scored by ||A[l, h]||_2 (over head_dim, in fp32), highest first.

    Ties (e.g. heads whose A is exactly 0) are broken by (layer, head) so the order is reproducible.
    The original code keeps the top 160; this keeps the full ranking.
    """
    scores = [attn.lofit_A.detach().float().norm(dim=-1).cpu() for attn in attentions(model)]  # L x (H,)
    ranking = [HeadScore(layer, head, float(s)) for layer, row in enumerate(scores) for head, s in enumerate(row)]
    return sorted(ranking, key=lambda r: (-r.score, r.layer, r.head))


def select_heads(ranking, k: int | None = None, k_percent: float | None = None) -> list[tuple[int, int]]:
    """The first K (layer, head) pairs of a ranking (best first).

    Args:
        ranking: HeadScore-like (layer, head, score) items, best first, e.g. rank_heads(model).
        k: How many heads to keep.
        k_percent: Or a percentage of the heads in `ranking` (rank_heads gives every head); K is
            rounded down, e.g. 10% of Llama-2-7B's 1,024 heads is 102.

    Raises:
        ValueError: neither or both of k and k_percent, or a K outside 1..len(ranking).
    """
    if (k is None) == (k_percent is None):
        raise ValueError("give exactly one of k (a number of heads) and k_percent (a percentage of heads)")
    if k_percent is not None:
        if not 0 < k_percent <= 100:
            raise ValueError(f"k_percent must be in (0, 100], got {k_percent}")
        k = int(k_percent / 100 * len(ranking))
        if k == 0:
            raise ValueError(f"{k_percent}% of {len(ranking)} heads is less than one head; use a larger k_percent")
    if not 1 <= k <= len(ranking):
        raise ValueError(f"cannot select k={k} heads from a ranking of {len(ranking)}")
    return [(int(r[0]), int(r[1])) for r in ranking[:k]]

# ----------------------------------------------------------------------------------------------
# Stage 2: the form (LoFiT: a bias v) on the selected heads only


def setup_stage2(model, heads, init_std: float = 1e-3, generator: torch.Generator | None = None,
                 intervention: Intervention | None = None) -> list[nn.Parameter]:
    """Prepare stage 2: base frozen, every offset 0, the form's parameters trainable on `heads` only.

    With the default form (LoFiT) each layer's lofit_v (n_heads, head_dim) stays one ordinary
    parameter, drawn ~ N(0, init_std) on `heads`; a gradient hook zeroes the rows of the other
    heads, which stay exactly 0 through any number of steps (train_rows). The hook lives on the
    parameter object, so call this after anything that replaces the parameters
    (Llama.from_pretrained does); moving them with `p.data = ...` keeps it.

    Args:
        model: A Llama, changed in place.
        heads: The selected (layer, head) pairs, e.g. select_heads(...); LoFiT draws v in this
            order, one (head_dim,) row per head, from `generator` (CPU).
        init_std: Standard deviation of the initialisation (the paper: 1e-3).
        intervention: The form to train (installed first); None keeps the installed one (LoFiT
            unless `install` was called).

    Returns:
        The parameters to optimise (LoFiT: the lofit_v of the layers with a selected head, in layer order).

    Raises:
        ValueError: `heads` is empty, repeats a head, or names one the model does not have.
    """
    heads = check_heads(model, heads)
    form = install(model, intervention) if intervention is not None else intervention_of(model)
    _freeze_base(model)
    reset_offsets(model)
    with form_code(form, "setup"):
        params = form.setup(model, heads, init_std, generator)
    check_trained_rows(model, heads, form.name)
    return params


def check_trained_rows(model, heads, who: str = "the form") -> None:
    """Refuse trainable lofit_* parameters outside `heads`: a row trained there would not be saved.

    Every trainable offset must be masked (train_rows) to rows of heads in `heads`.

    Raises:
        FormError: naming the parameter, the layer and the heads outside `heads`.
    """
    chosen = set(heads)
    for layer, attn in enumerate(attentions(model)):
        masks = getattr(attn, "lofit_masks", {})
        for name, p in offset_parameters(attn).items():
            if not p.requires_grad:
                continue
            rows = masks[name][1] if name in masks else range(attn.n_heads)
            if outside := [h for h in rows if (layer, h) not in chosen]:
                raise FormError(f"{who} trains {name} of layer {layer} on heads {outside[:5]} outside the "
                                f"selected ones, which the adapter would not hold; make rows trainable with "
                                f"lofit.train_rows(attn, name, rows) on the selected heads only")

def _normal(shape, std: float, generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, std) draws made on the CPU in fp32 (reproducible anywhere), cast like `like`."""
    draws = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    return draws.to(like.device, like.dtype)


def check_heads(model, heads) -> list[tuple[int, int]]:
    """`heads` as a list of (layer, head) int pairs, or ValueError saying what is wrong with it."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    if not heads:
        raise ValueError("no heads selected: pass at least one (layer, head) pair")
    bad = [h for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"heads {bad[:5]} are outside this model ({n_layers} layers x {n_heads} heads)")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads repeat: {sorted(h for h in set(heads) if heads.count(h) > 1)[:5]}")
    return heads

@contextlib.contextmanager
def offsets_disabled(model):
    """Run `model` as the base model (A and v ignored, values kept), e.g. for DPO's reference.

    Restores each layer's previous lofit_enabled on exit, also after an exception.
    """
    sites = attentions(model) + mlps(model)
    before = [site.lofit_enabled for site in sites]
    for site in sites:
        site.lofit_enabled = False
    try:
        yield model
    finally:
        for site, enabled in zip(sites, before):
            site.lofit_enabled = enabled

# ----------------------------------------------------------------------------------------------
# The intervention protocol: every lofit_* parameter found by name, and the forms stage 2 can train


def attentions(model) -> list[nn.Module]:
    """The attention module of every layer, in layer order."""
    return [block.self_attn for block in model.layers]

def mlps(model) -> list[nn.Module]:
    """The MLP of every layer, in layer order: the second site a form may edit (Intervention.mlp_edit)."""
    return [block.mlp for block in model.layers]


def offset_parameters(attn: nn.Module) -> dict[str, nn.Parameter]:
    """An attention module's intervention parameters: every `lofit_*` one (A, v, and any form's)."""
    return {name: p for name, p in attn.named_parameters(recurse=False) if name.startswith("lofit_")}


def reset_offsets(model) -> None:
    """Every `lofit_*` parameter of every layer (attention and MLP) set to exactly 0: the base model again."""
    with torch.no_grad():
        for attn in attentions(model) + mlps(model):
            for p in offset_parameters(attn).values():
                p.zero_()


def _freeze_base(model) -> None:
    """Every parameter frozen; every earlier gradient mask (of any form) removed."""
    for p in model.parameters():
        p.requires_grad_(False)
    for attn in attentions(model):
        for hook, _ in getattr(attn, "lofit_masks", {}).values():
            hook.remove()
        attn.lofit_masks = {}


def train_rows(attn: nn.Module, name: str, rows: list[int]) -> nn.Parameter:
    """Make attn.<name> (n_heads, ...) trainable on head rows `rows` only; return the parameter.

    A gradient hook zeroes the other rows' gradients. With those rows at zero and a zero gradient,
    AdamW without weight decay (and gradient clipping) never moves them: they stay exactly 0.
    """
    param = getattr(attn, name)
    keep = torch.zeros(attn.n_heads, dtype=torch.bool, device=param.device)  # (H,)
    keep[rows] = True
    shape = (attn.n_heads,) + (1,) * (param.dim() - 1)  # broadcast over each row's numbers
    param.requires_grad_(True)
    hook = param.register_hook(lambda grad: grad.masked_fill(~keep.view(shape).to(grad.device), 0))
    attn.lofit_masks = {**getattr(attn, "lofit_masks", {}), name: (hook, sorted(rows))}
    return param


def init_head_rows(model, heads, name: str, init_std: float, generator) -> list[nn.Parameter]:
    """Draw the rows of per-head parameter `name` for `heads` ~ N(0, init_std), one (head_dim,) row per
    head in `heads` order (on the CPU, in fp32: the same numbers on any device), and train those rows
    only (train_rows); returns the parameters to optimise, in layer order. LoFiT's v is drawn this way."""
    draws = _normal((len(heads), model.config.head_dim), init_std, generator, torch.empty(0))  # (K, hd)
    params = []
    with torch.no_grad():
        for layer, attn in enumerate(attentions(model)):
            rows = [(i, h) for i, (at, h) in enumerate(heads) if at == layer]
            param = getattr(attn, name)
            for i, h in rows:
                param[h] = draws[i].to(param.device, param.dtype)
            if rows:
                params.append(train_rows(attn, name, [h for _, h in rows]))
    return params


def trainable_count(model) -> int:
    """Trainable numbers as the paper counts them: L*H*head_dim in stage 1, K*head_dim in stage 2.

    A parameter with a gradient mask counts only its trainable rows (train_rows), whatever its form.
    """
    masked = {}
    for attn in attentions(model):
        for name, (_, rows) in getattr(attn, "lofit_masks", {}).items():
            p = getattr(attn, name)
            masked[id(p)] = len(rows) * (p.numel() // attn.n_heads)
    return sum(masked.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)


# Interventions: what stage 2 trains on the selected heads


class FormError(LofitError, ValueError):
    """A form's own code failed (its setup, edit or merge raised): one line naming the form and the method.

    LOFIT_DEBUG=1 in the environment lets the original exception through instead, with its traceback.
    """


def _form_failed(form, method: str, error: Exception) -> Exception:
    """The exception to raise for `error` from form.<method>: a FormError, or `error` itself under LOFIT_DEBUG."""
    if isinstance(error, LofitError) or os.environ.get("LOFIT_DEBUG", "") not in ("", "0"):
        return error
    return FormError(f"the {form.name} intervention's {method} failed ({type(error).__name__}: {error}); "
                     f"run with LOFIT_DEBUG=1 for the traceback")


@contextlib.contextmanager
def form_code(form, method: str):
    """Run a form's own method, turning any exception into FormError (see _form_failed)."""
    try:
        yield
    except Exception as e:
        raise _form_failed(form, method, e) from None


class Intervention:
    """One form of per-head edit of z (head h's output: its slice of o_proj's input), for stage 2.

    A form is a dataclass (its fields are its hyperparameters, each an int, float, bool or str; they
    travel in the adapter file and are type-checked from the field types) that supplies:
    - `parameters(config)`: the extra `lofit_<name>` tensors it needs in every attention module,
      as {name: shape}; each shape starts with n_heads (one row per head), and all-zero must be
      the base model exactly (install checks it). `install` creates them at zero. Raise ValueError
      for settings that do not fit.
    - `edit(attn, z, ctx)`: z (B, T, H, hd), fp32 -> the edited z of the same shape, after LoFiT's
      (1 + A) * z + v. `ctx` is a model.EditContext (masks, positions, answer start, layer,
      training); an edit that does not need it may take (attn, z) only. Runs only while installed.
    - `setup(model, heads, init_std, generator)`: initialise and make trainable (train_rows) on
      `heads` only; return the parameters to optimise. The base is frozen and every offset is 0
      when it is called. A product of factors needs one factor non-zero, or no gradient flows.
      Rows of heads outside `heads` must stay untrained (they are not saved): setup_stage2 refuses.
    - `merge(attn, weight, bias)`, only where the form is affine in z: fold it into o_proj exactly,
      (weight (D, H*hd), bias (D,) or None) that consume the edited z -> the pair that consumes
      the unedited z, in fp64. A form without it is refused by merging and export (`mergeable`).
    The second site, the MLP output y (B, T, hidden) of every layer, fp32 (model.MLP):
    - `mlp_parameters(config)`: {name: shape} of `lofit_<name>` tensors on every MLP module, not per
      head (e.g. (hidden,)); saved whole for every layer. All-zero must be the base model.
    - `mlp_edit(mlp, y, ctx)`: the edited y, same shape. `merge_mlp(mlp, weight, bias)`: fold it into
      down_proj exactly (weight (hidden, intermediate), bias (hidden,) or None), in fp64.
    Hooks for the trainer (train.py), each optional:
    - `selects_heads = True`: the form localizes by itself; train every head instead of running stage 1.
    - `penalty(model)`: a scalar added to the loss once per global batch (None: no penalty).
    - `start_step(model)`: called once per global batch, on every process, before its micro-batches:
      where a form draws its randomness for the step, so that the draws do not depend on how the
      batch is split into micro-batches and processes.
    - `state_dict()` / `load_state_dict(state)`: the form's own state besides its parameters (e.g. a
      random generator), kept in checkpoints so that a resumed run is the uninterrupted one.
    Reset, saving, loading, gradient masks and the trainable count are generic over `lofit_*`.
    An exception raised by setup, edit or merge becomes one FormError line (LOFIT_DEBUG=1: the traceback).
    """
    name = "base"
    selects_heads = False

    def penalty(self, model) -> torch.Tensor | None:
        return None

    def start_step(self, model) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def parameters(self, config) -> dict[str, tuple[int, ...]]:
        return {}

    def edit(self, attn: nn.Module, z: torch.Tensor, ctx=None) -> torch.Tensor:
        return z

    def setup(self, model, heads, init_std: float, generator) -> list[nn.Parameter]:
        raise NotImplementedError

    def merge(self, attn: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError(f"{self.name} has no merge into o_proj")

    def mlp_parameters(self, config) -> dict[str, tuple[int, ...]]:
        return {}

    def mlp_edit(self, mlp: nn.Module, y: torch.Tensor, ctx=None) -> torch.Tensor:
        return y

    def merge_mlp(self, mlp: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError(f"{self.name} has no merge into down_proj")

    @property
    def mergeable(self) -> bool:
        """Whether the form defines `merge` (a form that is not linear in z does not), and `merge_mlp`
        where it edits the MLP output."""
        uses_mlp = type(self).mlp_edit is not Intervention.mlp_edit
        return type(self).merge is not Intervention.merge and (
            not uses_mlp or type(self).merge_mlp is not Intervention.merge_mlp)

    def hparams(self) -> dict:
        """The form's settings, JSON-able: its dataclass fields."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


INTERVENTIONS: dict[str, type] = {}
BUILT_IN = ("lofit",)  # names no file may register again
SETTING_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_WHAT = {int: "a whole number (int)", float: "a number (float)", bool: "true or false (bool)", str: "text (str)"}


def setting_types(cls: type) -> dict[str, type]:
    """{field name: int, float, bool or str} of a form's dataclass; TypeError naming a field of another type."""
    types = {}
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else SETTING_TYPES.get(str(field.type).strip())
        if kind not in _WHAT:
            shown = getattr(field.type, "__name__", field.type)
            raise TypeError(f"{cls.__name__}: setting {field.name} has type {shown}; a form's settings are "
                            f"int, float, bool or str (they travel as JSON in the adapter file)")
        types[field.name] = kind
    return types


def check_settings(cls: type, values: dict) -> dict:
    """`values` checked against the form's field types (an int is accepted for a float, made a float).

    Raises:
        ValueError: naming the form, the setting and what it must be (no bool for an int, no 2.5 for
            an int, no null, list or text for a number, no number for a str).
    """
    types, out = setting_types(cls), {}
    for key, value in values.items():
        kind = types.get(key)
        if kind is None:
            raise ValueError(f"intervention {cls.name!r} does not take these settings {values}: it has no "
                             f"setting {key!r} (its settings: {', '.join(types) or 'none'})")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {int: isinstance(value, int) and not isinstance(value, bool), bool: isinstance(value, bool),
              str: isinstance(value, str), float: number and math.isfinite(value)}[kind]
        if not ok:
            raise ValueError(f"{cls.name}'s setting {key} must be {_WHAT[kind]}, not {value!r}")
        out[key] = float(value) if kind is float else value
    return out


def register(cls: type) -> type:
    """Class decorator: make a form available by its `name` (train.py --intervention NAME).

    A form must be a dataclass (its fields are its settings, saved in the adapter and the resume key);
    decorate it with @dataclass under @register. It needs its own `name`, settings of type int,
    float, bool or str, and a `setup`; the built-in names (lofit) cannot be taken over.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__}: an intervention form must be a @dataclass (its fields are its settings)")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}: an intervention form needs its own `name`, a word such as "
                        f"'low_rank' (the --intervention value and the adapter's record), not {name!r}")
    if name in BUILT_IN and name in INTERVENTIONS and INTERVENTIONS[name] is not cls:
        raise TypeError(f"{cls.__name__}: {name!r} is a built-in form; give the new form another name")
    if getattr(cls, "setup") is Intervention.setup:
        raise TypeError(f"{cls.__name__}: an intervention form needs a setup(model, heads, init_std, generator)")
    setting_types(cls)
    INTERVENTIONS[name] = cls
    return cls


@register
@dataclasses.dataclass
class LoFiT(Intervention):
    """The paper's stage 2: the bias v of the selected heads (A stays 0), z -> z + v."""
    name = "lofit"

    def setup(self, model, heads, init_std, generator):
        return init_head_rows(model, heads, "lofit_v", init_std, generator)

    def merge(self, attn, weight, bias):
        return weight, bias  # A and v are folded for every form (adapter.merged_o_proj)


def make_intervention(name: str, **hparams) -> Intervention:
    """The registered form `name` with these hyperparameters (type-checked: check_settings).

    Raises:
        ValueError: an unknown name (naming the known forms) or a setting it does not take or of the wrong type.
    """
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; registered: {', '.join(sorted(INTERVENTIONS))} "
                         f"(a new form registers itself with @lofit.register when its file is imported)")
    cls = INTERVENTIONS[name]
    values = check_settings(cls, hparams)
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"intervention {name!r} does not take these settings {hparams}: {e}") from None


def intervention_of(model) -> Intervention:
    """The form installed on `model` (LoFiT unless `install` put another one there)."""
    return getattr(model, "lofit_intervention", None) or LoFiT()


def _edit_function(form, method: str = "edit"):
    """form.edit (or mlp_edit) as the model calls it, (site, z, ctx) -> z, its exceptions made FormError."""
    edit = getattr(form, method)
    with_ctx = len(inspect.signature(edit).parameters) >= 3  # edit(attn, z, ctx); older forms: edit(attn, z)

    def run(site, z, ctx):
        try:
            return edit(site, z, ctx) if with_ctx else edit(site, z)
        except Exception as e:
            raise _form_failed(form, method, e) from None
    return run


def _check_edit(model, form) -> None:
    """Run the installed edit of every layer on a small random z with zero parameters: same shape, and z exactly
    (for a form with parameters).

    Raises:
        FormError: naming the form, the layer and what is wrong (shape, dtype, not the base model at 0).
    """
    cfg = model.config
    sites = [("edit", "(B, T, H, hd)", attn, (cfg.n_heads, cfg.head_dim), form.parameters(cfg))
             for attn in attentions(model)]
    sites += [("mlp_edit", "(B, T, hidden)", mlp, (cfg.hidden_size,), form.mlp_parameters(cfg)) for mlp in mlps(model)]
    for i, (method, names, site, shape, params) in enumerate(sites):
        if site.lofit_edit is None:
            continue
        layer, device = i % cfg.n_layers, attentions(model)[0].lofit_A.device
        z = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(layer)).to(device)
        mask = torch.tensor([[1, 1, 1], [1, 1, 0]], device=device)  # one right-padded row
        ctx = EditContext(mask, (mask.cumsum(-1) - 1).clamp(min=0), torch.tensor([2, -1], device=device), 0, layer,
                          False)
        with torch.no_grad():
            out = site.lofit_edit(site, z.clone(), ctx)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape or not out.is_floating_point():
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise FormError(f"{form.name}: {method} must return its input's shape {tuple(z.shape)} {names} as "
                            f"floats, returned {got} (layer {layer})")
        if params and not torch.equal(out, z):  # (an edit without parameters has no zero)
            raise FormError(f"{form.name}: with every parameter at zero {method} changes its input (layer {layer}, "
                            f"largest change {float((out.float() - z).abs().max()):.3g}); all-zero must be the base "
                            f"model")


def install(model, form: Intervention) -> Intervention:
    """Put `form` on every attention module: its `lofit_*` parameters (created at 0) and its edit.

    An earlier form's parameters and edit are removed first; LoFiT's A and v are always there.
    Parameters are made like lofit_A (same device and dtype), so this works after loading and
    after the blocks were wrapped (FSDP2 leaves lofit_* parameters alone). The edit is then run at
    zero on a small random z (_check_edit): a wrong shape, or an edit that is not the base model
    at zero, is refused and the previous form put back.
    """
    old = intervention_of(model)
    try:
        new, _ = form.parameters(model.config), form.mlp_parameters(model.config)
    except ValueError:
        raise  # the form's refusal of its settings
    except Exception as e:
        raise _form_failed(form, "parameters", e) from None
    for name, shape in new.items():  # checked before anything changes
        if not shape or shape[0] != model.config.n_heads:
            raise FormError(f"{form.name}: lofit_{name} has shape {tuple(shape)}; a per-head parameter's first "
                             f"dimension is n_heads ({model.config.n_heads})")
    _place(model, old, form)
    try:
        _check_edit(model, form)
    except Exception:
        _place(model, form, old)
        raise
    return form


def _place(model, old, form) -> None:
    """Swap `old`'s lofit_* parameters and edits for `form`'s, created at zero, at both sites."""
    cfg = model.config
    like = attentions(model)[0].lofit_A  # device and dtype of every offset
    for sites, params, method in [(attentions(model), "parameters", "edit"),
                                  (mlps(model), "mlp_parameters", "mlp_edit")]:
        new = getattr(form, params)(cfg)
        for site in sites:
            for name in getattr(old, params)(cfg):
                delattr(site, "lofit_" + name)
            for name, shape in new.items():
                site.register_parameter("lofit_" + name, nn.Parameter(torch.zeros(shape, device=like.device,
                                                                                 dtype=like.dtype)))
            edits = new or getattr(type(form), method) is not getattr(Intervention, method)
            site.lofit_edit = _edit_function(form, method) if edits else None
    model.lofit_intervention = form


def check_form(model, form: Intervention) -> None:
    """Everything about `form` that can be checked before any training: its parameters, its edit at zero
    on every layer (install's check), and its merge at zero (the o_proj it was given, exactly).
    The model is left with the form it had.

    Raises:
        ValueError: the form refuses its settings. FormError: what is wrong, naming the form (also when its
            own code raised).
    """
    before = intervention_of(model)
    if type(form).setup is Intervention.setup:
        raise FormError(f"{form.name}: the form has no setup(model, heads, init_std, generator)")
    install(model, form)
    try:
        if form.mergeable:
            attn, mlp = attentions(model)[0], mlps(model)[0]
            hidden = model.config.hidden_size  # random weights of the real shapes, once (fp64, as merging)
            for method, site, width in [("merge", attn, attn.n_heads * attn.head_dim),
                                        ("merge_mlp", mlp, model.config.intermediate_size)]:
                if method == "merge_mlp" and mlp.lofit_edit is None:
                    continue
                weight = torch.randn(hidden, width, dtype=torch.float64).to(attn.lofit_A.device)
                bias = torch.randn(hidden, dtype=torch.float64).to(attn.lofit_A.device)
                with form_code(form, method):
                    w, b = getattr(form, method)(site, weight.clone(), bias.clone())
                if not (torch.equal(w, weight) and torch.equal(b, bias)):
                    raise FormError(f"{form.name}: {method} changes the weights with every parameter at zero; it "
                                    f"must return the weight and bias unchanged there")
    finally:
        install(model, before)
    reset_offsets(model)
