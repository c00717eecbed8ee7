"""TruthfulQA multiple-choice scoring: our prefix-cached scorer against full prompts in transformers.

Every candidate answer of every question is scored by the sum of its tokens' log-probs after the
~250-token instruction + 6-shot primer + question (../shared/docs/tasks.md).

- Baseline (what ITI's and LoFiT's tqa_run_probs do): transformers' LlamaForCausalLM runs each
  candidate's full prompt on its own (batch 1), full logits, log_softmax, then picks the answer
  tokens' log-probs.
- Ours: eval.answer_scores, which runs the prefix shared by all candidates once, expands its KV
  cache to batches of 8 candidates that hold only their own question + answer tokens, and computes
  logits only at the positions that predict answer tokens.

Both get the same token ids (eval.mc_sequences), so the scores must agree; the largest absolute
difference is reported. Throughput is candidates per second over the first N questions of the
fold's test file (the prefix is computed once per call, so more questions favour ours further).
"""
from __future__ import annotations

import torch
from common import DATASETS_DIR, Row, interleaved_times, median  # first: puts the repo root on sys.path

import eval as evaluation  # noqa: E402
from data import load_examples  # noqa: E402


def fold_sequences(tokenizer, n_questions: int, fold: int = 0):
    """Token ids and answer starts of every candidate of the first n test questions of a fold."""
    examples = load_examples("truthfulqa", "test", fold=fold, data_dir=DATASETS_DIR)[:n_questions]
    sequences, starts = [], []
    for ex in examples:
        seqs, start, _ = evaluation.mc_sequences(tokenizer, ex)
        sequences += seqs
        starts += [start] * len(seqs)
    return sequences, starts


@torch.no_grad()
def full_prompt_scores(hf_model, sequences, starts) -> list[float]:
    """The original's way: one full prompt at a time, full logits, log-probs of the answer tokens."""
    device = hf_model.device
    scores = []
    for ids, start in zip(sequences, starts):
        logits = hf_model(torch.tensor([ids], device=device), use_cache=False).logits[0]  # (T, V)
        logp = logits.float().log_softmax(-1)[start - 1:-1]  # (answer tokens, V): row t-1 predicts token t
        targets = torch.tensor(ids[start:], device=device)
        scores.append(float(logp.gather(-1, targets[:, None]).sum()))
    return scores


def run(config: str, ours_model, hf_model, tokenizer, n_questions: int, repeats: int,
        clock: str = "wall", batch_size: int = 8) -> tuple[list[Row], dict]:
    sequences, starts = fold_sequences(tokenizer, n_questions)
    out = {}

    def ours():
        out["ours"] = evaluation.answer_scores(ours_model, sequences, starts, batch_size=batch_size)

    def baseline():
        out["transformers full prompt"] = full_prompt_scores(hf_model, sequences, starts)

    fns = {"transformers full prompt": baseline, "ours": ours}
    times = interleaved_times(fns, repeats, clock=clock)
    pairs = list(zip(out["ours"], out["transformers full prompt"]))
    gap = max(abs(a - b) for a, b in pairs)
    relative = max(abs(a - b) / max(abs(b), 1e-30) for a, b in pairs)
    cps = {name: len(sequences) / median(t) for name, t in times.items()}
    tokens = sum(len(s) for s in sequences)
    row = Row("score", config, f"TruthfulQA MC candidates/s ({n_questions} questions, {len(sequences)} candidates)",
              cps["transformers full prompt"], cps["ours"], "cand/s", True, 5.0,
              note=f"max score difference {gap:.1e} abs (target <= 1e-4), {relative:.0e} relative")
    raw = {"questions": n_questions, "candidates": len(sequences), "tokens_full_prompts": tokens,
           "times_s": times, "candidates_per_s": cps, "max_abs_score_diff": gap,
           "max_rel_score_diff": relative, "score_range": [min(b for _, b in pairs), max(b for _, b in pairs)]}
    return [row], raw
