"""eval.py on the real stories260K model (tests/assets) and real task rows (data/splits; BoolQ from ../shared).

The independent reference is transformers' LlamaForCausalLM with SentencePiece used directly,
scoring each candidate the way ITI's / LoFiT's tqa_run_probs does: one unbatched forward pass over
the full prompt, log-probs of the tokens from len(tokens(context)) + 3 on (the 3 being "\\nA:").
"""
import pytest
import torch

from conftest import STORIES260K, data_dir_for, shared_path
from data import load_examples
from data.truthfulqa import INSTRUCTION, QA_PRIMER
from eval import answer_scores, evaluate, mc_sequences, shared_prefix_length
from metrics import clutrr_extract, mquake_prediction
from model import Llama
from tokenizer import load_tokenizer

N_QUESTIONS = 10


@pytest.fixture(scope="module")
def stories():
    directory = STORIES260K
    return Llama.from_pretrained(str(directory)), load_tokenizer(str(directory)), directory


@pytest.fixture(scope="module")
def hf_model(stories):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(str(stories[2]), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sp(stories):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(stories[2] / "tokenizer.model"))


@pytest.fixture(scope="module")
def questions():
    return load_examples("truthfulqa", "test", fold=0)[:N_QUESTIONS]


@pytest.fixture(scope="module")
def tqa_result(stories, questions):
    model, tok, _ = stories
    return evaluate(model, tok, "truthfulqa", questions, batch_size=8, progress=False)


def reference_score(hf_model, sp, context: str, answer: str) -> float:
    """The original recipe, written out: full forward, slice from L - 1, drop the 3 '\\nA:' tokens."""
    prompt_ids = [sp.bos_id()] + sp.encode(context)
    full_ids = torch.tensor([[sp.bos_id()] + sp.encode(context + "\nA: " + answer)])
    with torch.no_grad():
        logp = hf_model(full_ids).logits[0].log_softmax(-1)  # (T, V)
    L = len(prompt_ids)
    logp = logp[L - 1:-1].gather(-1, full_ids[0, L:, None])[:, 0]
    return float(logp[3:].sum())


def test_candidate_text_is_the_paper_prompt(stories, questions):
    _, tok, _ = stories
    ex = questions[0]
    sequences, start, answers = mc_sequences(tok, ex)
    assert answers == ex.true_answers + ex.false_answers
    text = tok.decode(sequences[0])
    expected = INSTRUCTION + "\n\n" + QA_PRIMER + "\n\nQ: " + ex.question + "\nA: " + answers[0]
    # stories260K's normaliser folds repeated spaces; compare modulo that.
    assert " ".join(text.split()) == " ".join(expected.split())
    assert text.startswith("Interpret each question literally") and "\u201cI have no comment\u201d" in text
    assert "Barcelona, Spain.\n\nQ: " + ex.question + "\nA: " in text


@pytest.mark.parametrize("tokenizer_dir", ["stories260K", "llama2_tokenizer"])
def test_answer_span_matches_the_original_rule(tokenizer_dir, questions):
    """Our answer start (tokens of context + "\\nA:") equals the original's len(tokens(context)) + 3,
    and the full text's tokens begin with exactly those tokens, for every candidate."""
    import sentencepiece
    directory = STORIES260K if tokenizer_dir == "stories260K" else shared_path("weights", tokenizer_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = load_tokenizer(str(directory))
    for ex in questions:
        sequences, start, answers = mc_sequences(tok, ex)
        assert start == 1 + len(sp.encode(ex.eval_prompt)) + 3
        head = [sp.bos_id()] + sp.encode(ex.eval_prompt + "\nA:")
        for seq, answer in zip(sequences, answers):
            assert seq == [sp.bos_id()] + sp.encode(ex.eval_prompt + "\nA: " + answer)
            assert seq[:start] == head and len(seq) > start


def test_every_candidate_score_matches_transformers(tqa_result, questions, hf_model, sp):
    checked = 0
    for ex, row in zip(questions, tqa_result["details"]):
        assert [c["answer"] for c in row["true"]] == ex.true_answers
        assert [c["answer"] for c in row["false"]] == ex.false_answers
        for cand in row["true"] + row["false"]:
            ref = reference_score(hf_model, sp, ex.eval_prompt, cand["answer"])
            assert cand["score"] == pytest.approx(ref, abs=1e-4), (ex.id, cand["answer"])
            checked += 1
    assert checked >= 5 * N_QUESTIONS


def test_metrics_follow_from_the_scores(tqa_result):
    for row in tqa_result["details"]:
        true = [c["score"] for c in row["true"]]
        false = [c["score"] for c in row["false"]]
        best = true[[c["answer"] for c in row["true"]].index(row["best_answer"])]
        assert row["mc1"] == float(best > max(false))
        assert row["mc3"] == pytest.approx(sum(t > max(false) for t in true) / len(true))
        mass = [torch.tensor(s, dtype=torch.float64).exp() for s in true + false]
        assert row["mc2"] == pytest.approx(float(sum(mass[:len(true)]) / sum(mass)), rel=1e-9)
    summary = tqa_result["summary"]
    assert summary["n"] == N_QUESTIONS
    for m in ("mc1", "mc2", "mc3"):
        assert summary[m] == pytest.approx(sum(r[m] for r in tqa_result["details"]) / N_QUESTIONS)


def test_prefix_cached_scores_equal_full_prompt_scores(stories, questions):
    model, tok, _ = stories
    seqs, starts = [], []
    for ex in questions[:4]:
        s, start, _ = mc_sequences(tok, ex)
        seqs += s
        starts += [start] * len(s)
    prefix_len = shared_prefix_length(seqs, starts)
    assert prefix_len > 400  # instruction + primer: the bulk of every prompt is cached
    cached = answer_scores(model, seqs, starts, batch_size=5, prefix_cache=True)
    full = answer_scores(model, seqs, starts, batch_size=5, prefix_cache=False)
    one_by_one = answer_scores(model, seqs, starts, batch_size=1, prefix_cache=False)
    assert cached == pytest.approx(full, abs=1e-4)
    assert full == pytest.approx(one_by_one, abs=1e-4)
    # and our own model, unbatched, straight from the logits
    for seq, start, score in zip(seqs[:6], starts, cached):
        with torch.no_grad():
            logp = model(torch.tensor([seq]))[0].log_softmax(-1)
        direct = sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq)))
        assert score == pytest.approx(direct, abs=1e-4)


def test_shared_prefix_is_the_common_token_prefix():
    # The cached prefix is whatever the token ids share, capped one short of the earliest answer.
    seqs = [[1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 2], [1, 5, 6, 3, 3, 3, 3]]
    assert shared_prefix_length(seqs, [4, 4, 4]) == 3
    assert shared_prefix_length(seqs, [3, 4, 5]) == 2  # the logit for token 3 needs position 2
    assert shared_prefix_length([[1, 2, 3, 4]], [2]) == 1
    assert shared_prefix_length([[1, 2, 3], [4, 2, 3]], [2, 2]) == 0


def test_truthfulqa_in_bfloat16_is_close(stories, questions, tqa_result):
    model, tok, directory = stories
    bf16 = Llama.from_pretrained(str(directory), dtype=torch.bfloat16)
    result = evaluate(bf16, tok, "truthfulqa", questions[:3], batch_size=4, progress=False)
    for row, ref in zip(result["details"], tqa_result["details"]):
        for cand, ref_cand in zip(row["true"] + row["false"], ref["true"] + ref["false"]):
            assert cand["score"] == pytest.approx(ref_cand["score"], rel=0.05)


# ---------------------------------------------------------------------------------------------
# Generation tasks: batched left-padded greedy decoding vs transformers' generate, one prompt at a time


def hf_greedy(hf_model, sp, prompt: str, max_new_tokens: int):
    """(decoded prompt + generation, decoded generation) from transformers, unbatched."""
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=sp.eos_id(), pad_token_id=sp.eos_id())
    new = out[0, ids.shape[1]:].tolist()
    new = new[:new.index(sp.eos_id())] if sp.eos_id() in new else new
    decoded = sp.decode(ids[0].tolist() + new)
    return decoded, decoded[len(sp.decode(ids[0].tolist())):]


@pytest.mark.parametrize("task", ["mquake", "clutrr", "boolq"])
def test_generation_matches_transformers(task, stories, hf_model, sp):
    model, tok, _ = stories
    examples = load_examples(task, "test", data_dir=data_dir_for(task))[:5]
    result = evaluate(model, tok, task, examples, batch_size=3, progress=False)  # mixed lengths: padding
    for ex, row in zip(examples, result["details"]):
        decoded, generation = hf_greedy(hf_model, sp, ex.eval_prompt, 32 if task == "boolq" else 16)
        assert row["generation"] == generation
        assert row["prompt"] == ex.eval_prompt and row["references"] == ex.references
        if task == "mquake":
            assert row["prediction"] == mquake_prediction(decoded)
            assert row["prediction"] == decoded.split("A:")[-1].split("\n")[0].lower()
            assert row["prediction_stripped"] == row["prediction"].strip()
        elif task == "clutrr":
            assert row["prediction"] == clutrr_extract(decoded) == \
                decoded.split("'s\n")[1].split(".")[0].strip().lower()
        assert row["correct"] == (row["prediction"] in [r.lower() for r in ex.references]) \
            if task != "boolq" else row["correct"] == (row["prediction"] == ex.references[0])
    summary = result["summary"]
    assert summary["accuracy"] == sum(r["correct"] for r in result["details"]) / len(examples)
    assert ("accuracy_stripped" in summary) == (task == "mquake")


def test_mquake_decoded_text_keeps_the_space_after_a_colon(stories):
    """The rule reads the decode of prompt + generation: a generated leading space survives there
    (it would vanish if only the new tokens were decoded), so ' Paris' is wrong unstripped."""
    model, tok, _ = stories
    prompt_ids = tok.encode("Q: Where? A:")
    answer_ids = tok.encode(" Paris", bos=False)
    assert tok.decode(prompt_ids + answer_ids).endswith("A: Paris")
    assert mquake_prediction(tok.decode(prompt_ids + answer_ids)) == " paris"
