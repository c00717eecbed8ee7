"""CLUTRR: LoFiT's 2-hop (task_1.2) splits, train/val/test = 3151/450/450; training uses 300 of train.

For a record:
    story      = clean_story with "[" and "]" removed
    per1, per2 = query[1:-1].replace("'", "").split(",")   (per2 keeps its leading space, so the
                 prompt has double spaces before per2: reproduced on purpose)
    prompt     = TEMPLATE.format(story, per2, per1, per2, per1) + "\\n"
    answer     = target_text
The original trains on prompt + answer + EOS and puts the loss after "'s\\n", so the newline belongs
to the prompt here; `prompt` is also the evaluation prompt. The 300 training examples are drawn as
the original draws them: random.seed(seed); random.sample(records_as_loaded, 300), seed 42.
Evaluation: greedy decoding of 16 tokens; pred = decoded.split("'s\\n")[1].split(".")[0].strip().lower();
correct iff pred == target_text.lower().
"""
from __future__ import annotations

import os

from .common import DataError, Example, subsample
from .readers import field, load_records

TEMPLATE = ("Read the following story about a family. \"{}\" Assume the relations described in the story "
            "are all true. Based on relations between the fictional characters in the story (assume the "
            "relations are all true) and your commonsense knowledge about family relationship, how is {} "
            "related to {}? Answer: {} is {} 's")


def load(split: str, data_dir: str | os.PathLike | None, train_size: int | None, seed: int) -> list[Example]:
    """Examples of one CLUTRR split (train: `train_size` drawn with `seed`, LoFiT uses 300 and 42)."""
    relpath = f"clutrr/{split}.json"
    examples = [_example(record, f"{relpath} record {i}")
                for i, record in enumerate(load_records(relpath, data_dir))]
    if split == "train":
        # Examples map 1:1 onto records, so sampling them equals the original's sampling of records.
        examples = subsample(examples, train_size, seed, "clutrr train")
    return examples


def _example(record: dict, where: str) -> Example:
    story = field(record, "clean_story", where).replace("[", "").replace("]", "")
    persons = field(record, "query", where)[1:-1].replace("'", "").split(",")
    if len(persons) != 2:
        raise DataError(f"{where}: query should name two persons, like \"('Herman', 'Rosalee')\"")
    per1, per2 = persons
    target = field(record, "target_text", where)
    prompt = TEMPLATE.format(story, per2, per1, per2, per1) + "\n"
    return Example(
        id=field(record, "id", where),
        prompt=prompt,
        answer=target,
        eval_prompt=prompt,
        references=[target],
    )
