"""A per-head steering vector added at one position only: the last prompt token, z_h <- z_h + s_h there.

    python train.py --task mquake --intervention examples/steer_last_token.py
    python eval.py --task mquake --model meta-llama/Llama-2-7b-hf --intervention examples/steer_last_token.py \
        --adapter runs/mquake/adapter.safetensors

Stage 1 (LoFiT's head selection) is unchanged; stage 2 trains s_h (head_dim,) of the K selected heads.
Where the edit acts comes from its context (model.EditContext): the column just before each row's
answer start. That column is a real token on every path that knows the answer start: right-padded
training rows, DPO's shared-prefix and suffix passes, TruthfulQA scoring on the prefix cache (the
prefix stops before every answer) and generation's prefill (the prompt's last token; no decode step
hits it, since the answer start stays the prompt width). A plain forward knows no answer start: no edit.

The edit depends on the position, so it has no merge into o_proj: merging and export refuse it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lofit import Intervention, init_head_rows, register


@register
@dataclass
class SteerLastToken(Intervention):
    name = "steer_last_token"

    def parameters(self, config):
        """s (H, hd) in every attention module, created at 0 by lofit.install."""
        return {"s": (config.n_heads, config.head_dim)}

    def edit(self, attn, z, ctx):
        """z (B, T, H, hd) + s at column answer_start - 1 of each row (where that column is among these T)."""
        if ctx is None or ctx.answer_start is None:
            return z
        columns = torch.arange(ctx.past, ctx.past + z.shape[1], device=z.device)  # (T,): this call's columns
        last_prompt = (columns == ctx.answer_start[:, None] - 1).to(z.dtype)  # (B, T); rows at -1 never match
        return z + last_prompt[:, :, None, None] * attn.lofit_s  # (B, T, 1, 1) * (H, hd)

    def setup(self, model, heads, init_std, generator):
        """s ~ N(0, init_std) on the selected heads, drawn in `heads` order on the CPU; trainable there only."""
        return init_head_rows(model, heads, "lofit_s", init_std, generator)
