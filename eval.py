"""Evaluate a base model, a model with a LoFiT adapter, or a merged export, with the paper's metrics.

    python eval.py --task truthfulqa --model meta-llama/Llama-2-7b-hf --adapter tqa_fold0.safetensors
    python eval.py --task mquake --model runs/mquake_merged --limit 100 --out results.json
    torchrun --nproc_per_node 8 eval.py --task truthfulqa --model M --out results.json   # 1/8 of it per GPU

TruthfulQA (MC1, MC2, MC3) scores every candidate answer by the SUM of its tokens' log-probs after
INSTRUCTION + "\\n\\n" + 6-shot primer + "\\n\\nQ: " + question + "\\nA: ". That long prefix is the
same for every candidate of every question, so its KV cache is computed once and each candidate
only pays for its own question and answer tokens (scores equal the full-prompt computation).
MQuAKE and CLUTRR: exact match on greedy decoding of 16 tokens with LoFiT's extraction rules.
SIQA, ARC-Challenge, BoolQ: greedy decoding, then the first answer keyword (LLM-Adapters' rule).
Prompts: data/ and ../shared/docs/tasks.md. Metrics and extraction rules: metrics.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from adapter import load_adapter
from data import TASK_INFO, TASKS, Example, load_examples
from lofit import INTERVENTIONS, answer_logprobs, offsets_disabled
from machinery import rundir
from machinery.checkpoints import read_model_config
from machinery.distributed import (
    Dist,
    add_sharding_flag,
    choose_sharding,
    close_distributed,
    gather_lists,
    load_model,
    lockstep,
    rank_slice,
    setup_distributed,
)
from machinery.flags import (
    THREADS_HELP,
    UsageError,
    add_common_flags,
    add_intervention_flags,
    check_flags,
    check_out_file,
    import_intervention_file,
    report_error,
    resolve_device,
    resolve_dtype,
    set_threads,
)
from machinery.report import (
    base_scores,
    baseline_key,
    compare,
    compare_runs,
    comparison_table,
    format_report,
    intervals,
    load_scored,
    timed,
)
from metrics import clutrr_extract, keyword_extract, mc_metrics, mean_over_folds, mquake_correct, mquake_prediction
from model import KVCache, Llama, LofitError
from storage.atomic import WriteError, json_text, remove_temporaries, write_json_atomically, write_text_atomically
from tokenizer import load_tokenizer


def warn_beyond_context(model: Llama, lengths: list[int], what: str, show: bool = True) -> int:
    """Warn once when sequences are longer than the model's max_position_embeddings; return how many are.

    Nothing is cut: positions past the limit were never trained, so scores there are unreliable.
    """
    limit = model.config.max_position_embeddings
    over = sum(n > limit for n in lengths)
    if over and show:
        print(f"warning: {over} of {len(lengths)} {what} are longer than the model's max_position_embeddings "
              f"({limit} tokens; the longest has {max(lengths)}); positions past it were never trained, so "
              f"their results are unreliable", file=sys.stderr)
    return over


# ----------------------------------------------------------------------------------------------
# TruthfulQA: summed answer log-probs, batched, with the shared prefix cached once


def mc_sequences(tokenizer, example: Example) -> tuple[list[list[int]], int, list[str]]:
    """Token ids of every candidate of one question, the index where the answer tokens begin, and
    the candidate texts (true answers first, then false ones).

    The answer's tokens are located as in ITI's / LoFiT's tqa_run_probs: tokenize the context
    (instruction + primer + question, with BOS) to length L and the full text, then score the full
    text's tokens from L + 3 on, the 3 being "\\nA:". Here the start is len(tokens of context +
    "\\nA:"), which is the same number wherever "\\nA:" is those 3 tokens (Llama-2, Gemma and
    stories260K tokenizers; tests check it) and still right for tokenizers where it is not.
    The answer's first token carries the space after "A:" (e.g. "▁Nothing").
    """
    answers = list(example.true_answers) + list(example.false_answers)
    head = example.eval_prompt + "\nA:"
    answer_start = len(tokenizer.encode(head, bos=True))
    sequences = tokenizer.encode_batch([head + " " + a for a in answers], bos=True)
    return sequences, answer_start, answers


def shared_prefix_length(sequences: list[list[int]], answer_starts: list[int]) -> int:
    """Length of the longest common token prefix of all sequences, kept at least one token short
    of every answer (the logit predicting an answer's first token must come from the suffix).

    Using the common prefix of the actual token ids (not the tokenized prefix text) makes the cache
    valid for every sequence by construction, whatever SentencePiece does at the text boundary.
    """
    first, limit = sequences[0], min(answer_starts) - 1
    length = 0
    while length < limit and all(len(s) > length and s[length] == first[length] for s in sequences):
        length += 1
    return length


@torch.no_grad()
def answer_scores(model: Llama, sequences: list[list[int]], answer_starts: list[int], *,
                  batch_size: int = 8, prefix_cache: bool = True, progress: bool = False) -> list[float]:
    """Sum of log p(token | everything before it) over sequences[i][answer_starts[i]:], per i.

    With prefix_cache, the common token prefix of all sequences runs once (batch 1); its KV cache is
    expanded to each batch, which then holds only the right-padded suffixes. Logits are computed
    only at the positions that predict answer tokens, in fp32.
    """
    device = model.embed_tokens.weight.device
    prefix_len = shared_prefix_length(sequences, answer_starts) if prefix_cache else 0
    prefix = None
    if prefix_len:
        prefix = KVCache()
        model.hidden_states(torch.tensor([sequences[0][:prefix_len]], device=device), cache=prefix)
    scores = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths together
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring answers", disable=not progress, leave=False):
        suffixes = [sequences[i][prefix_len:] for i in batch]
        width = max(len(s) for s in suffixes)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, S) right-padded; pads are masked
        mask = torch.zeros(len(batch), prefix_len + width, dtype=torch.long)  # (B, P + S)
        mask[:, :prefix_len] = 1
        answer = torch.zeros(len(batch), width, dtype=torch.bool)  # (B, S): the answer tokens
        for b, (i, suffix) in enumerate(zip(batch, suffixes)):
            ids[b, :len(suffix)] = torch.tensor(suffix)
            mask[b, prefix_len:prefix_len + len(suffix)] = 1
            answer[b, answer_starts[i] - prefix_len:len(suffix)] = True  # predicted inside the suffix
        cache = prefix.expand(len(batch)) if prefix is not None else None
        sums = answer_logprobs(model, ids.to(device), mask.to(device), answer.to(device), cache)  # (B,)
        for b, i in enumerate(batch):
            scores[i] = float(sums[b])
    return scores


def evaluate_truthfulqa(model, tokenizer, examples, batch_size, progress, prefix_cache=True) -> dict:
    """MC1/MC2/MC3 averaged over questions; details hold every candidate's score."""
    per_question = [mc_sequences(tokenizer, ex) for ex in examples]
    warn_beyond_context(model, [max(len(s) for s in seqs) for seqs, _, _ in per_question],
                        "test questions (prompt + longest answer)", progress)
    sequences = [s for seqs, _, _ in per_question for s in seqs]
    starts = [start for seqs, start, _ in per_question for _ in seqs]
    flat = answer_scores(model, sequences, starts, batch_size=batch_size, prefix_cache=prefix_cache,
                         progress=progress)
    details, offset = [], 0
    for ex, (seqs, _, answers) in zip(examples, per_question):
        scores, offset = flat[offset:offset + len(seqs)], offset + len(seqs)
        n_true = len(ex.true_answers)
        true, false = scores[:n_true], scores[n_true:]
        best = true[ex.true_answers.index(ex.best_answer)]  # the best answer is one of the true ones
        details.append({"id": ex.id, "question": ex.question, "best_answer": ex.best_answer,
                        **mc_metrics(true, false, best),
                        "true": [{"answer": a, "score": s} for a, s in zip(answers[:n_true], true)],
                        "false": [{"answer": a, "score": s} for a, s in zip(answers[n_true:], false)]})
    return {"summary": summarize("truthfulqa", details), "details": details}


# ----------------------------------------------------------------------------------------------
# Generation tasks


def stop_ids(model: Llama, tokenizer) -> list[int]:
    """Generation stops on the tokenizer's EOS and on any EOS the model's config names."""
    ids = model.config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_id, *ids})


@torch.no_grad()
def generate_greedy(model: Llama, tokenizer, prompts: list[str], *, max_new_tokens: int,
                    batch_size: int = 8, progress: bool = False) -> list[tuple[str, str]]:
    """Greedy continuations of left-padded batches, cut at the first EOS.

    Returns, per prompt, (decoded prompt + generation, the generated part of that text). Special
    tokens are dropped, as by HF's batch_decode(skip_special_tokens=True), which the original
    applied to the whole output. The generated part is cut from the joint decode, so it keeps a
    leading space that decoding the new tokens alone would lose.
    """
    device = model.embed_tokens.weight.device
    encoded = tokenizer.encode_batch(prompts, bos=True)
    eos = stop_ids(model, tokenizer)
    results: list[tuple[str, str]] = [("", "")] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[b, width - len(encoded[i]):] = 1
        new = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                             eos_id=eos, pad_id=tokenizer.pad_id).tolist()  # (B, n)
        for b, i in enumerate(batch):
            tokens = new[b]
            cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
            tokens = tokens[:cut]
            decoded, prompt_text = tokenizer.decode(encoded[i] + tokens), tokenizer.decode(encoded[i])
            generated = decoded[len(prompt_text):] if decoded.startswith(prompt_text) else tokenizer.decode(tokens)
            results[i] = (decoded, generated)
    return results


def evaluate_generation(model, tokenizer, task, examples, batch_size, progress) -> dict:
    """Exact-match accuracy of greedy generations; details hold raw generations and predictions."""
    info = TASK_INFO[task]
    lengths = [len(ids) + info.max_new_tokens for ids in tokenizer.encode_batch([ex.eval_prompt for ex in examples],
                                                                                bos=True)]
    warn_beyond_context(model, lengths, "test prompts (+ the generated tokens)", progress)
    outputs = generate_greedy(model, tokenizer, [ex.eval_prompt for ex in examples],
                              max_new_tokens=info.max_new_tokens, batch_size=batch_size, progress=progress)
    details = []
    for ex, (decoded, generation) in zip(examples, outputs):
        row = {"id": ex.id, "prompt": ex.eval_prompt, "generation": generation, "references": ex.references}
        if task == "mquake":
            pred = mquake_prediction(decoded)
            row.update(prediction=pred, correct=mquake_correct(pred, ex.references),
                       prediction_stripped=pred.strip(),
                       correct_stripped=mquake_correct(pred, ex.references, strip=True))
        elif task == "clutrr":
            pred = clutrr_extract(decoded)
            row.update(prediction=pred, correct=pred == ex.references[0].lower())
        else:
            pred = keyword_extract(generation, info.answer_pattern)
            row.update(prediction=pred, correct=pred == ex.references[0])
        details.append(row)
    return {"summary": summarize(task, details), "details": details}


def summarize(task: str, details: list[dict]) -> dict:
    """The summary of `task`'s per-example details: mean MC1/MC2/MC3 (TruthfulQA) or accuracy."""
    if TASK_INFO[task].metric == "mc":
        return {"task": task, "n": len(details),
                **{m: sum(d[m] for d in details) / len(details) for m in ("mc1", "mc2", "mc3")}}
    summary = {"task": task, "n": len(details), "accuracy": sum(d["correct"] for d in details) / len(details)}
    if task == "mquake":
        summary["accuracy_stripped"] = sum(d["correct_stripped"] for d in details) / len(details)
    return summary


def evaluate(model: Llama, tokenizer, task: str, examples: list[Example], *, batch_size: int = 8,
             progress: bool = True, prefix_cache: bool = True) -> dict:
    """Evaluate `model` on `examples` of `task` with the paper's metric.

    Args:
        model: A Llama (with or without LoFiT offsets), in eval mode.
        tokenizer: Its tokenizer (tokenizer.load_tokenizer).
        task: One of data.TASKS.
        examples: data.load_examples(task, split, ...) output.
        batch_size: Sequences per forward pass.
        progress: Show tqdm progress bars.
        prefix_cache: TruthfulQA only: reuse the KV cache of the shared prompt prefix.

    Returns:
        {"summary": {"task", "n", metrics...}, "details": [one dict per example]}. TruthfulQA:
        mc1, mc2, mc3 (and every candidate's score in details); MQuAKE: accuracy (the paper's,
        unstripped) and accuracy_stripped; the others: accuracy.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not examples:
        raise ValueError(f"no {task} examples to evaluate")
    if TASK_INFO[task].metric == "mc":
        return evaluate_truthfulqa(model, tokenizer, examples, batch_size, progress, prefix_cache)
    return evaluate_generation(model, tokenizer, task, examples, batch_size, progress)


def evaluate_split(model, tokenizer, task: str, examples: list, d: Dist, **kwargs) -> dict:
    """`evaluate` with the examples split across torchrun's ranks; the same summary and details on every rank."""
    if d.world == 1 or not examples:
        return evaluate(model, tokenizer, task, examples, **kwargs)
    mine = examples[rank_slice(len(examples), d)]
    with lockstep(model, d):  # a sharded base: every rank joins every forward pass
        details = evaluate(model, tokenizer, task, mine, **kwargs)["details"] if mine else []
    details = gather_lists(details, d)
    return {"summary": summarize(task, details), "details": details}


# ----------------------------------------------------------------------------------------------
# Command line


COMPARE_HELP = ("compare two scored runs per question (eval_details.json, eval.py --out files or train.py run "
                "directories): B - A with 95%% bootstrap intervals and p-values; takes only --out and --overwrite")


def parse_compare_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare two scored runs on the questions both scored.")
    p.add_argument("--compare", nargs=2, required=True, metavar=("A", "B"), help=COMPARE_HELP)
    p.add_argument("--out", default=None, help="write the comparison to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in argv:
        return parse_compare_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help=COMPARE_HELP)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    add_common_flags(p, model_default=None)
    add_sharding_flag(p)
    p.add_argument("--adapter", nargs="+", default=None,
                   help="LoFiT adapter file; with --fold both, one per fold (fold 0's first)")
    add_intervention_flags(p, with_settings=False)
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    p.add_argument("--fold", default="0", choices=["0", "1", "both"],
                   help="TruthfulQA fold; 'both' reports the mean over the two folds (default 0)")
    p.add_argument("--no-prefix-cache", action="store_true", help="TruthfulQA: score every full prompt")
    p.add_argument("--out", default=None, help="write summary and details to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the report is still printed)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--no-baseline", action="store_true", help="with --adapter: do not score the base model for "
                   "the report (its scores are cached per model, task, split, fold, limit, dtype, tokenizer and "
                   "data directory)")
    return p.parse_args(argv)


def check_args(args) -> list[int]:
    """Validate what can be checked before loading anything; return the folds to evaluate."""
    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    folds = [0, 1] if args.fold == "both" else [int(args.fold)]
    if args.task != "truthfulqa" and folds != [0]:
        raise UsageError(f"--fold applies to truthfulqa only; {args.task} has one split")
    if args.adapter and len(args.adapter) != len(folds):
        raise UsageError(f"give one --adapter per fold: {len(folds)} fold(s), {len(args.adapter)} adapter(s)")
    for path in args.adapter or []:
        if Path(path).is_dir():
            inside = " (it holds adapter.safetensors)" if (Path(path) / "adapter.safetensors").is_file() else ""
            raise UsageError(f"--adapter {path} is a directory{inside}; pass the adapter file, e.g. "
                             f"{Path(path) / 'adapter.safetensors'}")
        if not Path(path).is_file():
            raise UsageError(f"adapter file {path} does not exist")
    run_dir = Path(args.model)
    if (run_dir / "adapter.safetensors").is_file() and not (run_dir / "model.safetensors").exists() \
            and not (run_dir / "model.safetensors.index.json").exists():
        raise UsageError(f"--model {args.model} is a train.py/iti.py output directory, not a model: pass the base "
                         f"model it was trained on with --model and --adapter {run_dir / 'adapter.safetensors'}")
    check_flags(args)
    if args.out is not None:
        check_out_file(args.out, overwrite=args.overwrite)
    return folds


def run(args, d: Dist | None = None) -> dict:
    """Load everything, evaluate each requested fold, return the results dict (CLI body).

    Under torchrun (`d` from distributed.setup_distributed) the examples are split across ranks
    and every rank returns the whole results dict.
    """
    folds = check_args(args)
    if args.intervention.endswith(".py"):  # registers the form the adapter names (its settings are in the adapter)
        import_intervention_file(args.intervention)
    elif args.intervention not in INTERVENTIONS:
        raise UsageError(f"--intervention {args.intervention}: no such form (registered: {', '.join(INTERVENTIONS)}); "
                         f"pass the .py file that defines it")
    d = d or Dist(device=torch.device(resolve_device(args.device)))
    device = str(d.device)
    dtype = getattr(torch, resolve_dtype(args.dtype, device))
    examples = [load_examples(args.task, args.split, fold=f, data_dir=args.data_dir,
                              train_size=0 if args.split == "train" else None)[:args.limit] for f in folds]
    model_config = read_model_config(args.model)
    set_threads(args.threads, model_config)
    sharding, _ = choose_sharding(args.sharding, model_config, dtype, d)
    seconds = {}  # wall time per phase, for the results and the report
    with timed(seconds, "load"):
        model = load_model(args.model, d, dtype, sharding, progress=not args.quiet)
        tokenizer = load_tokenizer(args.model, backend=args.tokenizer)
    summaries, details, bases = [], [], []
    for k, fold in enumerate(folds):
        def score(fold=fold, k=k):
            result = evaluate_split(model, tokenizer, args.task, examples[k], d, batch_size=args.eval_batch_size,
                                    progress=not args.quiet and d.main, prefix_cache=not args.no_prefix_cache)
            if args.task == "truthfulqa":
                result["summary"]["fold"] = fold
                result["details"] = [{"fold": fold, **row} for row in result["details"]]
            return result
        if args.adapter:
            load_adapter_or_fail(args.adapter[k], model, args.task, fold, args.split)
            if not args.no_baseline:  # the same questions without the adapter, for the report
                def score_base(score=score):
                    with offsets_disabled(model):
                        return score()
                key = baseline_key(model=args.model, task=args.task, split=args.split, fold=fold, limit=args.limit,
                                   dtype=str(dtype).removeprefix("torch."), tokenizer=args.tokenizer,
                                   data_dir=args.data_dir)
                with timed(seconds, "base model"):
                    bases.append(base_scores(key, score_base, d))
        with timed(seconds, "evaluation"):
            result = score()
        details += result["details"]
        summaries.append(result["summary"])
    summary = mean_over_folds(summaries) if len(summaries) > 1 else summaries[0]
    config = {"task": args.task, "model": args.model, "adapter": args.adapter, "split": args.split,
              "folds": folds, "limit": args.limit, "dtype": str(dtype).removeprefix("torch."), "device": device,
              "world_size": d.world, "sharding": d.sharding}
    results = {"config": config, "summary": summary, "details": details, "seconds": seconds}
    if bases:
        results["base"] = [{k: b[k] for k in ("summary", "computed_at", "cached", "path")} for b in bases]
        results["comparison"] = compare([row for b in bases for row in b["details"]], details)
    else:
        results["intervals"] = intervals(details)
    return results


def eval_report(args, results: dict) -> str:
    """format_report for one eval.py run: the adapter against the base model, or one model's scores."""
    config = results["config"]
    fold = f", fold {args.fold}" if args.task == "truthfulqa" else ""
    commands = [f"python eval.py --compare OTHER_RESULTS.json {args.out or 'THESE_RESULTS.json'}"]
    if args.adapter:
        commands.append(f"python export.py --adapter {args.adapter[0]} --model {args.model} --format merged "
                        f"--out {Path(args.adapter[0]).parent}-merged")
    return format_report({
        "title": f"{args.task} on {args.model}" + (f" with {', '.join(args.adapter)}" if args.adapter else ""),
        "scope": f"{args.task} {config['split']} split, {results['summary']['n']} questions{fold}",
        "comparison": results.get("comparison"), "intervals": results.get("intervals"),
        "base": results["base"][0] if results.get("base") else None,
        "skipped": "--no-baseline" if args.no_baseline else "no --adapter: this model is the one scored",
        "seconds": results["seconds"], "next": commands,
        "outputs": f"{args.out} and {summary_path(args.out)}" if args.out else "none (no --out)"})


def summary_path(out: str) -> Path:
    """eval.py's report beside --out: results.json -> results.summary.md."""
    return Path(out).with_name(Path(out).stem + ".summary.md")


def compare_main(args) -> int:
    """eval.py --compare A B: the per-question comparison, as a table and (with --out) JSON."""
    try:
        if args.out is not None:
            check_out_file(args.out, overwrite=args.overwrite)
        result = compare_runs(load_scored(args.compare[0]), load_scored(args.compare[1]))
    except LofitError as err:
        return report_error(err)
    n = next(iter(result["metrics"].values()))["n"]
    fold = f" fold {result['fold']}" if result["fold"] is not None else ""
    scope = f"{result['task'] or 'task unknown'} {result['split'] or ''}{fold}"
    print(f"A = {result['a']}, B = {result['b']}\n{scope}: {n} questions scored by both;"
          f" 95% paired bootstrap intervals, exact McNemar (0/1 metrics) or sign test\n")
    print("\n".join(comparison_table(result["metrics"], ("A", "B"))))
    return save_results(Path(args.out), result, overwrite=args.overwrite) if args.out is not None else 0


def load_adapter_or_fail(path: str, model: Llama, task: str, fold: int, split: str = "test") -> None:
    """Set `model`'s offsets to an adapter's (heads it lacks get 0, so adapters never stack).

    Raises AdapterError when the file is not an adapter or was made for another architecture, and
    UsageError when it is a TruthfulQA adapter of the other fold asked to score this fold's test set (which holds its
    training questions).
    """
    meta = load_adapter(path, model)
    trained_fold = meta["hparams"].get("fold")
    leaks = task == meta.get("task") == "truthfulqa" and split == "test"
    if leaks and trained_fold is not None and int(trained_fold) != fold:
        raise UsageError(f"adapter {path} was trained on TruthfulQA fold {trained_fold}; evaluating it on "
                         f"fold {fold}'s test set would test on its training questions. Pass --fold {trained_fold}")
    if meta.get("task") and meta["task"] != task:
        print(f"warning: adapter {path} was trained on {meta['task']}, evaluated here on {task}", file=sys.stderr)


def save_results(path: Path, results: dict, overwrite: bool = False) -> int:
    """Write --out (never over a file another process wrote meanwhile, unless `overwrite`); if that
    fails, keep the results in a file elsewhere (or on stdout) and say where."""
    remove_temporaries(path.parent, name=path.name, older_than=600)  # left by a killed eval.py
    try:
        write_json_atomically(path, results, replace=overwrite)
        return 0
    except WriteError as err:
        fallback = Path(tempfile.gettempdir()) / f"lofit-results-{os.getpid()}.json"
        try:
            write_json_atomically(fallback, results)
            kept = f"the results were written to {fallback} instead"
        except WriteError:
            print(json_text(results, name="results"))
            kept = "the results are printed above instead"
        return report_error(UsageError(f"{err}; {kept}"))


def hold_results_file(args, d: Dist, argv):
    """Rank 0 holds --out from the start until it is written (rundir.claim_file): a second eval.py
    into the same file is refused, not silently overwritten."""
    if args.out is None or not d.main:
        return contextlib.nullcontext()
    return rundir.claim_file(args.out, overwrite=args.overwrite, command=rundir.command_line("eval.py", argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compare:
        return compare_main(args)
    try:
        d = setup_distributed(args.device)
        finished = False
        try:
            with hold_results_file(args, d, argv):
                results = run(args, d)
                finished = True
                if not d.main:
                    return 0
                print(json_text(results["summary"], name="summary"))
                report = eval_report(args, results)
                print("\n" + report, file=sys.stderr)  # stdout keeps only the JSON summary
                if args.out is None:
                    return 0
                code = save_results(Path(args.out), results, overwrite=args.overwrite)
                if code == 0:
                    write_text_atomically(summary_path(args.out), report)
                return code
        finally:
            close_distributed(finished)
    except LofitError as err:
        return report_error(err, print_message=os.environ.get("RANK", "0") == "0")
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
