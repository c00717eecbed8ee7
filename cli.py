"""Command-line plumbing shared by train.py, eval.py and iti.py.

- UsageError: bad flags or files; each script's main() prints it with report_error and exits 2.
- resolve_device / resolve_dtype: what --device auto and --dtype auto mean (CUDA and bfloat16 when a
  GPU is visible, else the CPU and float32), and refusing --device cuda where there is no GPU.
- existing_outputs: which of a script's output files an --out directory already holds.
- add_tokenizer_flag: --tokenizer, the same in every script.
- add_intervention_flags / resolve_intervention: --intervention NAME or FILE.py (a file that
  registers a new form, e.g. examples/low_rank.py) and its --intervention-arg KEY=VALUE settings.
"""
from __future__ import annotations

import importlib.util
import json
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


def add_intervention_flags(parser, with_settings: bool = True) -> None:
    """Add --intervention (and, for training, --intervention-arg KEY=VALUE, repeatable)."""
    parser.add_argument("--intervention", default="lofit", metavar="NAME|FILE.py",
                        help="stage 2's form: lofit (the paper's bias v; the default), another registered name, "
                             "or a .py file that registers one (e.g. examples/low_rank.py)")
    if with_settings:
        parser.add_argument("--intervention-arg", action="append", default=[], metavar="KEY=VALUE",
                            help="a setting of the form (value read as JSON, else text), e.g. rank=4")


def import_intervention_file(path: str) -> list[str]:
    """Import a .py file that registers forms with @lofit.register; return the names it registered."""
    from lofit import INTERVENTIONS
    file = Path(path).resolve()
    if not file.is_file():
        raise UsageError(f"--intervention {path}: no such file")
    module_name = f"intervention_{file.stem}_{abs(hash(str(file)))}"
    if module_name in sys.modules:
        return sys.modules[module_name].registered_names
    before = dict(INTERVENTIONS)
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    module.registered_names = [n for n, cls in INTERVENTIONS.items() if before.get(n) is not cls]
    if not module.registered_names:
        raise UsageError(f"--intervention {path} registers no form: decorate its class with @lofit.register")
    return module.registered_names


def resolve_intervention(spec: str, settings=()):
    """The form --intervention names (a registered name, or the one form a .py file registers).

    Raises:
        UsageError: an unknown name, a file that registers no form or several, or bad settings.
    """
    from lofit import make_intervention
    name = spec
    if spec.endswith(".py"):
        names = import_intervention_file(spec)
        if len(names) != 1:
            raise UsageError(f"--intervention {spec} registers {len(names)} forms ({', '.join(names)}); "
                             f"import it and pass one of those names")
        name = names[0]
    values = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--intervention-arg {item!r}: write KEY=VALUE, e.g. rank=4")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text
    try:
        return make_intervention(name, **values)
    except ValueError as e:
        raise UsageError(f"--intervention: {e}") from None
