"""The one place that turns a model name into a local directory.

A name is either a local directory (used as it is) or a Hugging Face hub repo id such as
"meta-llama/Llama-2-7b-hf" (downloaded once with huggingface_hub.snapshot_download, only the files
this project reads, then served from the hub cache). Every failure becomes one message saying what
to do.
"""
from __future__ import annotations

import os
from pathlib import Path

# What a checkpoint directory needs: config, weights (single file or shards + index), tokenizer.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


class HubError(RuntimeError):
    """A model or file could not be found or fetched; the message says what to do."""


def looks_like_repo_id(name: str) -> bool:
    """'org/name' with no path separators beyond the one slash and no leading dot or slash."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_dir(name: str | os.PathLike, token: str | None = None) -> Path:
    """Return a local directory holding the checkpoint `name` (a local path or a hub repo id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(name)
    if not looks_like_repo_id(name):
        raise HubError(f"no such directory: {path}. Pass an existing checkpoint directory "
                       f"or a Hugging Face repo id such as meta-llama/Llama-2-7b-hf")
    return Path(_snapshot(name, token))


def _snapshot(repo_id: str, token: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    token = token or os.environ.get("HF_TOKEN")
    try:
        return snapshot_download(repo_id, allow_patterns=MODEL_FILES, token=token)
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its license on huggingface.co, then log in "
                       f"(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        hint = "" if token else " If it is private or gated, log in (`hf auth login`) or set HF_TOKEN."
        raise HubError(f"{repo_id} is neither a local directory nor a repo on the Hugging Face hub.{hint}") from None
    except LocalEntryNotFoundError:
        raise HubError(f"could not download {repo_id} (no network, and it is not in the local hub cache). "
                       f"Download it where there is a network, or pass a local checkpoint directory") from None
