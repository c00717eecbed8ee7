"""Write a task's examples exactly as the model sees them, one JSON object per line.

    python -m data --task clutrr --split train --dump clutrr_train.jsonl
    python -m data --task truthfulqa --split test --fold 1 --data-dir ../shared/datasets --dump tqa.jsonl

Each line holds the record id, the prompt, the answer (the training text is prompt + answer,
then EOS), and whatever else the task uses (DPO rejected answer, evaluation prompt, references,
TruthfulQA multiple-choice answers); empty fields are left out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from storage.atomic import WriteError, write_text_atomically

from . import SPLITS, TASKS, DataError, load_examples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--fold", type=int, default=0, help="TruthfulQA fold, 0 or 1 (default 0)")
    parser.add_argument("--data-dir", default=None,
                        help="local copy laid out like ../shared/datasets (default: $LOFIT_DATA_DIR, else "
                             "data/splits/ for LoFiT's tasks and the download cache for SIQA/ARC/BoolQ)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train split: number of examples to draw (default: the task's own; 0 = all)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --train-size draw (default 42)")
    parser.add_argument("--dump", required=True, type=Path, help="output .jsonl file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dump.is_dir():
        print(f"error: --dump {args.dump} is a directory; give a file name such as "
              f"{args.dump / f'{args.task}_{args.split}.jsonl'}", file=sys.stderr)
        return 2
    try:
        examples = load_examples(args.task, args.split, fold=args.fold, data_dir=args.data_dir,
                                 train_size=args.train_size, seed=args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # like train.py, eval.py and iti.py
    lines = [json.dumps({k: v for k, v in dataclasses.asdict(ex).items() if v not in ("", [], None)},
                        ensure_ascii=False) + "\n" for ex in examples]
    try:
        write_text_atomically(args.dump, "".join(lines))
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(examples)} {args.task} {args.split} examples to {args.dump}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
