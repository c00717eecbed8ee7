"""What every task module shares: the Example record, per-task facts, the error type, subsampling.

An Example is one record exactly as the model sees it. For training, the text is always
`prompt + answer` (plain string concatenation, nothing added in between) and the loss falls on the
answer's tokens plus the EOS that follows (see data/tokenize.py). Evaluation uses `eval_prompt`
and `references` (generation tasks) or the TruthfulQA multiple-choice fields.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from model import LofitError

TASKS = ("truthfulqa", "mquake", "clutrr", "siqa", "arc_challenge", "boolq")
SPLITS = ("train", "val", "test")


class DataError(LofitError, ValueError):
    """A data problem (unknown task, missing or corrupt file, bad record); the message says what to do."""


@dataclass
class Example:
    """One record as the model sees it.

    Attributes:
        id: Source record id (MQuAKE case_id, CLUTRR id) or, where the source has none, the
            0-based row index in its file (TruthfulQA CSV row, SIQA/ARC/BoolQ list index).
        prompt: Text before the loss-bearing tokens, e.g. "Q: {question} A:".
        answer: Cross-entropy target / DPO chosen answer, appended to `prompt` with no space;
            EOS is added at tokenization, never written into the text.
        rejected: DPO rejected answer (TruthfulQA only).
        eval_prompt: Text given to the model at evaluation. Generation tasks: the text to continue.
            TruthfulQA: the multiple-choice context; each candidate is scored as
            eval_prompt + "\\nA: " + candidate (see data/truthfulqa.py).
        references: Acceptable answers for scoring (MQuAKE: [new_answer] + aliases;
            CLUTRR: [target_text]; SIQA/ARC/BoolQ: [answer keyword such as "answer2" or "true"]).
        question: TruthfulQA question.
        best_answer: TruthfulQA best answer, formatted for MC scoring (trailing "." added).
        true_answers: TruthfulQA correct answers, formatted for MC scoring.
        false_answers: TruthfulQA incorrect answers, formatted for MC scoring.
    """
    id: str
    prompt: str
    answer: str
    rejected: str | None = None
    eval_prompt: str = ""
    references: list[str] = field(default_factory=list)
    question: str = ""
    best_answer: str = ""
    true_answers: list[str] = field(default_factory=list)
    false_answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskInfo:
    """Fixed facts about a task.

    Attributes:
        name: Task name (a member of TASKS).
        loss: "dpo" (TruthfulQA) or "ce" (cross-entropy on answer + EOS).
        metric: "mc" (TruthfulQA MC1/MC2/MC3) or "generate" (greedy decoding, then matching).
        max_len: Longest training sequence in tokens, BOS and EOS included (the original's limit).
        max_prompt_len: DPO only: the prompt is cut to this many tokens if a pair is too long.
        max_new_tokens: Tokens generated at evaluation (generation tasks).
        train_size: Default number of training examples (None: the whole training file).
        folds: Valid values of `fold` (TruthfulQA has two cross-validation folds).
        paper_table: Where the paper reports the task.
        answer_pattern: SIQA/ARC/BoolQ: regex of the answer keywords; the first match in the
            generated text is the prediction (LLM-Adapters' extract_answer).
    """
    name: str
    loss: str
    metric: str
    max_len: int = 400
    max_prompt_len: int | None = None
    max_new_tokens: int = 16
    train_size: int | None = None
    folds: tuple[int, ...] = (0,)
    paper_table: str = "Table 1"
    answer_pattern: str | None = None


CHOICE_PATTERN = "answer1|answer2|answer3|answer4|answer5"

TASK_INFO: dict[str, TaskInfo] = {
    # trl 0.8.1's DPOTrainer: max_length defaults to 512; LoFiT passed max_prompt_length=128.
    "truthfulqa": TaskInfo("truthfulqa", loss="dpo", metric="mc", max_len=512, max_prompt_len=128,
                           folds=(0, 1)),
    "mquake": TaskInfo("mquake", loss="ce", metric="generate"),
    # LoFiT's scripts train CLUTRR on 300 examples drawn from train.json.
    "clutrr": TaskInfo("clutrr", loss="ce", metric="generate", train_size=300),
    # Commonsense tasks: this project's protocol (see data/commonsense.py).
    "siqa": TaskInfo("siqa", loss="ce", metric="generate", max_len=512, max_new_tokens=32,
                     train_size=500, paper_table="Table 3", answer_pattern=CHOICE_PATTERN),
    "arc_challenge": TaskInfo("arc_challenge", loss="ce", metric="generate", max_len=512,
                              max_new_tokens=32, train_size=500, paper_table="Table 3",
                              answer_pattern=CHOICE_PATTERN),
    "boolq": TaskInfo("boolq", loss="ce", metric="generate", max_len=512, max_new_tokens=32,
                      train_size=500, paper_table="Table 3", answer_pattern="true|false"),
}


def subsample(records: list, size: int | None, seed: int, what: str) -> list:
    """Draw `size` records the way LoFiT's trainer does: random.seed(seed); random.sample(records, size).

    The draw uses a private random.Random(seed), which yields the same sample as seeding the
    module-level generator, without touching global state.

    Args:
        records: The records, in file order.
        size: How many to keep; None or 0 keeps them all (in file order).
        seed: Seed of the draw.
        what: Name used in the error message, e.g. "clutrr train".

    Returns:
        The sample, in the order random.sample returns it.
    """
    if not size:
        return list(records)
    if size < 0 or size > len(records):
        raise DataError(f"--train-size {size} is impossible for {what}: it has {len(records)} records; "
                        f"pass a number between 1 and {len(records)} (or 0 for all)")
    return random.Random(seed).sample(records, size)
