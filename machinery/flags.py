"""Command-line plumbing shared by train.py, eval.py and iti.py: one vocabulary of flags.

The same flag has the same name and meaning in every script (add_common_flags):
    --model, --data-dir, --tokenizer, --dtype, --device   what to load, and where
    --limit N (alias --limit-eval)                         evaluate on the first N test examples
    --eval-batch-size N                                    sequences per forward pass without gradients
                                                           (evaluation, DPO reference, ITI activations)
    --intervention                                         the form of stage 2's edit (lofit.py)
--batch-size is train.py's only: examples per optimiser step, over all processes. --out is the
output directory of train.py and iti.py, and eval.py's results file.

- UsageError: bad flags or files (a LofitError, as are the other modules' errors); each script's
  main() catches LofitError, prints it with report_error and exits 2.
- check_flags: the one validator of numeric flags, whichever script has them.
- check_out_dir / check_out_file: the --out checks from the flags alone (what an --out directory
  holds is checked under its lock by rundir.claim).
- resolve_device / resolve_dtype: what --device auto and --dtype auto mean (CUDA when a GPU is
  visible, else the CPU; float32 everywhere), and refusing --device cuda where there is no GPU.
- existing_outputs: which of a script's output files an --out directory already holds.
- add_intervention_flags / resolve_intervention: --intervention NAME or FILE.py (a file that
  registers a new form, e.g. examples/low_rank.py) and its --intervention-arg KEY=VALUE settings.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import sys
from dataclasses import field, fields
from pathlib import Path

import torch

from lofit import INTERVENTIONS, make_intervention, setting_types
from model import LofitError
from tokenizer import BACKENDS

USAGE_EXIT_STATUS = 2  # the status argparse also uses for bad flags


class UsageError(LofitError, ValueError):
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


THREADS_HELP = ("CPU threads for torch's operators (default: 1 for a model under 10M parameters, where more "
                "threads measured slower on a shared 2-core machine (docs/speed.md); else torch's own default, "
                "OMP_NUM_THREADS where set)")
SMALL_MODEL = 10_000_000  # parameters, roughly: below it one thread is the default (docs/speed.md)


def set_threads(requested: int | None, config) -> int:
    """torch.set_num_threads: --threads where given; else 1 for a small model (per-op overheads dominate, and a
    second thread only waits for a busy core), unless OMP_NUM_THREADS says otherwise; return the count in use."""
    parameters = config.n_layers * 12 * config.hidden_size ** 2 + config.vocab_size * config.hidden_size
    if requested is None and parameters < SMALL_MODEL and "OMP_NUM_THREADS" not in os.environ:
        requested = 1
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def resolve_dtype(requested: str, device: str) -> str:
    """The name of the torch dtype to load weights in: "auto" is float32 on every device.

    float32 is the paper's precision. In bfloat16, 1 + 1e-3 rounds to 1, so most of stage 1's
    (1 + A) at the paper's init would be exactly 1 and batching alone would move DPO log-probs;
    bfloat16 is there to halve the base's memory (LoFiT's parameters and edit stay float32).

    Args:
        requested: The --dtype flag: "auto" or a torch dtype name ("float32", "bfloat16", ...).
        device: The device the model runs on, as resolve_device returns it (the choice does not
            depend on it).
    """
    return "float32" if requested == "auto" else requested


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


DTYPES = ("auto", "float32", "bfloat16", "float16")


# The help of each flag every script has, written once (add_common_flags; train.py's TrainConfig).
MODEL_HELP = "local checkpoint directory, hub id (a merged export too) or .gguf file"
DATA_DIR_HELP = ("directory laid out like ../shared/datasets (default: $LOFIT_DATA_DIR, else data/splits/ for "
                 "LoFiT's tasks, the download cache for SIQA/ARC/BoolQ)")
TOKENIZER_HELP = ("auto: SentencePiece on tokenizer.model where it reads it (Meta's reference), else "
                  "tokenizer.json; tokenizer.json: read tokenizer.json with the tokenizers library, as the fast "
                  "tokenizer the original LoFiT pipeline used (for Llama-2, the same ids as SentencePiece on every "
                  "TruthfulQA, MQuAKE and CLUTRR record)")
DTYPE_HELP = ("weights' dtype; auto: float32, as the paper (bfloat16 halves the base's memory; LoFiT's "
              "parameters and edit stay float32)")
DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."
LIMIT_HELP = "evaluate on the first N test examples only"
EVAL_BATCH_HELP = "sequences per forward pass without gradients (evaluation, reference, activations)"
INTERVENTION_HELP = ("stage 2's form: lofit (the paper's bias v; the default), another registered name, or a .py "
                     "file that registers one (e.g. examples/low_rank.py)")
INTERVENTION_ARG_HELP = "a setting of the form (value read as JSON, else text), e.g. rank=4"


def add_common_flags(parser, *, model_default: str | None = "meta-llama/Llama-2-7b-hf") -> None:
    """The flags every script has, with one name and one meaning each (see the module docstring)."""
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help=MODEL_HELP + (f"; default {model_default}" if model_default else ""))
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("--tokenizer", choices=BACKENDS, default="auto", help=TOKENIZER_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--limit", "--limit-eval", type=int, dest="limit", help=LIMIT_HELP)
    parser.add_argument("--eval-batch-size", type=int, default=8, help=EVAL_BATCH_HELP)


def flag(default=None, help: str = "", **argparse_options):
    """A dataclass field that is also a command-line flag: its default, one line of help, and
    argparse's options (choices, metavar, required, aliases=[...], group=NAME for flags that
    exclude each other). parse_flags builds the parser from these; the flag list is written once."""
    return field(default=default, metadata={"help": help, **argparse_options})


def parse_flags(cls, argv, description: str):
    """An instance of dataclass `cls` from the command line: one --flag-name per field made with `flag`.

    A field's type decides the flag's: bool is a switch, list[str] repeats (append), int and float
    are converted; argparse reports a bad value or choice with exit status 2.
    """
    parser = argparse.ArgumentParser(description=description)
    groups = {}
    for f in fields(cls):
        options = dict(f.metadata)
        names = ["--" + f.name.replace("_", "-"), *options.pop("aliases", [])]
        group = options.pop("group", None)
        if group and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = groups[group] if group else parser
        kind = str(f.type).split(" ")[0].split("[")[0]  # "int | None" -> int, "list[str]" -> list
        if kind == "bool":
            options["action"] = "store_true"
        elif kind == "list":
            options.update(action="append", default=[])
        elif kind in ("int", "float"):
            options["type"] = {"int": int, "float": float}[kind]
        target.add_argument(*names, dest=f.name, **{"default": f.default, **options})
    return cls(**vars(parser.parse_args(argv)))


# Numeric flags and what they must be, whichever script has them (argparse dest -> rule).
POSITIVE = ("epochs", "batch_size", "micro_batch_size", "k", "lr_a", "lr_v", "beta", "init_std", "limit",
            "eval_batch_size", "stop_after", "probe_l2", "threads", "gpus", "gpu_memory")
NOT_NEGATIVE = ("l1", "train_size")


def check_flags(args) -> None:
    """The one validator: every numeric flag the script has, checked the same way; --device too.

    Raises:
        UsageError: naming the first flag with a bad value and what it must be.
    """
    def flag(dest):
        return "--" + dest.replace("_", "-")
    for dest, value in vars(args).items():  # argparse's float() accepts nan and inf
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(dest)} must be a finite number, got {value}")
    for dest in POSITIVE:
        value = getattr(args, dest, None)
        if value is not None and not value > 0:
            raise UsageError(f"{flag(dest)} must be positive, got {value}")
    for dest in NOT_NEGATIVE:
        value = getattr(args, dest, None)
        if value is not None and value < 0:
            raise UsageError(f"{flag(dest)} cannot be negative, got {value}")
    k_percent = getattr(args, "k_percent", None)
    if k_percent is not None and not 0 < k_percent <= 100:
        raise UsageError(f"--k-percent must be in (0, 100], got {k_percent}")
    resolve_device(args.device)  # refuses --device cuda where there is no GPU


def _out_kind(out) -> str:
    """'directory', 'file' or 'missing' for an --out path; UsageError where the system cannot even look
    (a name longer than the filesystem allows, a part of the path that is a file, ...)."""
    try:
        return "directory" if Path(out).is_dir() else "file" if Path(out).exists() else "missing"
    except OSError as e:
        hint = "; choose a shorter name" if e.errno == errno.ENAMETOOLONG else ""
        raise UsageError(f"--out {out} cannot be used: {e.strerror}{hint}") from None


def check_out_dir(out: str | Path, *, overwrite: bool, resume: bool = False) -> None:
    """The one check of --out (a directory of outputs) from the flags alone, before anything is loaded.

    What the directory holds (another run's outputs, an unfinished run, a busy directory) is checked
    by rundir.claim, under the directory's lock, when the run starts.

    Raises:
        UsageError: an empty --out; `out` is a file; --resume with --overwrite.
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if not str(out).strip():
        raise UsageError("--out is empty; pass an output directory (or leave --out out for the default)")
    if _out_kind(out) == "file":
        raise UsageError(f"--out {out} is a file; pass a directory")


def check_out_file(out: str | Path, *, overwrite: bool = False) -> None:
    """The --out check of a script writing one file (eval.py's results), before any work.

    Raises:
        UsageError: an empty --out; `out` is a directory or exists (without --overwrite); its
            directory is missing or not writable.
    """
    if not str(out).strip():
        raise UsageError("--out is empty; pass a file name such as results.json (or leave --out out)")
    out = Path(out)
    kind = _out_kind(out)
    if kind == "directory":
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / 'results.json'}")
    if kind == "file" and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it, or choose another name")
    parent = out.parent.resolve()
    if _out_kind(parent) != "directory":
        raise UsageError(f"output directory {out.parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {out.parent} is not writable; choose another --out")


def add_intervention_flags(parser, with_settings: bool = True) -> None:
    """Add --intervention (and, for training, --intervention-arg KEY=VALUE, repeatable)."""
    reading = "the .py file that defines the adapter's form, when it is not built in (its name and settings are " \
              "read from the adapter)"
    parser.add_argument("--intervention", default="lofit", metavar="NAME|FILE.py",
                        help=INTERVENTION_HELP if with_settings else reading)
    if with_settings:
        parser.add_argument("--intervention-arg", action="append", default=[], metavar="KEY=VALUE",
                            help=INTERVENTION_ARG_HELP)


def import_intervention_file(path: str) -> list[str]:
    """Import a .py file that registers forms with @lofit.register; return the names it registered."""
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
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the file's own error: say which file, leave nothing half-imported
        sys.modules.pop(module_name, None)
        for name in set(INTERVENTIONS) - set(before):
            del INTERVENTIONS[name]
        INTERVENTIONS.update(before)  # a file may not replace a form registered before it
        if os.environ.get("LOFIT_DEBUG", "") not in ("", "0") and not isinstance(e, SystemExit):
            raise
        raise UsageError(f"--intervention {path} failed to import ({type(e).__name__}: {e})") from None
    if replaced := [n for n, cls in before.items() if INTERVENTIONS[n] is not cls]:
        sys.modules.pop(module_name, None)
        for name in set(INTERVENTIONS) - set(before):
            del INTERVENTIONS[name]
        INTERVENTIONS.update(before)
        raise UsageError(f"--intervention {path} registers {', '.join(replaced)}, a name already taken by "
                         f"another form; give its form another name")
    module.registered_names = [n for n, cls in INTERVENTIONS.items() if before.get(n) is not cls]
    if not module.registered_names:
        raise UsageError(f"--intervention {path} registers no form: decorate its class with @lofit.register")
    return module.registered_names


def resolve_intervention(spec: str, settings=(), config=None):
    """The form --intervention names (a registered name, or the one form a .py file registers), checked
    against the model's `config` when given (the shapes of its parameters).

    Raises:
        UsageError: an unknown name, a file that registers no form or several, or bad settings.
    """
    name = spec
    if spec.endswith(".py"):
        names = import_intervention_file(spec)
        if len(names) != 1:
            raise UsageError(f"--intervention {spec} registers {len(names)} forms ({', '.join(names)}); "
                             f"import it and pass one of those names")
        name = names[0]
    types = setting_types(INTERVENTIONS[name]) if name in INTERVENTIONS else {}
    values = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--intervention-arg {item!r}: write KEY=VALUE, e.g. rank=4")
        if types.get(key) is str:
            values[key] = text  # a str setting is the text as written
            continue
        try:
            values[key] = json.loads(text)  # 4, 0.5, true; anything else stays text, which the type check refuses
        except ValueError:
            values[key] = text
    try:
        form = make_intervention(name, **values)
    except ValueError as e:
        raise UsageError(f"--intervention: {e}") from None
    try:
        if config is not None:
            form.parameters(config)
            form.mlp_parameters(config)
    except ValueError as e:
        raise UsageError(f"--intervention {form.name}: {e}") from None
    return form
