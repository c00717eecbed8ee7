"""JoLA (Lai et al., ICML 2025, arXiv 2502.01179): gated scale and offset per head, z_h <- (1 + g_m m_h) z_h + g_a a_h.

    python train.py --task clutrr --intervention examples/jola.py --intervention-arg l0=1e-3

Each head has two HardConcrete gates (Louizos et al. 2018) with log-alphas p_h (scale) and q_h
(offset): temperature 0.33, stretched to (-0.1, 1.1) and clipped to [0, 1]. While the model is
training (EditContext.training) each gate is sampled once per head and optimiser step (start_step;
shared by the batch's rows, micro-batches and processes, so 2 processes train as 1) from u ~ U(0, 1)
drawn from the form's own generator (seeded in setup; `state_dict` is what a checkpoint keeps, so a
resumed run draws the same gates); at evaluation it is deterministic, clip(sigmoid(p) * 1.2 - 0.1,
0, 1). The penalty is the expected number of open gates (the expected L0 norm), times l0, once per
global batch.

JoLA localizes by its gates rather than by LoFiT's stage 1: `selects_heads` asks the trainer to
train every head; where the trainer has no such step it trains the heads it is given. All-zero
parameters are the base model (m = a = 0, whatever the gates). At evaluation the edit is affine in
z, so it folds exactly into o_proj (merge), with the deterministic gates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lofit import Intervention, attentions, register, train_rows

TEMPERATURE, LOW, HIGH = 0.33, -0.1, 1.1  # HardConcrete: beta, and the stretch (gamma, zeta)


def gate(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """HardConcrete gates: sampled from uniform draws u (same shape) while training, deterministic without."""
    if u is None:
        s = torch.sigmoid(log_alpha)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    return (s * (HIGH - LOW) + LOW).clamp(0, 1)


def expected_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0) per gate: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-LOW / HIGH))


@register
@dataclass
class JoLA(Intervention):
    l0: float = 1e-3  # weight of the expected-L0 penalty
    name = "jola"
    selects_heads = True  # the gates localize: train every head, no stage 1

    def __post_init__(self):
        self.rng = torch.Generator().manual_seed(0)  # setup seeds it from the run's seed
        self.noise = None  # (L, 2, H) uniform draws of the current optimiser step (start_step)

    def parameters(self, config):
        """m, a (H, hd) and the gates' log-alphas p, q (H,), created at 0 by lofit.install."""
        return {"m": (config.n_heads, config.head_dim), "a": (config.n_heads, config.head_dim),
                "p": (config.n_heads,), "q": (config.n_heads,)}

    def start_step(self, model):
        """Draw every layer's gate noise for one optimiser step: JoLA samples once per batch, and a global
        batch may run as several micro-batches and processes (all of which use these same draws)."""
        n_layers, n_heads = model.config.n_layers, model.config.n_heads
        self.noise = torch.rand(n_layers, 2, n_heads, generator=self.rng).clamp(1e-6, 1 - 1e-6)

    def gates(self, attn, training: bool, layer: int = 0):
        """(g_m, g_a), each (H, 1): sampled while training (the step's noise; without a step, a fresh draw
        from the form's generator), else deterministic."""
        if not training:
            return gate(attn.lofit_p)[:, None], gate(attn.lofit_q)[:, None]
        u = self.noise[layer] if self.noise is not None else \
            torch.rand(2, attn.n_heads, generator=self.rng).clamp(1e-6, 1 - 1e-6)
        u = u.to(attn.lofit_p.device)
        return gate(attn.lofit_p, u[0])[:, None], gate(attn.lofit_q, u[1])[:, None]

    def edit(self, attn, z, ctx):
        """z (B, T, H, hd) -> (1 + g_m m) * z + g_a a, per head."""
        g_m, g_a = self.gates(attn, ctx is not None and ctx.training, ctx.layer if ctx is not None else 0)
        return (1 + g_m * attn.lofit_m) * z + g_a * attn.lofit_a

    def setup(self, model, heads, init_std, generator):
        """m = a = 0 and p = q = 0 (gates half open) on `heads`, all trainable there; the gate noise's
        generator seeded from `generator`. m and a get gradients at 0; p and q once they move."""
        self.rng = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        params = []
        for layer, attn in enumerate(attentions(model)):
            rows = [h for at, h in heads if at == layer]
            if rows:
                params += [train_rows(attn, "lofit_" + name, rows) for name in "mapq"]
        return params

    def penalty(self, model):
        """l0 x the expected number of open gates over every layer (both gates of every head)."""
        return self.l0 * sum(expected_open(a.lofit_p).sum() + expected_open(a.lofit_q).sum()
                             for a in attentions(model))

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.set_state(state["rng"])

    def merge(self, attn, weight, bias):
        """Deterministic gates: W [(1 + g_m m) * z + g_a a] + b = (W diag(1 + g_m m)) z + (b + W g_a a)."""
        g_m, g_a = (g.detach().double() for g in self.gates(attn, training=False))
        scale = (1 + g_m * attn.lofit_m.detach().double()).reshape(-1)  # (H*hd,)
        shift = (g_a * attn.lofit_a.detach().double()).reshape(-1)
        if bias is not None or shift.any():
            bias = weight @ shift + (0 if bias is None else bias)
        return weight * scale, bias
