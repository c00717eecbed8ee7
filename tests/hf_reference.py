"""Tiny random checkpoints built and saved by transformers itself: the independent reference.

Every family the project supports has a small config here in the shape of the real one (GQA
ratios, tied embeddings, explicit head_dim, rope scaling), so tests can compare our model with
transformers' LlamaForCausalLM on the same saved weights.
"""
from pathlib import Path

import torch

FAMILIES = {
    # Llama-2: multi-head attention, no scaling.
    "llama2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, rms_norm_eps=1e-5),
    # Llama-3.1: GQA 4:1, llama3 rope scaling x8; original context 32 so tests pass it.
    "llama3.1": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Llama-3.2 1B/3B: factor 32, tied embeddings, explicit head_dim (8 heads x 16 != hidden 64).
    "llama3.2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
                     tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # SmolLM2: tied, 9 query heads over 3 kv heads, head_dim 8.
    "smollm2": dict(hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=8, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True),
    # Biases on every projection (attention_bias, mlp_bias) and linear rope scaling.
    "biases": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-6, attention_bias=True, mlp_bias=True,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # head_dim larger than hidden / heads, MQA (one kv head).
    "wide_heads": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-5),
}


def make_checkpoint(directory: Path, family: str = "llama2", vocab_size: int = 128, seed: int = 0,
                    max_shard_size=None, dtype=torch.float32, **overrides):
    """Save a random transformers LlamaForCausalLM in HF format; return (directory, hf_model in eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      **{**FAMILIES[family], **overrides})
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # random norms and biases, so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return Path(directory), model


def load_hf(directory, dtype=torch.float32, attn="sdpa"):
    """transformers' own model loaded from a checkpoint directory, in eval mode."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn).eval()


GEMMA_FAMILIES = {
    # Gemma-7B shape: 16 heads of head_dim 256 over hidden 3072 (here 4 heads x 32 over hidden 48).
    "gemma-7b": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-6),
    # Gemma-2B shape: multi-query attention (one kv head).
    "gemma-2b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6),
}


def make_gemma_checkpoint(directory: Path, family: str = "gemma-7b", vocab_size: int = 128, seed: int = 0):
    """Save a random transformers GemmaForCausalLM (tied embeddings); return (directory, hf_model)."""
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=2, eos_token_id=1,
                      pad_token_id=0, hidden_act="gelu_pytorch_tanh", **GEMMA_FAMILIES[family])
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w): make them random so a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return Path(directory), model


def load_hf_gemma(directory, dtype=torch.float32):
    from transformers import GemmaForCausalLM
    return GemmaForCausalLM.from_pretrained(directory, dtype=dtype).eval()
