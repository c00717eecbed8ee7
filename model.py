"""A self-contained Llama in plain PyTorch, with LoFiT's per-head parameters in its attention block.

Gemma (v1) is the same network with three small differences, each marked `# Gemma:` below: a
tanh-approximated GELU in the MLP, RMSNorm scaling by (1 + weight) in fp32, and embeddings
multiplied by sqrt(hidden_size).

Read top to bottom: config -> RoPE -> attention (where LoFiT acts) -> MLP -> block -> model ->
loading Hugging Face checkpoints -> generation. The forward pass follows transformers'
LlamaForCausalLM op for op, so logits match it exactly (see ../shared/docs/llama.md and
tests/test_model.py).

References: Touvron et al. 2023 (Llama 2); transformers' modeling_llama.py (the parity reference);
LoFiT (Yin, Ye, Durrett, NeurIPS 2024, arXiv 2406.01563) for `lofit_A` / `lofit_v`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm


class LofitError(Exception):
    """A mistake the user can fix (a flag, a file, a checkpoint): the commands print its message as one
    `error:` line and exit 2. Every module's own kind (CheckpointError here, AdapterError, DataError,
    TokenizerError, machinery's UsageError, HubError, WriteError) is one of these."""


class CheckpointError(LofitError, ValueError):
    """A config or checkpoint this code cannot load; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Config


# The numbers each supported rope scaling reads from the config's rope_scaling / rope_parameters.
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", ...} or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v, o projections
    mlp_bias: bool = False  # bias on gate, up, down projections
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "llama"  # "llama" (also Mistral-style configs) or "gemma"

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "gemma"):
            raise CheckpointError(f"model_type {model_type!r} is not supported (supported: llama, mistral, gemma)")
        # Gemma's configs say "gelu", which transformers reads as the tanh approximation; so do we.
        activations = ("gelu_pytorch_tanh", "gelu") if model_type == "gemma" else ("silu",)
        if hf.get("hidden_act", activations[0]) not in activations:
            raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported for {model_type} "
                                  f"(expected {activations[0]})")
        window = hf.get("sliding_window", 4096) if model_type == "mistral" else None  # transformers' default
        if window not in (None, 0) and window < hf.get("max_position_embeddings", 0):
            raise CheckpointError(f"sliding-window attention (window {window}) is not supported")
        for unsupported in ("quantization_config", "use_bidirectional_attention"):
            if hf.get(unsupported):
                raise CheckpointError(f"{unsupported} is set: quantized or bidirectional checkpoints are not "
                                      f"supported; use the original (unquantized, causal) model")
        # transformers 5 stores rope settings in rope_parameters; 4.x in rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_KEYS:
            raise CheckpointError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_KEYS)})")
        if missing := [k for k in ROPE_KEYS[rope_type] if not isinstance(rope.get(k), (int, float))]:
            raise CheckpointError(f"{rope_type} rope scaling needs the numbers {', '.join(missing)} in rope_scaling")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else
            {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": rope_type},
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gemma"),  # Gemma ties by default
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            model_type="gemma" if model_type == "gemma" else "llama",
        )

    def to_hf(self) -> dict:
        """The config.json dict transformers' LlamaForCausalLM reads (4.x spelling; 5.x accepts it)."""
        gemma = self.model_type == "gemma"
        return {
            "architectures": ["GemmaForCausalLM" if gemma else "LlamaForCausalLM"], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }

    def fingerprint(self) -> dict:
        """The fields that decide whether weights or an adapter fit this architecture."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("bos_token_id", "eos_token_id", "max_position_embeddings")}


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (HF's rotate_half layout)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with linear or llama3 scaling applied once."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)  # long waves: slow down
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # the band in between: interpolate
        in_band = ~(wavelen < old_ctx / high) * ~(wavelen > old_ctx / low)
        inv_freq = torch.where(in_band, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T), cast to the model dtype."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos, sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return (x * cos) + (rotate_half(x) * sin)


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma: scale by (1 + weight) in fp32, then cast back
            return (x32 * (1.0 + self.weight.float())).type_as(x)
        return self.weight * x32.to(x.dtype)  # Llama: cast back, then scale (HF's order; it matters in bf16)


class KVCache:
    """Keys and values of every position seen so far: per layer a pair of (B, n_kv_heads, T_past, hd)."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v (B, n_kv, T, hd) for `layer`; return all keys and values so far."""
        if layer == len(self.layers):
            self.layers.append((k, v))
        else:
            past_k, past_v = self.layers[layer]
            self.layers[layer] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        return self.layers[layer]

    def expand(self, batch: int) -> "KVCache":
        """A cache of batch size `batch` from a batch-1 cache (e.g. a prompt prefix shared by many rows)."""
        out = KVCache()
        out.layers = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return out


class EditContext(NamedTuple):
    """What an installed form's edit sees besides z (lofit.Intervention.edit), for T new tokens of B rows.

    Built once per forward (Llama.hidden_states), with `layer` filled in per layer, and the same in
    training (ce_loss, DPO's prefix and suffix passes), TruthfulQA scoring on the prefix cache,
    generation (the prefill and each decode step) and a plain forward. Columns count the whole
    sequence, cached past included: column c of a row is attention_mask[:, c], and the new tokens
    are columns past .. past + T - 1.
    """
    attention_mask: torch.Tensor | None  # (B, past + T), 1 on real tokens; None: every token is real
    positions: torch.Tensor  # (B, T) rotary positions of the new tokens (real tokens counted)
    answer_start: torch.Tensor | None  # (B,) column of each row's first answer token, -1 where unknown;
    #                                    None where unknown for every row (a plain forward)
    past: int  # cached positions before the new tokens
    layer: int  # this attention's layer index
    training: bool  # the model's training flag (dropout-like behaviour: sampled gates, ...)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention, where LoFiT edits each head's output.

    LoFiT (arXiv 2406.01563): head h's output z (its slice of o_proj's input) becomes
    (1 + lofit_A[h]) * z + lofit_v[h] at every position (`intervene`). Both parameters are zero by
    default, which is exactly the base model. Another form of edit (lofit.Intervention) adds its own
    `lofit_*` parameters and sets `lofit_edit`, which then runs right after. `lofit_enabled = False`
    switches every edit off (e.g. for reference log-probs) without touching the values.
    from_pretrained makes every lofit_* parameter fp32 in a model of any dtype (so AdamW's state is
    fp32 too), and the edit is computed in fp32.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.lofit_A = nn.Parameter(torch.zeros(self.n_heads, hd))  # per-head scale offset
        self.lofit_v = nn.Parameter(torch.zeros(self.n_heads, hd))  # per-head bias offset
        self.lofit_enabled = True
        self.lofit_edit = None  # another form's edit, (attn, z, ctx) -> z; set by lofit.install

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0,
                ctx: EditContext | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, T_past + T, hd)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1 and mask is not None:  # query head h reads kv head h // groups
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=groups > 1 and mask is None)  # (B, H, T, hd)
        z = z.transpose(1, 2)  # (B, T, H, hd): z[:, :, h] is head h's output
        if self.lofit_enabled:
            z = self.intervene(z, ctx, layer)  # LoFiT: the per-head edit of the head outputs
        return self.o_proj(z.reshape(B, T, self.n_heads * self.head_dim))

    def intervene(self, z: torch.Tensor, ctx: EditContext | None = None, layer: int = 0) -> torch.Tensor:
        """z (B, T, H, hd) edited per head: LoFiT's scale and bias, then any installed form's edit.

        The form's edit gets `ctx` (EditContext) with this layer's index; LoFiT's own arithmetic ignores it.

        Computed in fp32 (the lofit_* parameters are fp32) whatever the model's dtype, since in
        bf16 1 + 1e-3 == 1; the result is rounded once to z's dtype for o_proj.
        """
        edited = (1 + self.lofit_A) * z.float() + self.lofit_v  # LoFiT: per-head scale and bias, (H, hd) broadcast
        if self.lofit_edit is not None:
            ctx = ctx._replace(layer=layer) if ctx is not None else None
            edited = self.lofit_edit(self, edited, ctx)  # LoFiT: another form's edit (lofit.install), e.g. examples/
        return edited.to(z.dtype)


class MLP(nn.Module):
    """The gated MLP. A form of intervention may also edit its output y (B, T, hidden), the second
    site after the attention heads (lofit.Intervention.mlp_edit; e.g. examples/red.py): `lofit_edit`
    and its `lofit_*` parameters are set by lofit.install; none by default, the base model."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)
        self.gemma = config.model_type == "gemma"
        self.lofit_enabled = True
        self.lofit_edit = None  # LoFiT: a form's edit of the MLP output, (mlp, y, ctx) -> y; set by lofit.install

    def forward(self, x, ctx: EditContext | None = None):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)  # Gemma: GELU (tanh)
        y = self.down_proj(gate * self.up_proj(x))  # (B, T, hidden)
        if self.lofit_edit is not None and self.lofit_enabled:  # LoFiT: a form's edit of the MLP output, in fp32
            y = self.lofit_edit(self, y.float(), ctx).to(y.dtype)
        return y


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        gemma = config.model_type == "gemma"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, ctx: EditContext | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, ctx)
        if self.mlp.lofit_edit is not None and ctx is not None:
            ctx = ctx._replace(layer=layer)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


# ----------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.model_type == "gemma")
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.source = None  # where the weights came from (a path or hub id), set by from_pretrained

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                answer_start: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        attention_mask: (B, T_past + T) with 1 for real tokens and 0 for padding (left or right);
        positions count real tokens only, so a padded row gives the same logits as the unpadded one.
        cache: a KVCache holding the past positions; it is extended in place.
        answer_start: (B,) column of each row's first answer token (-1: unknown), passed to an
        installed form's edit (EditContext); None, as in a plain forward, says unknown for every row.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, answer_start))

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                      answer_start: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, hidden); `lm_head` on them gives the logits.

        Callers that need logits at a few positions only (a loss on answer tokens, the last token
        when generating) apply lm_head to those positions and skip the rest of the (T, vocab) work.
        """
        B, T = input_ids.shape
        past = len(cache) if cache is not None else 0
        positions, mask = positions_and_mask(attention_mask, B, past, T, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.config.model_type == "gemma":  # Gemma: scale embeddings by sqrt(hidden), in the model dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, device=x.device).to(x.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, T, hd) each
        ctx = EditContext(attention_mask, positions, answer_start, past, 0, self.training)  # LoFiT: for a form's edit
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i, ctx)
        return self.norm(x)

    # ------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype = torch.float32, device="cpu",
                        progress: bool = False) -> "Llama":
        """Load a Hugging Face checkpoint directory (config.json + safetensors files).

        Hub repo ids and llama.cpp .gguf files are read by machinery/checkpoints.py, which turns them
        into the same (config, tensors) and calls `from_tensors`.
        """
        directory = Path(directory)
        config = read_config(directory)  # first: a missing config.json is the clearer message
        tensors = ((file.name, key, t) for file in checkpoint_files(directory) for key, t in read_safetensors(file))
        return cls.from_tensors(config, tensors, where=directory, dtype=dtype, device=device, progress=progress)

    @classmethod
    def from_tensors(cls, config: LlamaConfig, tensors, *, where, described_by: str = "config.json",
                     dtype: torch.dtype = torch.float32, device="cpu", progress: bool = False) -> "Llama":
        """Build a model from `config` and `tensors`, an iterable of (file name, HF tensor name, tensor).

        The model is built on the meta device and each tensor is moved into its final dtype and
        device as it is read, so a 7B model is never held twice. Loading is strict: every tensor
        present, none left over. `progress` shows a bar over the tensors read (minutes for a 7B model).
        """
        with torch.device("meta"):
            model = cls(config)
        state = {name: param for name, param in model.named_parameters()}
        # LoFiT parameters are not in checkpoints; a tied lm_head is listed once, as embed_tokens.
        expected = {hf_name(n): n for n in state if ".lofit_" not in n}
        loaded = {}
        unexpected = []
        for file, key, tensor in tqdm(tensors, total=len(expected), desc="loading weights", unit="tensor",
                                      disable=not progress, leave=False, dynamic_ncols=True):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some exports of tied models store the shared matrix twice; transformers skips it
            if key in expected and expected[key] in loaded:
                raise CheckpointError(f"{file}: {key} appears in more than one shard; the checkpoint "
                                      f"is inconsistent: re-download it")
            if key not in expected:
                unexpected.append(key)
                continue
            ours = expected[key]
            if tuple(tensor.shape) != tuple(state[ours].shape):
                raise CheckpointError(f"{file}: {key} has shape {tuple(tensor.shape)}, "
                                      f"{described_by} implies {tuple(state[ours].shape)}")
            loaded[ours] = tensor.to(device=device, dtype=dtype)
        missing = sorted(set(expected) - {hf_name(n) for n in loaded})
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {where} does not match {described_by}: "
                                  f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                  f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for block in model.layers:  # every lofit_* parameter starts at zero (the base model), in fp32
            attn = block.self_attn
            for param_name, param in list(attn.named_parameters(recurse=False)):
                if param_name.startswith("lofit_"):
                    setattr(attn, param_name, nn.Parameter(torch.zeros_like(param, device=device, dtype=torch.float32)))
        model.load_state_dict(loaded, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(device)
        model.source = str(where)
        return model.eval()

    # ------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, eos_id=None,
                 temperature: float = 0.0, top_p: float = 1.0, pad_id: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of a left-padded batch (B, T); return the new tokens (B, <= max_new_tokens).

        temperature 0 is greedy decoding; otherwise sampling with nucleus top_p. Rows that emit
        `eos_id` (an int or a list of ints) stop; their later positions hold `pad_id`. Generation
        ends early once every row has stopped. Uses a KV cache: each step runs one token per row.
        """
        B = input_ids.shape[0]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with T >= 1 (at least a BOS), got {tuple(input_ids.shape)}")
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_p}")
        if max_new_tokens == 0:
            return input_ids.new_empty(B, 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([eos_id] if isinstance(eos_id, int) else (eos_id or []), device=input_ids.device)
        cache, out = KVCache(), []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        answer_start = torch.full((B,), input_ids.shape[1], device=input_ids.device)  # the answer follows the prompt
        for _ in range(max_new_tokens):
            h = self.hidden_states(step_ids, attention_mask, cache, answer_start)[:, -1]  # (B, hidden): last position
            logits = self.lm_head(h).float()  # (B, vocab)
            next_id = sample(logits, temperature, top_p, generator)  # (B,)
            next_id = torch.where(done, torch.full_like(next_id, pad_id), next_id)
            out.append(next_id)
            done |= torch.isin(next_id, eos)
            if done.all():
                break
            step_ids = next_id[:, None]  # (B, 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        return torch.stack(out, dim=1)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab): argmax when temperature is 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # smallest set whose mass reaches top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1), renormalised inside
    return order.gather(-1, choice).squeeze(-1)


def positions_and_mask(attention_mask, B: int, past: int, T: int, device):
    """Rotary positions (B, T) and the SDPA attention mask for T new tokens after `past` cached ones.

    Without padding the mask is None and attention is plainly causal. With padding, positions
    count real tokens only (so padding never shifts a row) and the boolean mask (B, 1, T, past + T)
    lets a query see real keys at or before it. Each position may always see itself, so rows of
    padding never become all-masked (which would give NaN); their outputs are ignored anyway.

    Right padding without a cache (every training batch, data.collate) needs no mask either: a real
    query's causal keys are all real, since the padding comes after it. The mask is None there too,
    so SDPA's causal kernel skips the upper triangle (faster than a full boolean mask, forward and
    backward); real positions get bit-identical outputs, only the ignored padding positions differ
    (they now also see earlier padding). tests/test_model_speed.py checks both claims.
    """
    if attention_mask is None or bool(attention_mask.all()):
        positions = torch.arange(past, past + T, device=device).expand(B, T)
        if past == 0 or T == 1:
            return positions, None  # plain causal attention (SDPA's is_causal), or one query seeing all
        attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    if past == 0 and T > 1 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return positions, None  # right-padded (1...1 0...0 per row): plain causal is exact at real tokens
    query_index = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    key_index = torch.arange(past + T, device=device)[None, :]  # (1, past + T)
    causal = key_index <= query_index  # (T, past + T)
    mask = causal & (attention_mask.bool()[:, None, :] | (key_index == query_index))  # (B, T, past + T)
    return positions, mask[:, None]


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def hf_name(name: str) -> str:
    """Our parameter name -> the tensor name in an HF checkpoint (ours mirror HF's, minus 'model.')."""
    return name if name.startswith("lm_head") else "model." + name


def read_config(directory: Path) -> LlamaConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: pass a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object of model settings; "
                              f"pass a Hugging Face checkpoint directory")
    check_config_values(raw, path)
    try:
        return LlamaConfig.from_hf(raw)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the required key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} has a malformed value ({e})") from None


def check_config_values(raw: dict, path) -> None:
    """Refuse sizes that are not positive integers (a string head count, zero heads, ...) in a config.json."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    for key in required + optional:
        value = raw.get(key)
        if value is None and key in optional:
            continue
        if key not in raw:
            raise CheckpointError(f"{path} lacks the required key '{key}'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive whole number, not {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw.get(key)
        if key in raw and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise CheckpointError(f"{path}: {key} must be a positive number, not {value!r}")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise CheckpointError(f"{path}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")


def checkpoint_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards named in model.safetensors.index.json."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a shard index with a weight_map ({e!r}); re-download it") from None
        files = [directory / s for s in shards]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        hint = " (PyTorch .bin checkpoints are not read: convert them to safetensors)" \
            if any(directory.glob("*.bin")) else ""
        raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json{hint}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {directory}")
    return files


def read_safetensors(file: Path):
    """Yield (name, tensor) from one safetensors file, one tensor at a time."""
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
