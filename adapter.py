"""What LoFiT training leaves behind: adapter files, and offsets merged into o_proj.

An adapter file is a small safetensors file with only the selected heads' rows of every offset:

    heads (K, 2) int64   the (layer, head) pairs, in selection order
    v     (K, head_dim)  their bias offsets (in a file of another form: only when non-zero)
    A     (K, head_dim)  their scale offsets (present when any is non-zero, e.g. after stage 1)
    <name> (K, ...)      the rows of every other `lofit_<name>` parameter: the installed form's
    mlp.<name> (L, ...)  a form's parameters at the MLP output, every layer's (e.g. examples/red.py)

and string metadata (JSON where structured): format, format_version, base_model, config (the base
model's LlamaConfig.fingerprint()), config_sha256, stage, task, hparams, heads, complete (false
when the model had non-zero offsets outside `heads`, which the file then lacks), intervention
(the form's name and hyperparameters; version 2 files only). Loading checks the file against the
model and names both when they differ. Every `lofit_*` parameter is found by name (lofit.py), so
a new form needs nothing here; an offset that is not stored per head is refused, not dropped.

Merging: o_proj is linear, so for head h's slice z_h of its input,
    W_o [(1 + A) * z + v] + b  =  (W_o diag(1 + A)) z + (b + W_o v)
i.e. the scale folds into W_o's input columns and the bias into o_proj's bias: zero overhead.
Another form folds itself in first (Intervention.merge); one that cannot is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from lofit import (
    INTERVENTIONS,
    LoFiT,
    attentions,
    check_heads,
    form_code,
    install,
    intervention_of,
    make_intervention,
    mlps,
    offset_parameters,
    reset_offsets,
)
from model import LofitError, hf_name
from tokenizer import load_tokenizer

FORMAT = "lofit-adapter"
FORMAT_VERSION = 2  # 2: the intervention field; LoFiT-only files are still written as 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class AdapterError(LofitError, ValueError):
    """An adapter file that cannot be read, or that does not fit the model; the message says why."""


def _config_json(model) -> dict:
    """The model's config fingerprint as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(model.config.fingerprint(), sort_keys=True))


def _sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Adapter files


def nonfinite(tensors: dict) -> list[str]:
    """The names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_adapter(path, model, heads, *, stage: int, task: str, hparams: dict | None = None) -> None:
    """Write the offsets of `heads` to a safetensors adapter file, atomically.

    Args:
        path: Destination file (any name; written to a temporary file first, then renamed).
        model: A Llama carrying trained offsets.
        heads: (layer, head) pairs to store, e.g. the selected heads; None stores every head.
        stage: 1 (A trained) or 2 (v trained). task: The task name. hparams: JSON-able settings.

    Warns when the model has non-zero offsets on heads not in `heads` (the file cannot reproduce it).
    Raises AdapterError when an offset holds NaN or infinity (such a file would poison every model it
    is loaded onto).
    """
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    every = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    heads = every if heads is None else check_heads(model, heads)
    attns, layer_mlps = attentions(model), mlps(model)
    form = intervention_of(model)
    lofit_only = type(form) is LoFiT  # a subclass is another form: its file records it
    if INTERVENTIONS.get(form.name) is not type(form):
        raise AdapterError(f"the installed form {type(form).__name__} is not the registered form named "
                           f"{form.name!r}, so its adapter could not be loaded back; register it (@lofit.register) "
                           f"under a name of its own")
    for layer, attn in enumerate(attns):  # a trained row must be a saved row
        for name, (_, rows) in getattr(attn, "lofit_masks", {}).items():
            if outside := [h for h in rows if (layer, h) not in set(heads)]:
                raise AdapterError(f"{name} of layer {layer} is trained on heads {outside[:5]} that are not among "
                                   f"the heads to save; {path} was not written (save the trained heads)")
    tensors = {"heads": torch.tensor(heads, dtype=torch.int64).reshape(-1, 2)}
    for name, p in offset_parameters(attns[0]).items():
        if p.dim() == 0 or p.shape[0] != n_heads:
            raise AdapterError(f"{name} has shape {tuple(p.shape)}: an adapter stores one row per head, so its "
                               f"first dimension must be n_heads ({n_heads}); save_adapter cannot store it")
        rows = torch.stack([attns[layer].get_parameter(name)[h] for layer, h in heads]).detach().cpu()  # (K, ...)
        key = name.removeprefix("lofit_")
        lofit_key = key in ("A", "v")  # LoFiT files always hold v, and A after stage 1; other forms' rows always
        if not lofit_key or rows.any() or (lofit_only and (key == "v" or stage == 1)):
            tensors[key] = rows.contiguous()
    for name in offset_parameters(layer_mlps[0]):  # the MLP site: one row per layer, every layer
        tensors["mlp." + name.removeprefix("lofit_")] = torch.stack(
            [mlp.get_parameter(name) for mlp in layer_mlps]).detach().cpu().contiguous()  # (L, ...)
    if bad := nonfinite({k: v for k, v in tensors.items() if k != "heads"}):
        raise AdapterError(f"the offsets ({', '.join(bad)}) hold NaN or infinity; {path} was not written")
    chosen = set(heads)
    left_out = [(layer, h) for layer, h in every if (layer, h) not in chosen
                and any(p[h].any() for p in offset_parameters(attns[layer]).values())]
    if left_out:
        warnings.warn(f"{len(left_out)} heads outside the {len(heads)} saved have non-zero offsets "
                      f"(e.g. {left_out[:3]}); the adapter {path} will not reproduce this model exactly")
    config = _config_json(model)
    metadata = {"format": FORMAT, "format_version": str(1 if lofit_only else FORMAT_VERSION),
                "base_model": str(model.source or ""),
                "config": json.dumps(config, sort_keys=True), "config_sha256": _sha(config),
                "stage": str(int(stage)), "task": str(task), "hparams": json.dumps(hparams or {}, sort_keys=True),
                "heads": json.dumps(heads), "complete": json.dumps(not left_out)}
    if not lofit_only:  # older readers refuse version 2 rather than load the file without the form
        metadata["intervention"] = json.dumps({"name": form.name, **form.hparams()}, sort_keys=True)
    _write_replacing(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def read_adapter(path) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter file, metadata decoded; AdapterError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e})") from None
    if bad := nonfinite(tensors):
        raise AdapterError(f"{path} holds NaN or infinity in {', '.join(bad)}; it is not a usable adapter "
                           f"(train it again)")
    if raw.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a LoFiT adapter (no '{FORMAT}' metadata); "
                           f"pass an adapter.safetensors written by train.py or save_adapter")
    broken = f"{path} has broken adapter metadata"
    try:
        version = int(raw["format_version"])
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{broken} ({e!r}); write the adapter again") from None
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format version {version}; this code reads "
                           f"up to {FORMAT_VERSION}: update the code")
    try:
        meta = {**raw, "format_version": version, "stage": int(raw["stage"]),
                "config": json.loads(raw["config"]), "hparams": json.loads(raw["hparams"]),
                "heads": [tuple(h) for h in json.loads(raw["heads"])], "complete": json.loads(raw["complete"]),
                "intervention": json.loads(raw.get("intervention", '{"name": "lofit"}'))}
        if not all(isinstance(meta[k], dict) for k in ("config", "hparams", "intervention")):
            raise ValueError("config, hparams and intervention must be JSON objects")
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{broken} ({e!r}); write the adapter again") from None
    return tensors, meta


def load_adapter(path, model) -> dict:
    """Set `model`'s offsets to the adapter's: the file's heads get its v (and A), all others 0.

    Returns:
        The metadata: base_model, config, config_sha256, stage (int), task, hparams (dict),
        heads (list of (layer, head)), complete (bool), format, format_version.

    Raises:
        AdapterError: the file is missing or not an adapter, was made for another architecture
            (the message names both models and the differing config fields), or is inconsistent.
    """
    tensors, meta = read_adapter(path)
    ours = _config_json(model)
    if meta["config"] != ours:
        fields = sorted(set(meta["config"]) | set(ours))
        diff = [f"{f}: adapter {meta['config'].get(f)!r} vs model {ours.get(f)!r}"
                for f in fields if meta["config"].get(f) != ours.get(f)]
        raise AdapterError(f"adapter {path} was trained on {meta['base_model'] or 'an unnamed model'!r} "
                           f"(config {meta['config_sha256']}), which does not fit {model.source or 'this model'!r} "
                           f"(config {_sha(ours)}): " + "; ".join(diff))
    if getattr(model, "lofit_merged", False):
        raise AdapterError(f"this model already has offsets merged into o_proj, so {path} would stack on them; "
                           f"load the base model again")
    settings = dict(meta["intervention"])
    try:
        form = make_intervention(settings.pop("name", "lofit"), **settings)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}; import the file that defines it first (eval.py --intervention FILE)") \
            from None
    heads, K = tensors.get("heads"), len(meta["heads"])
    if heads is None or tuple(heads.shape) != (K, 2) or [tuple(h) for h in heads.tolist()] != meta["heads"] \
            or ("v" not in tensors and meta["format_version"] == 1):
        raise AdapterError(f"{path} is inconsistent: expected heads ({K}, 2) and v matching its metadata; "
                           f"write the adapter again")
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    if any(not (0 <= layer < n_layers and 0 <= h < n_heads) for layer, h in meta["heads"]):
        raise AdapterError(f"{path} names heads outside {model.source or 'this model'!r} "
                           f"({n_layers} layers x {n_heads} heads)")
    if meta["base_model"] and model.source and Path(meta["base_model"]).name != Path(str(model.source)).name:
        warnings.warn(f"adapter {path} was trained on {meta['base_model']!r}, loading it onto {model.source!r} "
                      f"(same architecture; make sure the weights are the same model)")
    try:
        extra = form.parameters(model.config)  # the form's offsets besides A and v, {name: (n_heads, ...)}
        at_mlp = form.mlp_parameters(model.config)  # and at the MLP output, {name: shape}
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None
    rows = {"A": (K, model.config.head_dim), "v": (K, model.config.head_dim),
            **{name: (K, *shape[1:]) for name, shape in extra.items()},
            **{"mlp." + name: (n_layers, *shape) for name, shape in at_mlp.items()}}
    for key, t in tensors.items():  # checked before the model is touched: a refused file changes nothing
        if key != "heads" and (key not in rows or tuple(t.shape) != rows[key]):
            want = "no such offset" if key not in rows else f"rows of {rows[key]}"
            raise AdapterError(f"{path} is inconsistent: its tensor {key} {tuple(t.shape)} does not fit the "
                               f"{form.name} intervention ({want}); write the adapter again")
    if missing := [key for key in rows if key.startswith("mlp.") and key not in tensors]:
        raise AdapterError(f"{path} is inconsistent: the {form.name} intervention needs {', '.join(missing)}, "
                           f"which it lacks; write the adapter again")
    install(model, form)
    attns = attentions(model)
    reset_offsets(model)
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("mlp."):
                for mlp, row in zip(mlps(model), t):
                    p = mlp.get_parameter("lofit_" + key.removeprefix("mlp."))
                    p.copy_(row.to(p.device, p.dtype))
                continue
            if key == "heads":
                continue
            for i, (layer, h) in enumerate(meta["heads"]):
                p = attns[layer].get_parameter("lofit_" + key)
                p[h] = t[i].to(p.device, p.dtype)
    return meta


# ----------------------------------------------------------------------------------------------
# Merging into o_proj


def merged_o_proj(attn: nn.Module, form=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_proj's (weight (D, H*hd), bias (D,) or None) with this layer's offsets folded in.

    The installed form's edit runs last, so it folds in first (form.merge), then A and v.
    Computed in fp64 and rounded once to the weight's dtype. The bias is None only when o_proj
    had none and nothing gave it one.
    """
    W = attn.o_proj.weight.detach()
    b = attn.o_proj.bias
    if not attn.lofit_enabled:
        return W, (None if b is None else b.detach())
    weight, bias = W.double(), (None if b is None else b.detach().double())
    if attn.lofit_edit is not None:
        with form_code(form, "merge"):
            weight, bias = form.merge(attn, weight, bias)
    scale = 1 + attn.lofit_A.detach().double().reshape(-1)  # (H*hd,)
    v = attn.lofit_v.detach().double().reshape(-1)  # (H*hd,): heads concatenated, as o_proj's input
    if bias is not None or v.any():
        bias = weight @ v + (0 if bias is None else bias)  # (D,): b + W_o v
    weight = weight * scale  # column j of W_o times (1 + A)_j
    return weight.to(W.dtype), (None if bias is None else bias.to(W.dtype))


def merged_down_proj(mlp: nn.Module, form) -> tuple[torch.Tensor, torch.Tensor | None]:
    """down_proj's (weight (hidden, intermediate), bias (hidden,) or None) with the form's MLP edit folded
    in (form.merge_mlp), in fp64 and rounded once; unchanged where the layer's MLP has no edit in effect."""
    W, b = mlp.down_proj.weight.detach(), mlp.down_proj.bias
    if mlp.lofit_edit is None or not mlp.lofit_enabled:
        return W, (None if b is None else b.detach())
    with form_code(form, "merge_mlp"):
        weight, bias = form.merge_mlp(mlp, W.double(), None if b is None else b.detach().double())
    return weight.to(W.dtype), (None if bias is None else bias.to(W.dtype))


def _check_mergeable(model) -> object:
    form = intervention_of(model)
    if not form.mergeable:
        raise AdapterError(f"the {form.name} intervention has no exact merge into o_proj, so it cannot be merged "
                           f"or exported as a plain checkpoint; evaluate it as an adapter (eval.py --adapter)")
    return form


def merge_offsets(model) -> None:
    """Fold every layer's offsets (A, v and the installed form's) into its o_proj, in place; all are 0 afterwards.

    The model then computes the same function (up to one rounding of the merged weights) with no
    LoFiT arithmetic. An o_proj without bias gets one when its layer's v is non-zero. Offsets that
    are switched off (lofit_enabled False) are not in effect, so they are not merged: they are
    dropped. Works on an unsharded model (not on FSDP-wrapped blocks).

    Raises:
        AdapterError: the form defines no merge (Intervention.mergeable), or the model was merged
            already (a second merge would stack whatever was loaded since on the merged weights).
    """
    form = _check_mergeable(model)
    if getattr(model, "lofit_merged", False):
        raise AdapterError("this model's offsets were merged into o_proj already; merging again would stack "
                           "offsets on merged weights: load the base model again")
    with torch.no_grad():
        merged = [(attn.o_proj, merged_o_proj(attn, form)) for attn in attentions(model)]
        merged += [(mlp.down_proj, merged_down_proj(mlp, form)) for mlp in mlps(model)]
        for linear, (weight, bias) in merged:
            linear.weight.copy_(weight)
            if bias is not None and linear.bias is None:
                linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
            elif bias is not None:
                linear.bias.copy_(bias)
    reset_offsets(model)
    model.lofit_merged = True


def export_merged(model, out_dir, tokenizer_dir=None, overwrite: bool = False) -> Path:
    """Write the model with its offsets merged as a Hugging Face checkpoint directory.

    `model` itself is not changed. The directory holds config.json (attention_bias true when any
    o_proj needs a bias; q/k/v then get zero biases, since HF's flag covers all four projections),
    model.safetensors (HF tensor names, the model's dtype) and, from `tokenizer_dir`, the tokenizer
    files found there (a .gguf file: its tokenizer, written as tokenizer.json). transformers'
    LlamaForCausalLM / GemmaForCausalLM and Llama.from_pretrained load it. It is built in a
    temporary directory and renamed into place.

    Raises:
        AdapterError: the installed form has no merge into o_proj.
        FileExistsError: `out_dir` exists and overwrite is False.
        FileNotFoundError: `tokenizer_dir` holds none of the tokenizer files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose a new directory or pass overwrite=True")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a model directory: choose another path")
    from_gguf = tokenizer_dir is not None and str(tokenizer_dir).lower().endswith(".gguf")  # write its tokenizer
    tokenizer_files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES] if tokenizer_dir and not from_gguf else []
    tokenizer_files = [f for f in tokenizer_files if f.is_file()]
    if tokenizer_dir and not from_gguf and not tokenizer_files:
        raise FileNotFoundError(f"{tokenizer_dir} has none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    form = _check_mergeable(model)
    cfg = model.config
    merged = {i: merged_o_proj(attn, form) for i, attn in enumerate(attentions(model))}
    with_bias = cfg.attention_bias or any(b is not None for _, b in merged.values())
    down = {i: merged_down_proj(mlp, form) for i, mlp in enumerate(mlps(model))}
    with_mlp_bias = cfg.mlp_bias or any(b is not None for _, b in down.values())
    state = {}
    for name, p in model.named_parameters():
        if ".lofit_" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        state[hf_name(name)] = p.detach()
    dtype = model.embed_tokens.weight.dtype
    for i, (weight, bias) in merged.items():
        prefix = f"model.layers.{i}.self_attn."
        state[prefix + "o_proj.weight"] = weight
        if with_bias:
            sizes = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.n_kv_heads * cfg.head_dim,
                     "v_proj": cfg.n_kv_heads * cfg.head_dim, "o_proj": cfg.hidden_size}
            for proj, size in sizes.items():
                state.setdefault(prefix + proj + ".bias", torch.zeros(size, dtype=dtype))
            if bias is not None:
                state[prefix + "o_proj.bias"] = bias
    for i, (weight, bias) in down.items():  # a form's MLP edit, folded into down_proj
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "down_proj.weight"] = weight
        if with_mlp_bias:  # HF's mlp_bias covers gate, up and down
            for proj, size in {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size,
                               "down_proj": cfg.hidden_size}.items():
                state.setdefault(prefix + proj + ".bias", torch.zeros(size, dtype=dtype))
            if bias is not None:
                state[prefix + "down_proj.bias"] = bias
    state = {k: t.to("cpu").contiguous() for k, t in state.items()}
    hf_config = {**cfg.to_hf(), "attention_bias": with_bias, "mlp_bias": with_mlp_bias,
                 "torch_dtype": str(dtype).removeprefix("torch.")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
        if from_gguf:
            load_tokenizer(str(tokenizer_dir)).save_hf(tmp)
        for f in tmp.iterdir():
            os.chmod(f, _ordinary_mode())
        os.chmod(tmp, _ordinary_mode(directory=True))  # mkdtemp makes it owner-only
        if out_dir.exists():  # overwrite: move the old one aside first, delete it once the new one is in place
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)  # the new one could not take its place: the old one stays
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _ordinary_mode(directory: bool = False) -> int:
    """The mode a plainly created file (or directory) would get under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _write_replacing(path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`: a failed or
    interrupted write leaves the old file as it was and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the bytes reach the disk before the name points at them
        os.chmod(tmp, _ordinary_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
