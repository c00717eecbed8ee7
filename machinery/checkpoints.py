"""A model by name: a checkpoint directory, a Hugging Face hub repo id, or a llama.cpp .gguf file.

model.py reads one format, a local Hugging Face directory (`Llama.from_pretrained`). The commands
take any of the three names; this module turns each into what model.py reads: a hub id into its
downloaded directory (storage/hub.py), a GGUF file into a config and HF-named tensors
(storage/gguf_file.py), both handed to `Llama.from_tensors`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import CheckpointError, Llama, LlamaConfig, check_config_values, read_config
from storage import gguf_file
from storage.hub import resolve_model_dir


def load_model(name, dtype: torch.dtype = torch.float32, device="cpu", token: str | None = None,
               progress: bool = False) -> Llama:
    """The model called `name` (directory, hub id or .gguf file), strictly loaded into `dtype` on `device`."""
    if gguf_file.is_gguf(name):
        config, reader = _gguf_config(name)
        tensors = ((Path(name).name, key, t) for key, t in _gguf_tensors(reader, config))
        model = Llama.from_tensors(config, tensors, where=Path(name), described_by="its GGUF metadata",
                                   dtype=dtype, device=device, progress=progress)
    else:
        model = Llama.from_pretrained(resolve_model_dir(name, token), dtype=dtype, device=device, progress=progress)
    model.source = str(name)  # as the user named it: adapters record it as their base model
    return model


def read_model_config(name, token: str | None = None, need_weights: bool = True) -> LlamaConfig:
    """The config of a checkpoint directory, hub repo id or .gguf file, without reading its weights.

    need_weights False: a hub repo's config and tokenizer files only are downloaded (train.py --plan).
    """
    if gguf_file.is_gguf(name):
        return _gguf_config(name)[0]
    return read_config(resolve_model_dir(name, token, need_weights=need_weights))


def _gguf_config(path):
    """(LlamaConfig, open reader) of a GGUF file; its metadata checked as a config.json would be."""
    reader = _gguf_errors(gguf_file.open_gguf, path)
    raw = _gguf_errors(gguf_file.read_gguf_config, reader)
    check_config_values(raw, Path(path).name)
    return LlamaConfig.from_hf(raw), reader


def _gguf_tensors(reader, config: LlamaConfig):
    """The file's tensors one at a time (a 7B model is never held twice), as (HF name, fp32 tensor)."""
    try:
        yield from gguf_file.read_gguf_tensors(reader, config.n_heads, config.n_kv_heads)
    except gguf_file.GGUFError as e:
        raise CheckpointError(str(e)) from None


def _gguf_errors(read, *args):
    """Call a gguf_file reader; its GGUFError becomes a CheckpointError (one `error:` line)."""
    try:
        return read(*args)
    except gguf_file.GGUFError as e:
        raise CheckpointError(str(e)) from None
