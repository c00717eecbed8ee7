"""Export a LoFiT adapter for other tools: a merged Hugging Face checkpoint, or a peft adapter.

    python export.py --adapter runs/x/adapter.safetensors --model BASE --format merged --out DIR
    python export.py --adapter runs/x/adapter.safetensors --model BASE --format peft --out DIR [--overwrite]

--format merged: the whole checkpoint with the offsets folded into o_proj (adapter.export_merged);
transformers, llama.cpp's converter or anything else that reads HF checkpoints loads it.
--format peft: a small peft adapter directory (adapter_config.json + adapter_model.safetensors)
that peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), DIR) loads. LoFiT
edits head h's slice z_h of o_proj's input as (1 + A_h) * z_h + v_h; peft has one adapter type
for each half:
- bias v only (a stage-2 adapter) -> BEFT on o_proj: W_o (z + v) + b = W_o z + b + W_o v, so every
  layer's o_proj gets the bias beft_bias = W_o v (zeros in a layer without a selected head);
- scale A only (a stage-1 adapter) -> IA3 on o_proj's input (a "feedforward" module in IA3's
  words): ia3_l = 1 + A, the per-head scales laid out as o_proj's input features.
An adapter with both A and v non-zero, or of another intervention form, is refused: peft would
need two adapter types on one module, and PeftMixedModel (its only way to stack types) accepts
neither IA3 nor BEFT. Use --format merged for those.

The output directory is built beside --out and renamed into place; an existing --out is kept
until the new one is complete, and replaced only with --overwrite. Besides the format's own files
it holds lofit_export.json: where it came from (the adapter file and its sha256, the base model
and, for a .gguf file, its sha256). peft and transformers are not needed to export.
Errors: one `error: ...` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter import TOKENIZER_FILES, AdapterError, export_merged, load_adapter, read_adapter
from lofit import attentions
from machinery.checkpoints import load_model
from machinery.flags import UsageError, import_intervention_file, report_error
from model import Llama, LofitError, hf_name
from storage.atomic import json_text, ordinary_mode, write_error
from storage.gguf_file import is_gguf
from storage.hub import resolve_model_dir

FORMATS = ("merged", "peft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROVENANCE = "lofit_export.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a LoFiT adapter file (train.py's adapter.safetensors)")
    p.add_argument("--model", required=True, help="the base model: checkpoint directory, hub id or .gguf file")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="merged: a full HF checkpoint with the offsets folded in; peft: a peft adapter "
                        "directory (BEFT for a bias-only adapter, IA3 for a scale-only one)")
    p.add_argument("--out", required=True, help="the output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load the base in (a merged export is written in it); default float32")
    p.add_argument("--intervention", metavar="FILE.py",
                   help="--format merged: the .py file that registers the adapter's form, when it is not lofit")
    return p.parse_args(argv)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or an existing directory without --overwrite (before any work)."""
    if not str(out).strip():
        raise UsageError("--out is empty; pass an output directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite to replace it, or choose another directory")


def peft_type(path, tensors: dict, meta: dict) -> str:
    """"BEFT" (bias v only) or "IA3" (scale A only) for an adapter file, or AdapterError saying why neither.

    An adapter whose offsets are all zero is a BEFT adapter of zero biases (the base model).
    """
    form = meta["intervention"].get("name", "lofit")
    if form != "lofit":
        raise AdapterError(f"{path} holds the {form!r} intervention; a peft adapter can hold only LoFiT's "
                           f"bias (as BEFT) or scale (as IA3): export it with --format merged")
    has_a = "A" in tensors and bool(tensors["A"].any())
    has_v = "v" in tensors and bool(tensors["v"].any())
    if has_a and has_v:
        raise AdapterError(f"{path} has both scale (A) and bias (v) offsets; peft cannot hold both in one adapter "
                           f"(IA3 holds the scale, BEFT the bias, and PeftMixedModel accepts neither): "
                           f"export it with --format merged")
    return "IA3" if has_a else "BEFT"


def peft_tensors(model: Llama, kind: str) -> dict[str, torch.Tensor]:
    """The adapter_model.safetensors state of every layer's o_proj, under peft's saved names (fp32).

    BEFT: `...o_proj.beft_bias` (1, D) = W_o v; IA3: `...o_proj.ia3_l` (1, H*hd) = 1 + A.
    """
    state = {}
    for i, attn in enumerate(attentions(model)):
        key = "base_model.model." + hf_name(f"layers.{i}.self_attn.o_proj.")
        if kind == "BEFT":
            v = attn.lofit_v.detach().double().reshape(-1)  # (H*hd,): heads concatenated, as o_proj's input
            state[key + "beft_bias"] = (attn.o_proj.weight.detach().double() @ v).float()[None]  # (1, D)
        else:
            state[key + "ia3_l"] = (1 + attn.lofit_A.detach().float().reshape(1, -1))  # (1, H*hd)
    return {k: t.cpu().contiguous() for k, t in state.items()}


def peft_config(kind: str, base: str) -> dict:
    """adapter_config.json of a BEFT or IA3 adapter on o_proj (peft >= 0.20 fills in the rest)."""
    config = {"peft_type": kind, "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "revision": None, "inference_mode": True, "target_modules": ["o_proj"], "modules_to_save": None}
    if kind == "IA3":  # IA3 scales a "feedforward" module's input: o_proj's input is the heads' outputs
        config.update(feedforward_modules=["o_proj"], fan_in_fan_out=False, init_ia3_weights=True)
    else:
        config.update(init_weights=True)
    return config


def sha256_of(path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def base_record(model: str) -> dict:
    """How the export names its base: the hub id or directory as given; for a .gguf file its file name
    (a path would not travel) and its sha256."""
    if is_gguf(model):
        return {"base_model_name_or_path": Path(model).name, "base_model_sha256": sha256_of(model)}
    return {"base_model_name_or_path": str(model)}


def tokenizer_source(model: str):
    """What export_merged copies the tokenizer from: the .gguf file, or the checkpoint directory
    when it holds tokenizer files; None when there are none (a note says so)."""
    if is_gguf(model):
        return model
    directory = resolve_model_dir(model, need_weights=False)
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return directory
    print(f"note: {model} has no tokenizer files; the export holds none", file=sys.stderr)
    return None


def write_export(args, staging: Path) -> Path:
    """Build the export in staging/export and return that directory."""
    path = args.adapter
    tensors, meta = read_adapter(path)  # a bad file is refused before the base is loaded
    kind = peft_type(path, tensors, meta) if args.format == "peft" else None
    if args.intervention:
        import_intervention_file(args.intervention)
    model = load_model(args.model, dtype=DTYPES[args.dtype])
    load_adapter(path, model)
    base = base_record(args.model)
    built = staging / "export"
    if args.format == "merged":
        export_merged(model, built, tokenizer_dir=tokenizer_source(args.model))
    else:
        built.mkdir()
        save_file(peft_tensors(model, kind), str(built / PEFT_FILES[1]), metadata={"format": "pt"})
        config = peft_config(kind, base["base_model_name_or_path"])
        (built / PEFT_FILES[0]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    provenance = {"format": args.format, "peft_type": kind, "adapter": str(path),
                  "adapter_sha256": sha256_of(path), **base, "stage": meta["stage"], "task": meta["task"],
                  "heads": meta["heads"], "intervention": meta["intervention"]}
    (built / PROVENANCE).write_text(json_text(provenance, name=PROVENANCE) + "\n")
    for f in built.iterdir():
        os.chmod(f, ordinary_mode())
    os.chmod(built, ordinary_mode(directory=True))
    return built


def put_in_place(built: Path, out: Path) -> None:
    """Rename `built` to `out`; an existing `out` is moved aside first and deleted only once `built` is in."""
    if not out.exists():
        os.replace(built, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(old, out)  # the old export stays as it was
        raise
    shutil.rmtree(old)


def export(args) -> Path:
    """Check the flags, build the export beside --out, and rename it into place; return --out."""
    out = Path(args.out)
    check_out(out, args.overwrite)
    if args.intervention and not args.intervention.endswith(".py"):
        raise UsageError(f"--intervention {args.intervention}: pass the .py file that registers the form")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        built = write_export(args, staging)
        put_in_place(built, out)
    except OSError as e:
        if isinstance(e, LofitError):
            raise
        target = str(e.filename or "")
        if target and not target.startswith((str(staging), str(out))):
            raise UsageError(f"cannot read {target}: {e.strerror or e}") from None
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = export(args)
    except LofitError as err:
        return report_error(err)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
