"""The one place that turns a model name into a local directory.

A name is either a local directory (used as it is) or a Hugging Face hub repo id such as
"meta-llama/Llama-2-7b-hf" (downloaded once with huggingface_hub.snapshot_download, only the files
this project reads, then served from the hub cache). Every failure becomes one message saying what
to do.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from model import LofitError

# What a checkpoint directory needs, all at the repo's top level (huggingface_hub's patterns are
# fnmatch patterns, where * also matches "/"; IGNORED_FILES drops everything in a subfolder).
CONFIG_AND_TOKENIZER_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# Only the weights model.py reads: one file, or shards named model-00001-of-00002.safetensors plus
# their index. Not consolidated.safetensors (Mistral's second copy) nor adapter_model.safetensors.
WEIGHT_FILES = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
MODEL_FILES = CONFIG_AND_TOKENIZER_FILES + WEIGHT_FILES
IGNORED_FILES = ["*/*"]

LOGIN = "set HF_TOKEN or run `hf auth login`"


class HubError(LofitError, RuntimeError):
    """A model or file could not be found or fetched; the message says what to do."""


def looks_like_repo_id(name: str) -> bool:
    """True for a valid hub repo id of the form 'org/name' (huggingface_hub's own rules)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def looks_like_local_path(name: str) -> bool:
    """True when `name` reads as a path on this machine: ./x, ../x, /x, ~/x, or its parent folder exists."""
    if name.startswith(("./", "../", "/", "~")):
        return True
    parent = Path(name).expanduser().parent
    return parent != Path(".") and parent.is_dir()


def resolve_model_dir(name: str | os.PathLike, token: str | None = None, need_weights: bool = True) -> Path:
    """Return a local directory holding the checkpoint `name`.

    Args:
        name: a local checkpoint directory, or a Hugging Face hub repo id such as "org/name".
        token: hub token for gated or private repos (default: the HF_TOKEN environment variable).
        need_weights: download the safetensors weights too and insist that a hub repo has them;
            pass False when only config and tokenizer files are read (a tokenizer-only repo).

    Returns:
        The directory (a local one as given, or the snapshot folder in the hub cache).

    Raises:
        HubError: no such directory and no such repo, the download failed, or the repo has no
            safetensors weights.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(name)
    if not looks_like_repo_id(name):
        if looks_like_local_path(name):
            raise HubError(f"no such directory {name}; check the path to the checkpoint directory")
        raise HubError(f"no such directory {name}, and {name} is not a Hugging Face repo id either; pass an "
                       f"existing checkpoint directory or a repo id such as meta-llama/Llama-2-7b-hf")
    patterns = MODEL_FILES if need_weights else CONFIG_AND_TOKENIZER_FILES
    directory = Path(_snapshot(name, token, patterns, looks_like_local_path(name)))
    if need_weights and not any((directory / f).is_file() for f in ("model.safetensors",
                                                                    "model.safetensors.index.json")):
        raise HubError(f"{name} ships no safetensors weights (no model.safetensors or model.safetensors.index.json); "
                       f"this project reads only safetensors, never pickled .bin files: convert the checkpoint "
                       f"with transformers' save_pretrained(dir, safe_serialization=True) and pass that directory, "
                       f"or pick a repo or revision that has safetensors")
    return directory


def _cause(error: BaseException) -> str:
    """'Type: message' of an exception, on one line and not too long."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _snapshot(repo_id: str, token: str | None, patterns: list[str], local_looking: bool) -> str:
    """snapshot_download `patterns` of `repo_id`, turning every failure into a HubError."""
    token = token or os.environ.get("HF_TOKEN")
    # Read at call time so a test can stand in for the download.
    download = huggingface_hub.snapshot_download
    missing = f"no such directory {repo_id}, and " if local_looking else ""
    try:
        return download(repo_id, allow_patterns=patterns, ignore_patterns=IGNORED_FILES, token=token)
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its license on huggingface.co, then {LOGIN}") from None
    except RepositoryNotFoundError:
        if local_looking:
            raise HubError(f"{missing}the Hugging Face Hub has no repo of that name either; check the path") from None
        hint = "" if token else f"; if it is private or gated, {LOGIN}"
        raise HubError(f"{repo_id} is neither a local directory nor a repo on the Hugging Face Hub{hint}") from None
    except DisabledRepoError:
        raise HubError(f"{repo_id} is disabled on the Hugging Face Hub (no one can download it); "
                       f"use another repo or a local checkpoint directory") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"the Hugging Face Hub refused your token for {repo_id} (401: invalid or expired); "
                           f"{LOGIN} with a valid token, or unset HF_TOKEN for public repos") from None
        reason = e.server_message or (e.response.reason_phrase if e.response is not None else "") or _cause(e)
        raise HubError(f"could not download {repo_id}: the Hugging Face Hub answered HTTP {status} "
                       f"({' '.join(reason.split())}); try again later, or pass a local checkpoint directory") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"{missing}could not reach the Hugging Face Hub (offline, or the Hub failed) and {repo_id} "
                       f"is not in the local hub cache ({_cause(e)}); retry where the Hub is reachable, "
                       f"or pass a local checkpoint directory") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubError(f"could not store {repo_id} in the hub cache: {e.strerror}; free disk space or point "
                           f"HF_HOME at a bigger disk") from None
        raise HubError(f"could not download {repo_id} ({_cause(e)}); check your network, proxy and disk, "
                       f"then retry, or pass a local checkpoint directory") from None
    except Exception as e:  # network libraries' own errors (proxy, timeout, ...) and anything unforeseen
        raise HubError(f"could not download {repo_id} ({_cause(e)}); check your network and proxy "
                       f"(HTTPS_PROXY), then retry, or pass a local checkpoint directory") from None
