"""Every LoFiT task, with the paper's splits, prompts and training examples.

    from data import load_examples, tokenize_ce, collate
    examples = load_examples("clutrr", "train")          # the 300 examples LoFiT trains on
    ids, mask = tokenize_ce(tokenizer, examples[0].prompt, examples[0].answer)

Tasks: truthfulqa, mquake, clutrr (paper Table 1; LoFiT's own split files) and siqa, arc_challenge,
boolq (paper Table 3; this project's protocol, see data/commonsense.py). LoFiT's own splits are in
the repository (data/splits/, with their licences); SIQA / ARC / BoolQ are downloaded once from
pinned sources into ~/.cache/lofit; a local directory (data_dir / $LOFIT_DATA_DIR, laid out like
../shared/datasets) replaces both (data/download.py). Every file is checked by sha256.
Inspect exactly what the model sees with `python -m data --task T --split S --dump FILE.jsonl`.
"""
from __future__ import annotations

import os

from . import clutrr, commonsense, mquake, truthfulqa
from .common import SPLITS, TASK_INFO, TASKS, DataError, Example, TaskInfo
from .tokenize import TrainData, collate, tokenize_ce, tokenize_dpo, tokenize_training_set

__all__ = ["TASKS", "SPLITS", "TASK_INFO", "DataError", "Example", "TaskInfo", "TrainData", "load_examples",
           "tokenize_ce", "tokenize_dpo", "tokenize_training_set", "collate"]


def load_examples(task: str, split: str, *, fold: int = 0, data_dir: str | os.PathLike | None = None,
                  train_size: int | None = None, seed: int = 42) -> list[Example]:
    """Load one split of one task as the model sees it.

    Args:
        task: One of TASKS.
        split: "train", "val" or "test".
        fold: TruthfulQA cross-validation fold, 0 or 1; must stay 0 for the other tasks.
        data_dir: Local directory laid out like ../shared/datasets; None uses $LOFIT_DATA_DIR, or
            else the repository's copy (LoFiT's splits) or the download cache (SIQA / ARC / BoolQ).
        train_size: Training split only: how many examples to draw (random.seed(seed);
            random.sample(records, n), as LoFiT does). None uses the task's default
            (TASK_INFO[task].train_size: CLUTRR 300, SIQA/ARC/BoolQ 500, others all); 0 keeps all.
        seed: Seed of that draw.

    Returns:
        The examples; test and val splits in file order.

    Raises:
        DataError: unknown task, split or fold, a misplaced option, or a missing/corrupt file.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    info = TASK_INFO[task]
    if fold not in info.folds:
        raise DataError(f"{task} has no fold {fold}; its folds are {info.folds}")
    if train_size is not None and split != "train":
        raise DataError(f"train_size applies to the train split only, not {split!r}")
    size = info.train_size if train_size is None else train_size
    if task == "truthfulqa":
        return truthfulqa.load(split, fold, data_dir, size, seed)
    if task == "mquake":
        return mquake.load(split, data_dir, size, seed)
    if task == "clutrr":
        return clutrr.load(split, data_dir, size, seed)
    return commonsense.load(task, split, data_dir, size, seed)
