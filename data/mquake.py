"""MQuAKE: LoFiT's single-edit MQuAKE-CF-3k splits (train/val/test = 134/95/864 cases).

For a case, with rw = requested_rewrite[0] and only the FIRST of its three questions:
    edit   = rw["prompt"].format(rw["subject"]) + " " + rw["target_new"]["str"]
    prompt = "Q: Imagine that {edit}. {question} A:"
    answer = new_answer                      (appended with no space after "A:")
Evaluation: greedy decoding of 16 tokens from the prompt; the text after the last "A:", cut at the
first newline and lowercased (not stripped), must be one of `references` lowercased,
references = [new_answer] + new_answer_alias.
"""
from __future__ import annotations

import os

from .common import DataError, Example, subsample
from .readers import field, load_records

TEMPLATE = "Q: Imagine that {edit}. {question} A:"


def load(split: str, data_dir: str | os.PathLike | None, train_size: int | None, seed: int) -> list[Example]:
    """Examples of one MQuAKE split, in file order (train: optionally subsampled)."""
    relpath = f"mquake/{split}.jsonl"
    examples = [_example(case, f"{relpath} line {i + 1}")
                for i, case in enumerate(load_records(relpath, data_dir))]
    if split == "train":
        examples = subsample(examples, train_size, seed, "mquake train")
    return examples


def _example(case: dict, where: str) -> Example:
    rewrites = field(case, "requested_rewrite", where, list)
    questions = field(case, "questions", where, list)
    if not rewrites or not questions:
        raise DataError(f"{where}: requested_rewrite and questions must be non-empty")
    rw = rewrites[0]
    target_new = field(rw, "target_new", where, dict)
    edit = field(rw, "prompt", where).format(field(rw, "subject", where)) + " " + field(target_new, "str", where)
    question = questions[0]
    answer = field(case, "new_answer", where)
    prompt = TEMPLATE.format(edit=edit, question=question)
    return Example(
        id=str(field(case, "case_id", where, int)),
        prompt=prompt,
        answer=answer,
        eval_prompt=prompt,
        references=[answer] + list(field(case, "new_answer_alias", where, list)),
    )
