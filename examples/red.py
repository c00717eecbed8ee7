"""RED: every layer's MLP output y (hidden,) scaled and shifted, y <- (1 + s) * y + b
(Wu et al. 2024, "Advancing Parameter Efficiency in Fine-tuning via Representation Editing").

    python train.py --task clutrr --intervention examples/red.py
    python eval.py --task clutrr --intervention examples/red.py --adapter runs/clutrr/adapter.safetensors

RED writes the scale as l_scale * y with l_scale starting at 1; here it is 1 + s with s starting at 0,
so all-zero is the base model (as every form must be). It edits the second site, the MLP output
(model.MLP), not the attention heads: it trains s and b of every layer (2 x L x hidden numbers) and
ignores the head selection (stage 1 still runs; its heads are recorded in the adapter, unused).
The adapter holds mlp.s and mlp.b, (L, hidden) each. The edit is affine in y, so it folds exactly
into down_proj: W <- diag(1 + s) W, bias <- (1 + s) * bias + b (merge_mlp).
"""
from __future__ import annotations

from dataclasses import dataclass

from lofit import Intervention, mlps, register


@register
@dataclass
class RED(Intervention):
    name = "red"

    def mlp_parameters(self, config):
        """s and b (hidden,) on every layer's MLP, created at 0 by lofit.install."""
        return {"s": (config.hidden_size,), "b": (config.hidden_size,)}

    def mlp_edit(self, mlp, y, ctx):
        """y (B, T, hidden), fp32 -> (1 + s) * y + b, the same at every position."""
        return (1 + mlp.lofit_s) * y + mlp.lofit_b

    def setup(self, model, heads, init_std, generator):
        """Both vectors of every layer trainable from 0: each gets a gradient there ((1 + s) is 1, not 0)."""
        params = []
        for mlp in mlps(model):
            params += [mlp.lofit_s.requires_grad_(True), mlp.lofit_b.requires_grad_(True)]
        return params

    def merge(self, attn, weight, bias):
        return weight, bias  # nothing at the heads: o_proj only gets LoFiT's A and v (0)

    def merge_mlp(self, mlp, weight, bias):
        """W (hidden, inter) -> diag(1 + s) W; bias -> (1 + s) * bias + b (a bias appears if there was none)."""
        scale, b = 1 + mlp.lofit_s.detach().double(), mlp.lofit_b.detach().double()
        if bias is None and not b.any():
            return weight * scale[:, None], None
        return weight * scale[:, None], scale * (0 if bias is None else bias) + b
