"""llama.cpp's GGUF files as plain data: an HF-style config dict, dequantized weights under HF names, a tokenizer.

A GGUF file holds the config as key/value metadata, the weights under llama.cpp's names (often
quantized), and the tokenizer's vocabulary and merges. Three things differ from an HF checkpoint and
are undone here:

1. Names: blk.N.attn_q.weight is model.layers.N.self_attn.q_proj.weight, and so on (TENSOR_NAMES).
2. q/k rows: llama.cpp's converter reorders each head's rows from HF's rotate_half layout to the
   interleaved pairs its RoPE kernel rotates; `unpermute_rows` restores HF's order.
3. Quantized blocks (Q4_1, Q8_0, ...) are dequantized by the `gguf` package to fp32, then cast.

Only what this code runs exactly is read: architecture "llama", RoPE over the whole head, default or
linear rope scaling, and byte-level BPE ("gpt2") tokenizers with a pre-tokenizer named in
PRE_TOKENIZERS. Anything else is refused with a GGUFError saying why. The `gguf` package is imported
only here, only for .gguf files (pip install gguf). This module knows nothing of the model or the
tokenizer classes: machinery/checkpoints.py builds the model from what it returns, tokenizer.py the
tokenizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

GGUF_SUFFIX = ".gguf"

# llama.cpp tensor name -> HF name; {i} is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"blk.{{i}}.attn_{g}.{kind}": f"model.layers.{{i}}.self_attn.{h}_proj.{kind}"
       for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")},
    **{f"blk.{{i}}.ffn_{g}.weight": f"model.layers.{{i}}.mlp.{g}_proj.weight" for g in ("gate", "up", "down")},
}
_NAME_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h)
                  for g, h in TENSOR_NAMES.items()]

# tokenizer.ggml.pre -> how text is split before BPE, as in each model's own tokenizer.json.
#   "smollm": digits one by one (every \p{N} character alone), then GPT-2's byte-level regex.
#   "gpt-2": GPT-2's byte-level regex.
PRE_TOKENIZERS = ("smollm", "gpt-2")


class GGUFError(ValueError):
    """A GGUF file this code cannot read exactly; the message says why and what to do. The loaders
    (machinery/checkpoints.py, tokenizer.py) report it as their own CheckpointError / TokenizerError."""


@dataclass
class GGUFTokenizer:
    """A GGUF file's tokenizer as plain data: the `tokenizers` backend and its special token ids."""
    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int


def is_gguf(name) -> bool:
    """Whether a model name is a GGUF file (by its suffix)."""
    return str(name).lower().endswith(GGUF_SUFFIX)


def open_gguf(path):
    """A gguf.GGUFReader over `path` (memory-mapped), or GGUFError saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"no such GGUF file {path}; check the path")
    try:
        from gguf import GGUFReader  # optional: only GGUF files need it
    except ImportError:
        raise GGUFError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file, unknown version
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _whole(reader, key: str, default=None, *, minimum: int = 1, label: str = "the GGUF file"):
    """An integer metadata value (at least `minimum`), checked as config.json's sizes are; None if absent."""
    value = _meta(reader, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number of at least {minimum}"
        raise GGUFError(f"{label}: {key} must be {what}, not {value!r}; the file's metadata is damaged")
    return value


def _positive(reader, key: str, default=None, *, label: str = "the GGUF file"):
    """A positive, finite real metadata value; None if absent."""
    value = _meta(reader, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise GGUFError(f"{label}: {key} must be a positive number, not {value!r}; the file's metadata is damaged")
    return float(value)


def _token_id(reader, key: str, vocab_size: int, label: str = "the GGUF file"):
    """A token id inside the vocabulary; None if absent."""
    value = _whole(reader, key, minimum=0, label=label)
    if value is not None and value >= vocab_size:
        raise GGUFError(f"{label}: {key} is {value}, past the vocabulary of {vocab_size} tokens; the file's "
                        f"metadata is damaged")
    return value


def read_gguf_config(reader) -> dict:
    """The config.json dict (HF spelling) a GGUF file's metadata describes (GGUFError for what this code
    cannot run)."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (only 'llama'); use the model's "
                        f"Hugging Face checkpoint instead")
    a = f"{arch}."
    required = [a + k for k in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length")]
    if any(_meta(reader, key) is None for key in required):
        raise GGUFError("the GGUF file lacks llama.embedding_length, attention.head_count, block_count or "
                        "feed_forward_length; it is not a complete llama model")
    hidden, heads, n_layers, inter = (_whole(reader, key) for key in required)
    head_dim = _whole(reader, a + "attention.key_length", hidden // heads)
    rope_dim = _whole(reader, a + "rope.dimension_count", head_dim)
    if rope_dim != head_dim or _whole(reader, a + "attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"RoPE over {rope_dim} of {head_dim} head dimensions (or a different value size) "
                        f"is not supported")
    scaling = _meta(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"rope scaling {scaling!r} is not supported (only none and linear)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError("this GGUF file carries per-frequency rope factors (rope_freqs.weight, Llama-3.1 style), "
                        "which this loader does not read; use the model's Hugging Face checkpoint")
    tokens = _meta(reader, "tokenizer.ggml.tokens") or []
    vocab = _whole(reader, a + "vocab_size", len(tokens) or None)
    if vocab is None:
        raise GGUFError("the GGUF file has neither llama.vocab_size nor a tokenizer vocabulary; it is not a "
                        "complete llama model")
    if scaling == "linear" and _meta(reader, a + "rope.scaling.factor") is None:
        raise GGUFError("the GGUF file names linear rope scaling without llama.rope.scaling.factor")
    names = {t.name for t in reader.tensors}
    return {
        "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": n_layers,
        "num_attention_heads": heads, "num_key_value_heads": _whole(reader, a + "attention.head_count_kv", heads),
        "head_dim": head_dim, "rms_norm_eps": _positive(reader, a + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _positive(reader, a + "rope.freq_base", 10000.0),
        "rope_scaling": {"rope_type": "linear", "factor": _positive(reader, a + "rope.scaling.factor")}
        if scaling == "linear" else None,
        "max_position_embeddings": _whole(reader, a + "context_length", 4096),
        "attention_bias": "blk.0.attn_q.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _token_id(reader, "tokenizer.ggml.bos_token_id", vocab),
        "eos_token_id": _token_id(reader, "tokenizer.ggml.eos_token_id", vocab),
    }


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it has no counterpart here."""
    for pattern, hf in _NAME_PATTERNS:
        if match := pattern.match(gguf_name):
            return hf.replace("{i}", match.group(1)) if match.groups() else hf
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair, 2) -> (2, pair), i.e. back to rotate_half.

    llama.cpp's converter maps HF rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] of each head (d = head_dim)
    to [x_0, y_0, x_1, y_1, ...]; this is its inverse. w: (n_heads * head_dim, in) or a bias (n_heads * head_dim,).
    """
    pair = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, pair, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(reader, n_heads: int, n_kv_heads: int):
    """Yield (HF name, fp32 tensor) for every tensor, dequantized, with q/k rows in HF's order.

    A tensor with no HF counterpart is yielded under its GGUF name, for the loader to report.
    """
    from gguf import dequantize  # optional: only GGUF files need it
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        try:
            array = dequantize(t.data, t.tensor_type)  # F32 data comes back as it is
        except NotImplementedError:
            raise GGUFError(f"{t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                            f"dequantize; use a file with another quantization") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving dimension first
        tensor = torch.from_numpy(array.copy()).float().reshape(shape)
        if name is not None and ".self_attn.q_proj." in name:
            tensor = unpermute_rows(tensor, n_heads)
        elif name is not None and ".self_attn.k_proj." in name:
            tensor = unpermute_rows(tensor, n_kv_heads)
        yield (name or t.name), tensor


def gguf_tokenizer(reader, label: str) -> GGUFTokenizer:
    """The file's byte-level BPE tokenizer, built as the model's own tokenizer.json builds it."""
    kind, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"{label}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, "
                             f"'gpt2'); use the model's Hugging Face tokenizer files")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{label}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
                             f"{', '.join(PRE_TOKENIZERS)}); use the model's tokenizer.json")
    tokens, types = _meta(reader, "tokenizer.ggml.tokens"), _meta(reader, "tokenizer.ggml.token_type") or []
    merges = _meta(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise GGUFError(f"{label}: the GGUF file has no tokenizer vocabulary or merges")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{label}: tokenizer.ggml.tokens is not a list of strings; the file's metadata is damaged")
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise GGUFError(f"{label}: tokenizer.ggml.token_type is not a list of numbers; the file's metadata is damaged")
    pairs = [m.split(" ") if isinstance(m, str) else None for m in (merges if isinstance(merges, list) else [None])]
    bad = next((i for i, pair in enumerate(pairs) if pair is None or len(pair) != 2 or not all(pair)), None)
    if bad is not None:
        shown = repr(merges[bad]) if isinstance(merges, list) else repr(merges)[:40]
        raise GGUFError(f"{label}: tokenizer.ggml.merges entry {bad} is {shown}, not two tokens separated by "
                        f"one space; the file's metadata is damaged")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unknown = next((m for m, pair in zip(merges, pairs) if not all(t in vocab for t in pair)), None)
    if unknown is not None:
        raise GGUFError(f"{label}: tokenizer.ggml.merges entry {unknown!r} joins tokens that are not in the "
                        f"vocabulary; the file's metadata is damaged")
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(pair) for pair in pairs], fuse_unk=False, byte_fallback=False)
    except Exception as e:  # the tokenizers library's own refusal
        raise GGUFError(f"{label}: the GGUF tokenizer cannot be built ({e}); the file's metadata is damaged") \
            from None
    backend = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.pre_tokenizer = byte_level if pre == "gpt-2" else \
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = control (e.g. <|im_end|>): matched whole in text and skipped when decoding.
    backend.add_special_tokens([tokenizers.AddedToken(tok, special=True, normalized=False)
                                for tok, kind in zip(tokens, types) if kind == 3])
    eos = _token_id(reader, "tokenizer.ggml.eos_token_id", len(tokens), label)
    if eos is None:
        raise GGUFError(f"{label}: the GGUF file names no EOS token (tokenizer.ggml.eos_token_id)")
    bos = _token_id(reader, "tokenizer.ggml.bos_token_id", len(tokens), label) \
        if _meta(reader, "tokenizer.ggml.add_bos_token", False) else None
    pad = _token_id(reader, "tokenizer.ggml.padding_token_id", len(tokens), label)
    return GGUFTokenizer(backend, bos, eos, eos if pad is None else pad)
