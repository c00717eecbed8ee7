"""The run report: the tuned model against the base model on the same questions, and what to do next.

train.py and eval.py end with it (on the terminal and in summary.md). Each metric is compared per
question (metrics.paired_bootstrap: 95% intervals of both means and of their difference; an exact
McNemar test for 0/1 metrics, a sign test for MC2/MC3). The base model's scores are computed once
per (model, task, split, fold, limit, dtype, tokenizer, data) and cached as JSON in
$LOFIT_CACHE/baselines (default ~/.cache/lofit/baselines), named by the key's SHA-256.
`eval.py --compare A B` uses the same comparison for two runs (load_scored, compare).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from machinery.distributed import Dist, same_on_every_rank
from machinery.flags import UsageError
from metrics import bootstrap_interval, mcnemar_p, paired_bootstrap, sign_test_p
from storage.atomic import WriteError, write_json_atomically

ROOT = Path(__file__).resolve().parent.parent
BINARY = ("mc1", "accuracy", "accuracy_stripped")  # 0/1 per question: McNemar; the rest: sign test
TIE_DIGITS = 6  # the sign test counts scores equal to 6 decimals as tied: batching moves fp32 scores by ~1e-7
LIBRARIES = ("numpy", "safetensors", "tokenizers", "sentencepiece", "gguf", "matplotlib", "tqdm", "transformers")


# ----------------------------------------------------------------------------------------------
# Versions and phase times


def code_version() -> str:
    """The git commit of this checkout ("+dirty" when files differ from it), or a note that there is none."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def library_versions() -> dict:
    """Python's, torch's and every installed library of LIBRARIES' version."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@contextmanager
def timed(seconds: dict, phase: str):
    """Add the wall time of the `with` body to seconds[phase]."""
    began = time.time()
    try:
        yield
    finally:
        seconds[phase] = round(seconds.get(phase, 0.0) + time.time() - began, 2)


# ----------------------------------------------------------------------------------------------
# Per-question values and paired comparisons


def per_question(details: list[dict]) -> dict[str, dict[tuple, float]]:
    """{metric: {id: value}} from eval.py's details: TruthfulQA's mc1/mc2/mc3, else 0/1 correctness.

    Keyed by question id alone: ids are unique within a task, and TruthfulQA's two folds hold disjoint
    questions; train.py's rows carry no fold and eval.py's do, and both must pair (compare_runs checks
    that the folds agree)."""
    values: dict[str, dict[str, float]] = {}
    for row in details:
        key = str(row["id"])
        if "mc1" in row:
            scores = {m: row[m] for m in ("mc1", "mc2", "mc3")}
        else:
            scores = {"accuracy": row["correct"]}
            if "correct_stripped" in row:
                scores["accuracy_stripped"] = row["correct_stripped"]
        for metric, value in scores.items():
            values.setdefault(metric, {})[key] = float(value)
    return values


def slim(details: list[dict]) -> list[dict]:
    """Only what per_question reads (the cache keeps no generations or candidate scores)."""
    keep = ("id", "fold", "mc1", "mc2", "mc3", "correct", "correct_stripped")
    return [{k: row[k] for k in keep if k in row} for row in details]


def compare(a_details: list[dict], b_details: list[dict], n_resamples: int = 10000, seed: int = 0) -> dict:
    """{metric: paired_bootstrap(a, b) + test, p_value} over the questions both sides scored (b - a)."""
    a, b = per_question(a_details), per_question(b_details)
    result = {}
    for metric in [m for m in a if m in b]:
        common = [k for k in a[metric] if k in b[metric]]
        if not common:
            continue
        xs, ys = [a[metric][k] for k in common], [b[metric][k] for k in common]
        if bad := sum(not math.isfinite(v) for v in xs + ys):  # e.g. a model with NaN weights
            result[metric] = {"non_finite": bad}
            continue
        binary = metric in BINARY
        result[metric] = {**paired_bootstrap(xs, ys, n_resamples, seed), "test": "McNemar" if binary else "sign",
                          "p_value": mcnemar_p(xs, ys) if binary else sign_test_p(*(
                              [round(v, TIE_DIGITS) for v in values] for values in (xs, ys)))}
    return result


def intervals(details: list[dict], n_resamples: int = 10000, seed: int = 0) -> dict:
    """{metric: bootstrap_interval} of one model's per-question values (when there is no base to compare with)."""
    result = {}
    for metric, values in per_question(details).items():
        bad = sum(not math.isfinite(v) for v in values.values())
        result[metric] = {"non_finite": bad} if bad else bootstrap_interval(list(values.values()), n_resamples, seed)
    return result


def comparison_table(comparison: dict, labels: tuple[str, str]) -> list[str]:
    """A Markdown table: one row per metric, both means with intervals, the difference's, the p-value."""
    def ci(mean, interval, sign=""):
        return f"{mean:{sign}.3f} [{interval[0]:{sign}.3f}, {interval[1]:{sign}.3f}]"
    lines = [f"| metric | {labels[0]} | {labels[1]} | {labels[1]} - {labels[0]} | p |", "|---|---|---|---|---|"]
    for metric, s in comparison.items():
        if "non_finite" in s:
            lines.append(f"| {metric} | not compared: {s['non_finite']} scores are not finite numbers | | | |")
            continue
        lines.append(f"| {metric} | {ci(s['mean_a'], s['interval_a'])} | {ci(s['mean_b'], s['interval_b'])} | "
                     f"{ci(s['mean_diff'], s['interval_diff'], '+')} | {s['p_value']:.3g} ({s['test']}) |")
    return lines


# ----------------------------------------------------------------------------------------------
# The base model's scores, cached


def cache_dir() -> Path:
    return Path(os.environ.get("LOFIT_CACHE") or Path.home() / ".cache" / "lofit") / "baselines"


def baseline_key(*, model: str, task: str, split: str, fold: int, limit, dtype: str, tokenizer: str,
                 data_dir) -> dict:
    """What decides the base model's scores; a local model or data directory is named by its absolute path."""
    def where(path):
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path
    return {"model": where(model), "task": task, "split": split, "fold": fold if task == "truthfulqa" else 0,
            "limit": limit, "dtype": dtype, "tokenizer": tokenizer, "data_dir": where(data_dir)}


def base_scores(key: dict, compute, d: Dist) -> dict:
    """The base model's {"summary", "details", "computed_at", "cached"} for `key`: read from the cache, or
    compute() (eval.py's {"summary", "details"}, run on every rank) and store it. Rank 0 decides and writes."""
    path = cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".json")
    entry = None
    if d.main:
        try:
            entry = json.loads(path.read_text())
            entry = entry if entry.get("key") == key else None
        except (OSError, ValueError, AttributeError):
            entry = None
    entry = same_on_every_rank(entry, d)
    if entry is not None:
        return {**entry, "cached": True, "path": str(path)}
    result = compute()
    entry = {"key": key, "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "summary": result["summary"], "details": slim(result["details"])}
    if d.main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, entry)
        except (OSError, WriteError) as e:
            print(f"note: the base model's scores could not be cached ({e})", file=sys.stderr)
    return {**entry, "cached": False, "path": str(path)}


def against_base(metrics: dict, details: list[dict], score_base, d: Dist, **key) -> None:
    """Add the base model's scores (cached per `key`: baseline_key's fields) and the paired comparison
    with `details` (this run's per-question results) to `metrics`; score_base() evaluates the base."""
    with timed(metrics["seconds"], "base model"):
        base = base_scores(baseline_key(**key), score_base, d)
    metrics["base"] = {k: base[k] for k in ("summary", "computed_at", "cached", "path")}
    metrics["comparison"] = compare(base["details"], details)


def base_note(base: dict | None, skipped: str = "--no-baseline") -> str:
    if base is None:
        return f"base model: not scored ({skipped})"
    when = "read from the cache, computed " + base["computed_at"] if base["cached"] else "computed in this run"
    return f"base model: {when} (cached per model, task, split, fold, limit, dtype, tokenizer and data: {base['path']})"


# ----------------------------------------------------------------------------------------------
# eval.py --compare: two scored runs


def load_scored(path: str) -> dict:
    """{"path", "task", "split", "fold", "details"} from a run directory, an eval_details.json or an eval.py --out."""
    p = Path(path)
    file = p / "eval_details.json" if p.is_dir() else p
    if not file.is_file():
        raise UsageError(f"--compare {path}: no such file" + (" (a run directory holds eval_details.json; this "
                                                               "one has none)" if p.is_dir() else ""))
    try:
        content = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--compare {path}: not JSON ({e})") from None
    meta = {"task": None, "split": None, "fold": None}
    if isinstance(content, dict) and "details" in content:  # eval.py --out
        config = content.get("config", {})
        folds = config.get("folds") or [None]
        meta = {"task": config.get("task"), "split": config.get("split"),
                "fold": folds[0] if len(folds) == 1 else folds}
        content = content["details"]
    elif (file.parent / "config.json").is_file():  # train.py's run directory: its test split
        try:
            flags = json.loads((file.parent / "config.json").read_text()).get("flags", {})
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"--compare {path}: its config.json cannot be read ({e})") from None
        meta = {"task": flags.get("task"), "split": "test", "fold": flags.get("fold")}
    if not isinstance(content, list) or not all(isinstance(r, dict) and "id" in r for r in content):
        raise UsageError(f"--compare {path}: not eval.py's details (a list of per-question results)")
    if meta["task"] != "truthfulqa":
        meta["fold"] = None
    return {"path": str(path), **meta, "details": content}


def compare_runs(a: dict, b: dict) -> dict:
    """The paired comparison of two load_scored runs; refuses different task, split or fold, or no shared question."""
    for field in ("task", "split", "fold"):
        if a[field] is not None and b[field] is not None and a[field] != b[field]:
            raise UsageError(f"--compare: {a['path']} has {field} {a[field]} but {b['path']} has {field} {b[field]}; "
                             f"compare runs scored on the same questions")
    comparison = compare(a["details"], b["details"])
    if not comparison:
        raise UsageError(f"--compare: {a['path']} and {b['path']} share no scored question")
    shared = {f: a[f] if a[f] is not None else b[f] for f in ("task", "split", "fold")}
    return {"a": a["path"], "b": b["path"], **shared, "metrics": comparison}


# ----------------------------------------------------------------------------------------------
# The report


def format_report(r: dict) -> str:
    """The end-of-run report as Markdown (readable on a terminal too). `r` holds: title, scope (what was
    scored), comparison (compare's, or None), intervals ({metric: bootstrap_interval} when there is no
    base), base (base_scores' or None), skipped (why not), trained (lines), seconds, outputs, next (commands)."""
    scored = r.get("comparison") or r.get("intervals")
    kind = "paired, " if r.get("comparison") else ""
    lines = [f"## {r['title']}", "", r["scope"] + (f"; 95% bootstrap intervals ({kind}10,000 resamples)"
                                                   if scored else ""), ""]
    if r.get("comparison"):
        lines += comparison_table(r["comparison"], ("base", "tuned"))
    elif r.get("intervals"):
        lines += ["| metric | score |", "|---|---|"] + [
            f"| {m} | {s['mean']:.3f} [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}] |" if "mean" in s else
            f"| {m} | not given: {s['non_finite']} scores are not finite numbers |" for m, s in r["intervals"].items()]
    else:
        lines.append(f"not evaluated ({r.get('skipped', '--no-eval')})")
    lines += ["", f"- {base_note(r.get('base'), r.get('skipped', '--no-baseline'))}"]
    lines += [f"- {line}" for line in r.get("trained", [])]
    total = sum(r["seconds"].values())
    lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items()) + f"; total {total:.1f} s")
    lines.append(f"- outputs: {r['outputs']}")
    if r.get("next"):
        lines += ["", "Next:", ""] + [f"    {command}" for command in r["next"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# train.py's banner and report


def banner(cfg, hp, form, d: Dist, sharding, n_train: int, n_test: int, loss: str) -> str:
    """train.py's start in a few lines: task, data, K and why, learning rates, dtype, device, threads,
    sharding (config.json holds every setting). `cfg` is train.TrainConfig, `hp` train.Hparams."""
    heads = {"lofit": "stage 1 of this run", "random": f"random, seed {cfg.seed}", "iti": "ITI probe accuracy",
             "file": f"--heads {cfg.heads}"}[cfg.head_selection]
    settings = ", ".join(f"{k}={v}" for k, v in form.hparams().items())
    return "\n".join([
        f"LoFiT on {cfg.task}" + (f" fold {cfg.fold}" if cfg.task == "truthfulqa" else "") + f": {cfg.model}",
        f"  data: {n_train} training examples ({loss.upper()}), {n_test} test examples",
        f"  heads: K = {hp.k} ({hp.source}); chosen by {heads}",
        f"  stage 1: lr {hp.lr_a:g}, L1 {hp.l1:g}; stage 2: {form.name}{f' ({settings})' if settings else ''}, "
        f"lr {hp.lr_v:g}; {cfg.epochs} epochs, batch {cfg.batch_size}",
        f"  {hp.dtype} on {d.device}, {d.world} process(es), {torch.get_num_threads()} thread(s); "
        f"frozen base: {sharding[0]} ({sharding[1]})"])


def train_report(cfg, metrics: dict, selected, stage: int, files: list[str]) -> dict:
    """What format_report shows for this run: scores against the base model, training, times, next commands."""
    losses = metrics["train_loss"]
    trained = [f"{name.replace('stage', 'stage ')} loss per epoch: " + " -> ".join(f"{x:.4f}" for x in history)
               for name, history in losses.items()]
    heads = ", ".join(f"({layer}, {head})" for layer, head in selected[:8]) + (", ..." if len(selected) > 8 else "")
    trained.append(f"heads: K = {len(selected)}" + (f", {metrics['trainable_parameters']} trained numbers"
                                                     if "trainable_parameters" in metrics else "") + f": {heads}")
    adapter, fold = f"{cfg.out}/adapter.safetensors", f" --fold {cfg.fold}" if cfg.task == "truthfulqa" else ""
    model_flags = f"--task {cfg.task} --model {cfg.model}" + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") \
        + (f" --intervention {cfg.intervention}" if cfg.intervention != "lofit" else "")  # a form's file to import
    commands = [f"python eval.py {model_flags}{fold} --adapter {adapter} --split val --out {cfg.out}/val.json",
                f"python eval.py --compare OTHER_RUN_DIR {cfg.out}",
                f"python export.py --adapter {adapter} --model {cfg.model} --format merged --out {cfg.out}-merged"
                + (f" --intervention {cfg.intervention}" if cfg.intervention.endswith(".py") else "")]
    if stage == 1:
        commands = [f"python train.py {model_flags}{fold} --heads {cfg.out}/heads.json --out {cfg.out}-stage2"]
    test = metrics.get("test")
    scope = f"{cfg.task} test split, {test['n']} questions" + (f", fold {cfg.fold}" if fold else "") if test else \
        f"{cfg.task}: no test-set evaluation"
    return {"title": f"LoFiT on {cfg.task}: {cfg.model}", "scope": scope, "comparison": metrics.get("comparison"),
            "intervals": metrics.get("intervals"), "base": metrics.get("base"),
            "skipped": "--no-eval" if cfg.no_eval else "--no-baseline" if cfg.no_baseline else "stage 1 only",
            "trained": trained, "seconds": metrics["seconds"], "outputs": f"{cfg.out}: " + ", ".join(files),
            "next": commands}
