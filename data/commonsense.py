"""SIQA, ARC-Challenge, BoolQ (paper Table 3): this project's protocol, in the LLM-Adapters format.

LoFiT's public code has no data or code for these tasks. The paper compares against LoRA, RED and
LoReFT, whose common protocol is the LLM-Adapters commonsense format; this module follows it as
LoReFT's code applies it (plain "%s\\n" template, no Alpaca header):
    prompt = instruction + "\\n"
    answer = "the correct answer is " + keyword      (keyword: answer1..answer5 | true | false)
    loss on the answer tokens and EOS; evaluation: greedy decoding of 32 tokens from `prompt`, the
    first keyword found in the output (regex answer1|...|answer5, or true|false) must equal
    references[0].
Instructions (exactly LLM-Adapters'):
    SIQA: "Please choose the correct answer to the question: {context} {question}\\n\\n
           Answer1: {A} Answer2: {B} Answer3: {C}\\n\\nAnswer format: answer1/answer2/answer3"
    ARC:  the same with the question's 3 to 5 choices; BoolQ: "Please answer the following question
           with true or false, question: {question}?\\n\\nAnswer format: true/false" (no passage).
Splits:
    test  = LLM-Adapters test.json: SIQA dev (1954), ARC-Challenge test (1172), BoolQ dev (3270).
    pool  = the training set: LLM-Adapters train.json for ARC (1119) and BoolQ (9427); for SIQA
            (which LLM-Adapters ships only inside a 170k mixture) the official train.jsonl +
            train-labels (33410), formatted with the instruction above.
    val   = VAL_SIZE records of the pool drawn with random.Random(VAL_SEED) (fixed, so the same for
            every training seed).
    train = the rest of the pool, in file order, then `train_size` (default 500, the paper's cap)
            drawn with random.Random(seed).sample, the rule LoFiT uses for --train_size.
"""
from __future__ import annotations

import os
import random

from .common import DataError, Example, subsample
from .readers import field, load_records

VAL_SIZE = 200
VAL_SEED = 42
ANSWER_PREFIX = "the correct answer is "
SIQA_INSTRUCTION = ("Please choose the correct answer to the question: {context} {question}\n\n"
                    "Answer1: {answerA} Answer2: {answerB} Answer3: {answerC}\n\n"
                    "Answer format: answer1/answer2/answer3")


def load(task: str, split: str, data_dir: str | os.PathLike | None,
         train_size: int | None, seed: int) -> list[Example]:
    """Examples of one split of siqa, arc_challenge or boolq (see the module docstring)."""
    if split == "test":
        return _llm_adapters_file(task, "test", data_dir)
    pool = _training_pool(task, data_dir)
    val_ids = set(random.Random(VAL_SEED).sample(range(len(pool)), VAL_SIZE))
    if split == "val":
        return [pool[i] for i in sorted(val_ids)]
    rest = [example for i, example in enumerate(pool) if i not in val_ids]
    return subsample(rest, train_size, seed, f"{task} train")


def siqa_instruction(record: dict, where: str) -> str:
    """LLM-Adapters' instruction for one raw SIQA record."""
    return SIQA_INSTRUCTION.format(**{key: field(record, key, where) for key in
                                      ("context", "question", "answerA", "answerB", "answerC")})


def _training_pool(task: str, data_dir: str | os.PathLike | None) -> list[Example]:
    if task != "siqa":
        return _llm_adapters_file(task, "train", data_dir)
    records = load_records("siqa/raw/train.jsonl", data_dir)
    labels = load_records("siqa/raw/train-labels.txt", data_dir)
    pool = []
    for i, (record, label) in enumerate(zip(records, labels)):
        where = f"siqa/raw/train.jsonl line {i + 1}"
        if label not in ("1", "2", "3"):
            raise DataError(f"siqa/raw/train-labels.txt line {i + 1}: label {label!r} is not 1, 2 or 3")
        pool.append(_example(str(i), siqa_instruction(record, where), "answer" + label))
    return pool


def _llm_adapters_file(task: str, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
    relpath = f"{task}/llm_adapters/{split}.json"
    return [_from_llm_adapters(str(i), record, f"{relpath} item {i}")
            for i, record in enumerate(load_records(relpath, data_dir))]


def _from_llm_adapters(row_id: str, record: dict, where: str) -> Example:
    keyword = field(record, "answer", where)
    if field(record, "output", where) != ANSWER_PREFIX + keyword:
        raise DataError(f"{where}: output should be {ANSWER_PREFIX + keyword!r}; not the LLM-Adapters format")
    return _example(row_id, field(record, "instruction", where), keyword)


def _example(row_id: str, instruction: str, keyword: str) -> Example:
    prompt = instruction + "\n"
    return Example(id=row_id, prompt=prompt, answer=ANSWER_PREFIX + keyword,
                   eval_prompt=prompt, references=[keyword])
