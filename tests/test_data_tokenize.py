"""data/tokenize.py: token ids and loss masks equal the original pipeline's, for Llama-2 and stories260K.

The independent reference for cross-entropy examples is the original's own recipe, run with a
Hugging Face tokenizer (transformers, test-only): tokenize prompt + answer + "</s>" after BOS, then
mask through the last occurrence of the response template's ids (trl's
DataCollatorForCompletionOnlyLM with LoFiT's templates " A:" and " 's\\n", ids[2:]).
"""
import pytest
import sentencepiece
import torch

from conftest import STORIES260K, shared_path
from data import collate, load_examples, tokenize_ce, tokenize_dpo
from tokenizer import load_tokenizer

TOKENIZERS = {"llama2": lambda: shared_path("weights", "llama2_tokenizer"), "stories260K": lambda: STORIES260K}
TEMPLATES = {"mquake": " A:", "clutrr": " 's\n"}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizers(request):
    """(our tokenizer, the Hugging Face tokenizer of the same file) for one tokenizer model."""
    directory = TOKENIZERS[request.param]()
    from transformers import AutoTokenizer
    return load_tokenizer(str(directory)), AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def llama2():
    directory = shared_path("weights", "llama2_tokenizer")
    return load_tokenizer(str(directory)), sentencepiece.SentencePieceProcessor(
        model_file=str(directory / "tokenizer.model"))


def original_ce(hf, prompt, answer, template, max_len=400):
    """LoFiT's SFT path: BOS + tokens(prompt + answer + "</s>"), cut to max_len, loss after the template."""
    ids = ([1] + hf(prompt + answer + "</s>", add_special_tokens=False)["input_ids"])[:max_len]
    template_ids = hf.encode(template, add_special_tokens=False)[2:]
    starts = [i for i in range(len(ids)) if ids[i:i + len(template_ids)] == template_ids]
    if not starts:  # the cut removed the template: the collator masks the whole sequence
        return ids, [False] * len(ids)
    first_answer = starts[-1] + len(template_ids)
    return ids, [i >= first_answer for i in range(len(ids))]


@pytest.mark.parametrize("task", ["mquake", "clutrr"])
def test_ce_masks_equal_the_original_pipeline_on_every_training_record(tokenizers, task):
    ours, hf = tokenizers
    examples = load_examples(task, "train", train_size=0) + load_examples(task, "val")
    for ex in examples:
        expected = original_ce(hf, ex.prompt, ex.answer, TEMPLATES[task])
        assert tokenize_ce(ours, ex.prompt, ex.answer) == expected, ex.id


@pytest.mark.parametrize("task", ["mquake", "clutrr"])
def test_an_overlong_prompt_trains_on_nothing_where_the_original_did_so_for_clutrr_only(tokenizers, task):
    """A prompt longer than the 400-token cut: no loss here; the original's collator kept none for CLUTRR
    (no template left) but, for MQuAKE, trained on the prompt tokens after the last ':' that survived."""
    ours, hf = tokenizers
    ex = load_examples(task, "val")[0]
    prompt = ex.prompt.replace("family. ", "family. " + "very " * 400, 1) if task == "clutrr" else \
        ex.prompt.replace("Q: ", "Q: " + "very " * 400, 1)
    ids, mask = tokenize_ce(ours, prompt, ex.answer)
    assert len(ids) == 400 and not any(mask)
    original_ids, original_mask = original_ce(hf, prompt, ex.answer, TEMPLATES[task])
    assert original_ids == ids
    if task == "clutrr":
        assert original_mask == mask
    else:  # loss on the padding words after "Q:", which are prompt text
        first = original_mask.index(True)
        assert all(original_mask[first:]) and first < 10
        assert hf.decode(ids[first:first + 3]).strip().startswith("very")


def test_ce_hand_computed_example(llama2):
    ours, sp = llama2
    ids, mask = tokenize_ce(ours, "Q: Can pigs fly? A:", "No")
    pieces = ["<s>", "▁Q", ":", "▁Can", "▁p", "igs", "▁fly", "?", "▁A", ":", "No", "</s>"]
    assert ids == [sp.piece_to_id(p) for p in pieces]
    assert mask == [False] * 10 + [True, True]


def test_ce_truncation_keeps_the_first_tokens_and_may_leave_no_answer(llama2):
    ours, _ = llama2
    ids, mask = tokenize_ce(ours, "Q: Can pigs fly? A:", "No, pigs cannot fly")
    cut_ids, cut_mask = tokenize_ce(ours, "Q: Can pigs fly? A:", "No, pigs cannot fly", max_len=12)
    assert (cut_ids, cut_mask) == (ids[:12], mask[:12])
    # The prompt fills max_len: the original's collator found no response template, every label -100.
    full_ids, _ = tokenize_ce(ours, "Q: Can pigs fly? A:", "No")
    cut_ids, cut_mask = tokenize_ce(ours, "Q: Can pigs fly? A:", "No", max_len=10)
    assert cut_ids == full_ids[:10] and not any(cut_mask)


def test_dpo_pair_without_merge(llama2):
    ours, sp = llama2
    out = tokenize_dpo(ours, "Q: Can pigs fly? A:", "No", "Yes")
    prompt = ["<s>", "▁Q", ":", "▁Can", "▁p", "igs", "▁fly", "?", "▁A", ":"]
    assert out["chosen_input_ids"] == [sp.piece_to_id(p) for p in prompt + ["No", "</s>"]]
    assert out["rejected_input_ids"] == [sp.piece_to_id(p) for p in prompt + ["Yes", "</s>"]]
    assert out["chosen_loss_mask"] == out["rejected_loss_mask"] == [False] * 10 + [True, True]


def test_dpo_merged_boundary_token_counts_as_answer(llama2):
    # ':' + '"' merge into one token ':"' with Llama-2; trl 0.8.1 then moves the answer start back by one.
    ours, sp = llama2
    prompt, chosen, rejected = "Q: What is the song about? A:", '"Puff" is about smoking', "It is about a dragon"
    out = tokenize_dpo(ours, prompt, chosen, rejected)
    for side, answer, boundary in (("chosen", chosen, ':"'), ("rejected", rejected, ":")):
        ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
        assert ids == [1] + sp.encode(prompt + answer) + [2]
        pieces = [sp.id_to_piece(i) for i in ids]
        first_answer = mask.index(True)
        assert mask == [i >= first_answer for i in range(len(ids))]
        assert pieces[first_answer - 1:first_answer + 1] == (["▁A", ':"'] if side == "chosen" else [":", "It"])
        assert boundary in pieces


def test_dpo_truncation_follows_trl_keep_end(llama2):
    ours, sp = llama2
    prompt, chosen, rejected = "Q: Can pigs fly? A:", "No, pigs cannot fly", "Yes"
    full = tokenize_dpo(ours, prompt, chosen, rejected)
    n_prompt = 10  # <s> ... ':' (see test_dpo_pair_without_merge)
    out = tokenize_dpo(ours, prompt, chosen, rejected, max_len=12, max_prompt_len=4)
    # The longer answer (chosen: 6 tokens + EOS = 7) plus the 10-token prompt exceeds 12, so the prompt
    # keeps its last 4 tokens; 4 + 7 fits in 12, so the answers stay whole.
    assert out["chosen_input_ids"] == full["chosen_input_ids"][n_prompt - 4:]
    assert out["chosen_loss_mask"] == [False] * 4 + [True] * 7
    out = tokenize_dpo(ours, prompt, chosen, rejected, max_len=8, max_prompt_len=4)
    # 4 + 7 > 8, so answers are cut to max_len - max_prompt_len = 4 tokens (the EOS is lost).
    assert out["chosen_input_ids"] == full["chosen_input_ids"][n_prompt - 4:n_prompt + 4]
    assert out["rejected_input_ids"] == full["rejected_input_ids"][n_prompt - 4:]
    assert out["rejected_loss_mask"] == [False] * 4 + [True, True]


def test_dpo_on_truthfulqa_uses_best_and_first_incorrect(tokenizers):
    ours, hf = tokenizers
    for ex in load_examples("truthfulqa", "train")[:40]:
        out = tokenize_dpo(ours, ex.prompt, ex.answer, ex.rejected)
        for side, answer in (("chosen", ex.answer), ("rejected", ex.rejected)):
            ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
            assert ids == [1] + hf(ex.prompt + answer, add_special_tokens=False)["input_ids"] + [2]
            assert mask[-1] and not mask[0] and mask == sorted(mask)  # one prompt run, then answer + EOS


def test_collate_right_pads():
    batch = collate([([1, 5, 6, 2], [False, False, True, True]), ([1, 7], [False, True])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    with pytest.raises(ValueError):
        collate([([1, 2], [True])], pad_id=0)
    with pytest.raises(ValueError):
        collate([], pad_id=0)
