"""Token ids and loss masks for training, reproducing how LoFiT's pipeline tokenized and masked.

The tokenizer is any object with bos_id, eos_id and encode(text, bos=True, eos=False) -> list[int]
(tokenizer.py). A sequence is always BOS + tokens(prompt + answer) + EOS, the text being one string
(SentencePiece may merge characters across the prompt/answer boundary, so the two halves are never
tokenized separately). A loss mask is True on the tokens whose log-probability counts: the answer's
tokens and the final EOS. Position t is predicted from position t - 1, so loss_mask[0] is False.

Where the answer starts (`answer_start`): the rule of trl 0.8.1's DPOTrainer.build_tokenized_answer.
With n = len(tokens(prompt)), the answer starts at token n of tokens(prompt + answer), or at n - 1
when the first n tokens differ from tokens(prompt) (the last prompt token merged with the start
of the answer; the merged token then counts as an answer token). Example with the Llama-2
tokenizer: "Q: ... A:" + '"Puff ..."' ends the prompt in ':' alone but in ':"' together.

- TruthfulQA (DPO, trl 0.8.1): that rule, BOS before and EOS after, and trl's truncation for pairs
  longer than max_len (prompt cut to its last max_prompt_len tokens, then answers cut).
- MQuAKE / CLUTRR (cross-entropy): the original tokenized prompt + answer + "</s>" with BOS, cut
  to 400 tokens, and masked everything up to the LAST occurrence of a response template's tokens
  (" A:" -> [":"] for MQuAKE, " 's\\n" -> ["s", "\\n"] for CLUTRR, with Llama-2). On every record of
  both datasets, for the Llama-2 and stories260K tokenizers, that masks exactly the tokens before
  `answer_start` (tests/test_data_tokenize.py checks it), so one general rule serves every task.
  Only a prompt longer than the cut is treated differently from the original's MQuAKE collator
  (see tokenize_ce).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import TASK_INFO, DataError


def answer_start(tokenizer, prompt: str, full_ids: list[int]) -> int:
    """Index in `full_ids` (BOS + tokens(prompt + answer)) of the first answer token (trl's rule)."""
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        start -= 1
    return start


def tokenize_ce(tokenizer, prompt: str, answer: str, max_len: int = 400) -> tuple[list[int], list[bool]]:
    """Ids and loss mask of one cross-entropy training example.

    Args:
        tokenizer: Has encode(text, bos, eos).
        prompt: Text before the answer (Example.prompt).
        answer: Target text (Example.answer), appended with no space.
        max_len: Sequences are cut to their first max_len tokens, as the original's SFT tokenization
            (truncation=True, max_length=400) did; the EOS is lost if the cut reaches it. A prompt
            of max_len tokens or more leaves no answer token: the mask is then all False and the
            example teaches nothing, for every task. The original differed by task, because its
            collator (trl's DataCollatorForCompletionOnlyLM) masks through the LAST occurrence of
            the template's ids within the kept tokens, and sets every label to -100 only when none
            is left. CLUTRR (template " 's\n" -> ["s", "\n"] with Llama-2): the prompt's only
            newline is its last character, so a cut prompt holds no template and the example
            trains on nothing, as here. MQuAKE (template " A:" -> [":"]): every prompt starts with
            "Q:", so a cut prompt still holds a ":" and the original trained on the prompt tokens
            after the last ":" that survived the cut (at least everything after "Q:"). No
            MQuAKE or CLUTRR record is that long with the Llama-2 tokenizer (at most 70 and 203
            tokens); with stories260K's 512-piece vocabulary 9 CLUTRR prompts are.

    Returns:
        (ids, loss_mask): ids = BOS + tokens(prompt + answer) + EOS; loss_mask True on the answer
        tokens and the EOS.
    """
    ids = tokenizer.encode(prompt + answer, bos=True, eos=True)
    start = answer_start(tokenizer, prompt, ids[:-1])
    mask = [i >= start for i in range(len(ids))]
    return ids[:max_len], mask[:max_len]


def tokenize_dpo(tokenizer, prompt: str, chosen: str, rejected: str,
                 max_len: int = 512, max_prompt_len: int = 128) -> dict[str, list]:
    """Ids and loss masks of one DPO pair, as trl 0.8.1's DPOTrainer.tokenize_row builds them.

    Args:
        tokenizer: Has bos_id, eos_id and encode(text, bos, eos).
        prompt: Example.prompt, e.g. "Q: {question} A:".
        chosen: Example.answer.
        rejected: Example.rejected.
        max_len: trl's max_length (512 by default; LoFiT did not set it).
        max_prompt_len: trl's max_prompt_length (LoFiT passed 128).

    Returns:
        {"chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"}: each
        sequence is BOS + tokens(prompt + answer) + EOS, its mask True on answer tokens and EOS.

    Raises:
        DataError: the two prompts tokenize differently beyond the one merged token trl allows.
    """
    halves = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.encode(prompt + answer, bos=True, eos=False)
        start = answer_start(tokenizer, prompt, full)
        halves[name] = (full[:start], full[start:] + [tokenizer.eos_id])
    (chosen_prompt, chosen_answer), (rejected_prompt, rejected_answer) = halves["chosen"], halves["rejected"]
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise DataError(f"chosen and rejected prompts tokenize differently beyond one merged token: {prompt!r}")
    longer_answer = max(len(chosen_answer), len(rejected_answer))
    out = {}
    for name, (prompt_ids, answer_ids) in halves.items():
        if len(prompt_ids) + longer_answer > max_len:
            prompt_ids = prompt_ids[-max_prompt_len:]  # trl's default truncation_mode "keep_end"
        if len(prompt_ids) + longer_answer > max_len:
            answer_ids = answer_ids[:max_len - max_prompt_len]
        out[f"{name}_input_ids"] = prompt_ids + answer_ids
        out[f"{name}_loss_mask"] = [False] * len(prompt_ids) + [True] * len(answer_ids)
    return out


def collate(batch: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, loss_mask) pairs.

    Returns:
        input_ids (B, T) long, padded with pad_id; attention_mask (B, T) long, 1 on real tokens;
        loss_mask (B, T) bool, False on padding.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)  # (B, T)
    for row, (ids, mask) in enumerate(batch):
        if len(ids) != len(mask):
            raise ValueError(f"example {row}: {len(ids)} ids but {len(mask)} mask entries")
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


@dataclass
class TrainData:
    """A task's tokenized training set: (ids, loss_mask) pairs for CE, tokenize_dpo dicts for DPO."""
    loss: str  # "ce" or "dpo"
    items: list
    pad_id: int
    reference: torch.Tensor | None = None  # DPO: (N, 2) base-model log-probs of chosen, rejected

    def normaliser(self, batch: list[int]) -> int:
        """What a global batch's loss is averaged over: its answer tokens (CE) or its pairs (DPO)."""
        if self.loss == "dpo":
            return len(batch)
        return max(1, sum(sum(self.items[i][1][1:]) for i in batch))  # 1: a batch of no-answer examples adds 0

    def tokens(self, batch: list[int]) -> int:
        """Tokens a global batch runs through the model (DPO: chosen and rejected sequences)."""
        if self.loss == "dpo":
            return sum(len(self.items[i][f"{side}_input_ids"]) for i in batch for side in ("chosen", "rejected"))
        return sum(len(self.items[i][0]) for i in batch)

    def sequences(self) -> list[list[int]]:
        """Every token sequence the model reads in training (both answers of a DPO pair)."""
        if self.loss == "dpo":
            return [item[f"{side}_input_ids"] for item in self.items for side in ("chosen", "rejected")]
        return [ids for ids, _ in self.items]

    def without_answer(self) -> int:
        """CE examples whose prompt fills the whole cut, so no answer token is left (they add no loss)."""
        return 0 if self.loss == "dpo" else sum(not any(mask[1:]) for _, mask in self.items)


def tokenize_training_set(task: str, examples, tokenizer) -> TrainData:
    """The training examples of `task` tokenized for its loss (TASK_INFO: CE or DPO, its length limits)."""
    info = TASK_INFO[task]
    if info.loss == "ce":
        items = [tokenize_ce(tokenizer, ex.prompt, ex.answer, max_len=info.max_len) for ex in examples]
    else:
        items = [tokenize_dpo(tokenizer, ex.prompt, ex.answer, ex.rejected, max_len=info.max_len,
                              max_prompt_len=info.max_prompt_len) for ex in examples]
    return TrainData(info.loss, items, tokenizer.pad_id)
