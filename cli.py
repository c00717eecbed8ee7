"""Command-line plumbing shared by train.py, eval.py and iti.py.

- UsageError: bad flags or files; each script's main() prints it with report_error and exits 2.
- resolve_device / resolve_dtype: what --device auto and --dtype auto mean (CUDA and bfloat16 when a
  GPU is visible, else the CPU and float32), and refusing --device cuda where there is no GPU.
- existing_outputs: which of a script's output files an --out directory already holds.
- add_tokenizer_flag: --tokenizer, the same in every script.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

USAGE_EXIT_STATUS = 2  # the status argparse also uses for bad flags


class UsageError(ValueError):
    """A bad flag or a bad combination of flags and files; the message says what to do."""


def report_error(error: Exception, *, print_message: bool = True) -> int:
    """Print `error: <message>` on stderr (unless print_message is False) and return the exit status 2.

    Args:
        error: The exception whose message the user sees.
        print_message: False on processes that must stay quiet (torchrun ranks other than 0).

    Returns:
        USAGE_EXIT_STATUS, for main() to return.
    """
    if print_message:
        print(f"error: {error}", file=sys.stderr)
    return USAGE_EXIT_STATUS


def resolve_device(requested: str) -> str:
    """The device to run on: "auto" is "cuda" where PyTorch sees a GPU, else "cpu".

    Args:
        requested: The --device flag: "auto", "cpu", "cuda", "cuda:1", ...

    Returns:
        A device string for torch ("cpu", "cuda", "cuda:1", ...).

    Raises:
        UsageError: a CUDA device was asked for and PyTorch sees none.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available here; use --device cpu")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """The name of the torch dtype to load weights in: "auto" is bfloat16 on CUDA, float32 elsewhere.

    Args:
        requested: The --dtype flag: "auto" or a torch dtype name ("float32", "bfloat16", ...).
        device: The device the model runs on, as resolve_device returns it (or a torch.device's type).
    """
    if requested != "auto":
        return requested
    return "bfloat16" if device.startswith("cuda") else "float32"


def existing_outputs(out: Path, output_files) -> list[str]:
    """The names in `output_files` that already exist in the output directory `out`.

    Args:
        out: The --out directory (it need not exist yet).
        output_files: Every file name the script writes there.

    Raises:
        UsageError: `out` is a file, not a directory.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory")
    return [name for name in output_files if (out / name).exists()]


def add_tokenizer_flag(parser) -> None:
    """Add --tokenizer {auto, sentencepiece, tokenizer.json} (see tokenizer.load_tokenizer)."""
    from tokenizer import BACKENDS
    parser.add_argument("--tokenizer", choices=BACKENDS, default="auto",
                        help="auto: SentencePiece on tokenizer.model where it reads it (Meta's reference), "
                             "else tokenizer.json; tokenizer.json: the fast tokenizer the original LoFiT "
                             "pipeline used (Llama-2 splits runs of spaces differently there)")
