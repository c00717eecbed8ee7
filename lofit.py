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
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import collate
from model import KVCache


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
    hidden = model.hidden_states(input_ids, attention_mask, cache)  # (B, T, D)
    predicts = loss_mask[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    rows, cols = predicts.nonzero(as_tuple=True)  # (N,) each
    logits = model.lm_head(hidden[rows, cols]).float()  # (N, V)
    targets = input_ids[rows, cols + 1]  # (N,)
    return rows, -F.cross_entropy(logits, targets, reduction="none")  # (N,)


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
    model.hidden_states(prefix_ids, prefix_mask, cache)  # fills the cache: per layer (n, H_kv, P, hd)
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
    return form.setup(model, heads, init_std, generator)

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
    before = [attn.lofit_enabled for attn in attentions(model)]
    for attn in attentions(model):
        attn.lofit_enabled = False
    try:
        yield model
    finally:
        for attn, enabled in zip(attentions(model), before):
            attn.lofit_enabled = enabled

# ----------------------------------------------------------------------------------------------
# The intervention protocol: every lofit_* parameter found by name, and the forms stage 2 can train


def attentions(model) -> list[nn.Module]:
    """The attention module of every layer, in layer order."""
    return [block.self_attn for block in model.layers]

def offset_parameters(attn: nn.Module) -> dict[str, nn.Parameter]:
    """An attention module's intervention parameters: every `lofit_*` one (A, v, and any form's)."""
    return {name: p for name, p in attn.named_parameters(recurse=False) if name.startswith("lofit_")}


def reset_offsets(model) -> None:
    """Every `lofit_*` parameter of every layer set to exactly 0: the base model again."""
    with torch.no_grad():
        for attn in attentions(model):
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

class Intervention:
    """One form of per-head edit of z (head h's output: its slice of o_proj's input), for stage 2.

    A form is a dataclass (its fields are its hyperparameters; they travel in the adapter file) that
    supplies:
    - `parameters(config)`: the extra `lofit_<name>` tensors it needs in every attention module,
      as {name: shape}; each shape starts with n_heads (one row per head), and all-zero must be
      the base model exactly. `install` creates them at zero.
    - `edit(attn, z)`: z (B, T, H, hd) -> the edited z, after LoFiT's (1 + A) * z + v. Runs only
      while the form is installed.
    - `setup(model, heads, init_std, generator)`: initialise and make trainable (train_rows) on
      `heads` only; return the parameters to optimise. The base is frozen and every offset is 0
      when it is called. A product of factors needs one factor non-zero, or no gradient flows.
    - `merge(attn, weight, bias)`, only where the form is affine in z: fold it into o_proj exactly,
      (weight (D, H*hd), bias (D,) or None) that consume the edited z -> the pair that consumes
      the unedited z, in fp64. A form without it is refused by merging and export (`mergeable`).
    Reset, saving, loading, gradient masks and the trainable count are generic over `lofit_*`.
    """
    name = "base"

    def parameters(self, config) -> dict[str, tuple[int, ...]]:
        return {}

    def edit(self, attn: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return z

    def setup(self, model, heads, init_std: float, generator) -> list[nn.Parameter]:
        raise NotImplementedError

    def merge(self, attn: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError(f"{self.name} has no merge into o_proj")

    @property
    def mergeable(self) -> bool:
        """Whether the form defines `merge` (a form that is not linear in z does not)."""
        return type(self).merge is not Intervention.merge

    def hparams(self) -> dict:
        """The form's settings, JSON-able: its dataclass fields."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


INTERVENTIONS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a form available by its `name` (train.py --intervention NAME).

    A form must be a dataclass (its fields are its settings, saved in the adapter and the resume key);
    decorate it with @dataclass under @register.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__}: an intervention form must be a @dataclass (its fields are its settings)")
    INTERVENTIONS[cls.name] = cls
    return cls


@register
@dataclasses.dataclass
class LoFiT(Intervention):
    """The paper's stage 2: the bias v of the selected heads (A stays 0), z -> z + v."""
    name = "lofit"

    def setup(self, model, heads, init_std, generator):
        draws = _normal((len(heads), model.config.head_dim), init_std, generator, torch.empty(0))  # (K, hd)
        params = []
        with torch.no_grad():
            for layer, attn in enumerate(attentions(model)):
                rows = [(i, h) for i, (at, h) in enumerate(heads) if at == layer]
                for i, h in rows:
                    attn.lofit_v[h] = draws[i].to(attn.lofit_v.device, attn.lofit_v.dtype)
                if rows:
                    params.append(train_rows(attn, "lofit_v", [h for _, h in rows]))
        return params

    def merge(self, attn, weight, bias):
        return weight, bias  # A and v are folded for every form (adapter.merged_o_proj)


def make_intervention(name: str, **hparams) -> Intervention:
    """The registered form `name` with these hyperparameters; ValueError naming the known forms."""
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; registered: {', '.join(sorted(INTERVENTIONS))} "
                         f"(a new form registers itself with @lofit.register when its file is imported)")
    try:
        return INTERVENTIONS[name](**hparams)
    except TypeError as e:
        raise ValueError(f"intervention {name!r} does not take these settings {hparams}: {e}") from None


def intervention_of(model) -> Intervention:
    """The form installed on `model` (LoFiT unless `install` put another one there)."""
    return getattr(model, "lofit_intervention", None) or LoFiT()


def install(model, form: Intervention) -> Intervention:
    """Put `form` on every attention module: its `lofit_*` parameters (created at 0) and its edit.

    An earlier form's parameters and edit are removed first; LoFiT's A and v are always there.
    Parameters are made like lofit_A (same device and dtype), so this works after loading and
    after the blocks were wrapped (FSDP2 leaves lofit_* parameters alone).
    """
    old, new = intervention_of(model), form.parameters(model.config)
    for name, shape in new.items():  # checked before anything changes
        if not shape or shape[0] != model.config.n_heads:
            raise ValueError(f"{form.name}: lofit_{name} has shape {tuple(shape)}; a per-head parameter's first "
                             f"dimension is n_heads ({model.config.n_heads})")
    for attn in attentions(model):
        for name in old.parameters(model.config):
            delattr(attn, "lofit_" + name)
        for name, shape in new.items():
            like = attn.lofit_A
            attn.register_parameter("lofit_" + name, nn.Parameter(torch.zeros(shape, device=like.device,
                                                                             dtype=like.dtype)))
        attn.lofit_edit = form.edit if new or type(form).edit is not Intervention.edit else None
    model.lofit_intervention = form
    return form
