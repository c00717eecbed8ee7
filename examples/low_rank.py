"""A new intervention in one file: a per-head rank-r map on the selected heads, z_h <- z_h + z_h U_h W_h.

    python train.py --task clutrr --intervention examples/low_rank.py --intervention-arg rank=2
    python eval.py --task clutrr --intervention examples/low_rank.py --adapter runs/clutrr/adapter.safetensors

Stage 1 (LoFiT's head selection) is unchanged; stage 2 trains U_h (hd, r) and W_h (r, hd) of the K
selected heads instead of LoFiT's bias. The rank travels in the adapter's metadata. The map is
linear in z, so it folds exactly into o_proj (merge).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lofit import Intervention, attentions, register, train_rows


@register
@dataclass
class LowRank(Intervention):
    rank: int = 2  # r
    name = "low_rank"

    def parameters(self, config):
        """U (H, hd, r) and W (H, r, hd) in every attention module, created at 0 by lofit.install."""
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        return {"U": (config.n_heads, config.head_dim, self.rank), "W": (config.n_heads, self.rank, config.head_dim)}

    def edit(self, attn, z):
        """z (B, T, H, hd) -> z + z U W, head by head."""
        low = torch.einsum("bthd,hdr->bthr", z, attn.lofit_U)  # (B, T, H, r)
        return z + torch.einsum("bthr,hrd->bthd", low, attn.lofit_W)

    def setup(self, model, heads, init_std, generator):
        """U ~ N(0, 1/hd) on the selected heads, W = 0: the base model, yet W gets a gradient.

        (With both factors at 0, as loading leaves them, neither would ever get a gradient.)
        """
        params = []
        with torch.no_grad():
            for layer, attn in enumerate(attentions(model)):
                rows = [h for at, h in heads if at == layer]
                draws = torch.randn(len(rows), *attn.lofit_U.shape[1:], generator=generator)  # (k, hd, r)
                attn.lofit_U[rows] = (draws / attn.head_dim ** 0.5).to(attn.lofit_U.device, attn.lofit_U.dtype)
                if rows:
                    params += [train_rows(attn, "lofit_U", rows), train_rows(attn, "lofit_W", rows)]
        return params

    def merge(self, attn, weight, bias):
        """W_o [z M] = (W_o M^T) z per head, M_h = I + U_h W_h (hd, hd): only o_proj's weight changes."""
        U, W = attn.lofit_U.detach().double(), attn.lofit_W.detach().double()
        M = torch.eye(attn.head_dim, dtype=torch.float64, device=U.device) + U @ W  # (H, hd, hd)
        blocks = weight.view(weight.shape[0], attn.n_heads, attn.head_dim)  # (D, H, hd): columns per head
        return torch.einsum("dhe,hfe->dhf", blocks, M).reshape(weight.shape), bias
