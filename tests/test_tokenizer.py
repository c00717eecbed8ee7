"""tokenizer.py against independent references: SentencePiece itself, transformers, hand-checked ids.

Where transformers is (and is not) a faithful reference for ``tokenizer.model`` files
(checked with transformers 5.24, sentencepiece 0.2.3):

* The reference is SentencePiece itself with BOS prepended: that is Meta's Llama-2 tokenizer and HF's
  legacy Llama-2 tokenizer ("Hello this is a test" -> [1, 15043, 445, 338, 263, 1243]).
* transformers' ``SentencePieceBackend`` (its sentencepiece-based base class; in transformers 4 the slow
  ``LlamaTokenizer(legacy=True)``) calls SentencePiece directly, so it agrees id for id, BOS/EOS included,
  on every text *except* text that spells a special token such as "<s>": transformers turns that into
  the BOS id, while SentencePiece (and Meta's tokenizer, and we) encode it as the characters "<", "s", ">".
  Its decode is not a reference: it leaves byte-fallback pieces as "<0x0A>" and drops leading spaces.
* transformers 5's ``LlamaTokenizer`` (a ``tokenizers`` BPE rebuilt from the vocab of tokenizer.model)
  is not faithful: loaded from a directory holding only tokenizer.model it adds no BOS, and it splits
  leading spaces and runs of spaces differently ("\\n  h" -> 13, 259, 29882 instead of SentencePiece's
  13, 29871, 298), because SentencePiece starts a new piece at every whitespace and that BPE does not.
  We compare with it only on text without leading spaces or runs of whitespace (e.g. TruthfulQA).

For ``tokenizer.json`` files the reference is transformers' ``PreTrainedTokenizerFast`` loaded from the
same directory (tokenizer_config.json included), on tokenizers trained here with the ``tokenizers`` library.
"""
import csv
import json
import re
import shutil

import pytest
import sentencepiece
import torch

from conftest import SPLITS_DIR, STORIES260K, shared_path
from storage import hub
from tokenizer import HFTokenizersTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

VARIED_TEXTS = [
    "Hello this is a test",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "a   b    c     d",
    "\n  h",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "\ttabs\tand\t\tdouble tabs",
    "digits 0123456789, 3.14159, -42, 1e-5, 2024-06-03",
    "héllo wörld, naïve café, Ñandú, Ελληνικά, Русский, 日本語のテキスト, 한국어, العربية",
    "emoji 😀👍🏽 and math ∑∫√∞ ≤ ≥ and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Q: What happens if you crack your knuckles a lot?\nA: Nothing in particular happens.",
    "code: def f(x):\n    return {'a': [1, 2]}  # comment",
    "MixedCASE and_under_scores and hyphen-ated words!?",
]
SPECIAL_LOOKING = "a literal <s> and </s> in text"


def truthfulqa_questions():
    path = SPLITS_DIR / "truthfulqa" / "fold_0_test_seed_42.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return [row["Question"] for row in csv.DictReader(f)]


SP_MODELS = {
    "llama2": lambda: shared_path("weights", "llama2_tokenizer", "tokenizer.model"),
    "stories260K": lambda: STORIES260K / "tokenizer.model",
}


@pytest.fixture(params=sorted(SP_MODELS))
def sp_model(request):
    """(our tokenizer, SentencePiece processor, path of tokenizer.model) for each shared model."""
    model_file = SP_MODELS[request.param]()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return load_tokenizer(str(model_file.parent)), sp, model_file


def hf_sentencepiece(model_file, eos: bool):
    """transformers' SentencePiece-based tokenizer, adding BOS (and EOS if asked)."""
    try:
        from transformers import SentencePieceBackend
    except ImportError:  # transformers 4: the slow LlamaTokenizer is the SentencePiece-based one
        from transformers import LlamaTokenizer
        return LlamaTokenizer(vocab_file=str(model_file), legacy=True, add_eos_token=eos)
    return SentencePieceBackend(vocab_file=str(model_file), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                special_tokens_pattern="bos_eos" if eos else "bos")


def test_llama2_golden_ids():
    tok = load_tokenizer(str(shared_path("weights", "llama2_tokenizer")))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello this is a test") == [1, 15043, 445, 338, 263, 1243]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 32000)  # no pad piece: pad = eos


def test_sentencepiece_matches_sentencepiece_itself(sp_model):
    tok, sp, _ = sp_model
    texts = VARIED_TEXTS + [SPECIAL_LOOKING] + truthfulqa_questions()
    assert tok.bos_id == sp.bos_id() == 1 and tok.eos_id == sp.eos_id() == 2
    for text in texts:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.encode(text, bos=False, eos=True) == sp.encode(text) + [2], text
        assert tok.encode(text, bos=False) == sp.encode(text), text
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []


def test_sentencepiece_matches_transformers_sentencepiece_backend(sp_model):
    tok, _, model_file = sp_model
    texts = VARIED_TEXTS + truthfulqa_questions()  # not SPECIAL_LOOKING: see the module docstring
    hf_bos, hf_bos_eos = hf_sentencepiece(model_file, eos=False), hf_sentencepiece(model_file, eos=True)
    for text in texts:
        assert tok.encode(text) == hf_bos.encode(text), text
        assert tok.encode(text, eos=True) == hf_bos_eos.encode(text), text


def test_sentencepiece_matches_transformers_llama_tokenizer_on_plain_text(sp_model, tmp_path):
    from transformers import LlamaTokenizer
    tok, _, model_file = sp_model
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))
    plain = [t for t in VARIED_TEXTS + truthfulqa_questions() if t and not re.search(r"^\s|\s\s", t)]
    assert len(plain) > 400
    for text in plain:  # BOS compared separately: this path adds none (module docstring)
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text


def test_sentencepiece_decode(sp_model):
    tok, sp, model_file = sp_model
    lossless = model_file.parent.name == "llama2_tokenizer"  # stories260K's normalizer collapses whitespace
    for text in VARIED_TEXTS + [SPECIAL_LOOKING] + truthfulqa_questions():
        ids = tok.encode(text, eos=True)
        assert tok.decode(ids) == sp.decode(sp.encode(text)), text
        assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
        if lossless or not re.search(r"^\s|\s$|\s\s", text):
            assert tok.decode(ids) == text, text  # identity normalizer + byte fallback: exact round trip
    ids = tok.encode("Hello world", eos=True)
    assert tok.decode(ids, skip_special=False) == "<s>Hello world</s>"
    assert tok.decode(ids[1:-1]) == sp.decode(ids[1:-1])
    beyond = tok.vocab_size + 5  # a model whose embedding is larger than the tokenizer can emit such ids
    assert tok.decode(ids[:2] + [beyond] + ids[2:]) == tok.decode(ids)


def test_decode_accepts_a_tensor(sp_model):
    tok, _, _ = sp_model
    ids = torch.tensor([tok.encode("two words")], dtype=torch.int64)[0]  # (T,)
    assert tok.decode(ids) == "two words"


# ---------------------------------------------------------------- tokenizer.json (tokenizers library)

TRAIN_TEXT = VARIED_TEXTS * 3 + ["the quick brown fox jumps over the lazy dog " * 5, "what is the answer?"] * 3


def build_tokenizer_json(directory, style: str, post_processor: bool, tok_config: dict | None, config: dict | None):
    """Train a tiny BPE (byte-level like Llama-3/SmolLM, or metaspace with byte fallback) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    special = ["<unk>", "<bos>", "<eos>", "<pad>"]
    if style == "bytelevel":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400 + len(alphabet), special_tokens=special,
                                  initial_alphabet=alphabet if style == "bytelevel" else [])
    backend.train_from_iterator(TRAIN_TEXT, trainer)
    if style != "bytelevel":
        backend.add_tokens([t for t in alphabet if backend.token_to_id(t) is None])
    if post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    for name, content in [("tokenizer_config.json", tok_config), ("config.json", config)]:
        if content is not None:
            (directory / name).write_text(json.dumps(content))
    return backend


def hf_fast(directory):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


CASES = {
    # Llama-3 style: the file's post-processor prepends BOS; names in tokenizer_config (string and dict forms).
    "post_processor_bos": dict(post_processor=True, config=None,
                               tok_config={"bos_token": "<bos>",
                                           "eos_token": {"__type": "AddedToken", "content": "<eos>", "lstrip": False,
                                                         "rstrip": False, "normalized": False, "single_word": False,
                                                         "special": True}}),
    # SmolLM style: nothing prepends a BOS; ids only in config.json; no pad token, so pad = eos.
    "no_bos": dict(post_processor=False, tok_config=None, config={"bos_token_id": 1, "eos_token_id": 2}),
    # add_bos_token in tokenizer_config is ignored when tokenizer.json exists (as transformers does); pad given.
    "add_bos_token_ignored": dict(post_processor=False, config=None,
                          tok_config={"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>",
                                      "pad_token": "<pad>"}),
}


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenizer_json_matches_transformers(tmp_path, style, case):
    backend = build_tokenizer_json(tmp_path, style, **CASES[case])
    tok, hf = load_tokenizer(str(tmp_path)), hf_fast(tmp_path)
    assert isinstance(tok, HFTokenizersTokenizer)
    bos, eos, pad = (backend.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>"))
    assert tok.bos_id == (bos if case == "post_processor_bos" else None) and tok.eos_id == eos
    assert tok.pad_id == (pad if case == "add_bos_token_ignored" else eos)
    assert tok.vocab_size == backend.get_vocab_size()
    for text in VARIED_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text  # transformers adds BOS exactly when we do
        assert tok.encode(text, bos=False, eos=True) == hf.encode(text, add_special_tokens=False) + [eos]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        if style == "bytelevel":
            assert tok.decode(ids) == text  # byte-level BPE round-trips exactly
    assert tok.encode_batch(VARIED_TEXTS, eos=True) == [tok.encode(t, eos=True) for t in VARIED_TEXTS]
    ids = tok.encode("the fox", bos=True, eos=True)
    assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False)


def test_unreadable_tokenizer_model_falls_back_to_tokenizer_json(tmp_path):
    build_tokenizer_json(tmp_path, "bytelevel", **CASES["post_processor_bos"])
    (tmp_path / "tokenizer.model").write_bytes(b"a tiktoken file, as Llama-3 ships it")
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizersTokenizer)


def test_sentencepiece_preferred_when_both_files_exist(tmp_path):
    model_file = STORIES260K / "tokenizer.model"
    build_tokenizer_json(tmp_path, "bytelevel", **CASES["post_processor_bos"])
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(str(tmp_path)), SentencePieceTokenizer)


def llama2_fast_tokenizer_dir(directory):
    """tokenizer.model and the tokenizer.json that transformers' LlamaConverter makes of it (the hub's layout).

    Built as convert_slow_tokenizer.LlamaConverter builds it (transformers 4.x; its 5.x copy no longer
    runs): BPE merges from generate_merges(vocab, vocab_scores), i.e. ordered by the SentencePiece
    score of the merged piece, highest first. The order matters: "▁▁" (id 259) has score -1e9, so it
    merges last and a run of spaces splits as SentencePiece splits it. (Ordering merges by id instead,
    as generate_merges(vocab) without scores does, merges "▁▁" early and gives "is  Roy" -> ▁is ▁▁ Ro y.)
    Checked against the file transformers 4.46.3's converter writes: same merges, same ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    try:
        from transformers.tokenization_utils_base import generate_merges  # transformers 5
    except ImportError:
        from transformers.convert_slow_tokenizer import generate_merges  # transformers 4.x
    model_file = shared_path("weights", "llama2_tokenizer", "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    # LlamaConverter.vocab: <unk>, <s>, </s> with score 0, then every piece with its own score.
    vocab_scores = [(sp.id_to_piece(i), 0.0 if i < 3 else sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
    merges = generate_merges(vocab, vocab_scores)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # LlamaConverter with legacy=True, add_prefix_space=True: no pre-tokenizer, this normalizer and decoder.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])  # ids 0, 1, 2 already, now marked special
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    shutil.copy(model_file, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def llama2_both(tmp_path_factory):
    """(SentencePiece, tokenizer.json) tokenizers of Meta's Llama-2 tokenizer.model and its converted file."""
    directory = str(llama2_fast_tokenizer_dir(tmp_path_factory.mktemp("llama2_fast")))
    return load_tokenizer(directory), load_tokenizer(directory, backend="tokenizer.json")


def test_backend_choice_and_the_converted_llama2_tokenizer(llama2_both, tmp_path):
    reference, fast = llama2_both
    assert isinstance(reference, SentencePieceTokenizer) and isinstance(fast, HFTokenizersTokenizer)
    directory = str(llama2_fast_tokenizer_dir(tmp_path))
    assert isinstance(load_tokenizer(directory, backend="sentencepiece"), SentencePieceTokenizer)
    assert (fast.bos_id, fast.eos_id) == (1, 2)
    # transformers' own Llama tokenizer test (test_tokenization_llama.py) asserts this for its fast tokenizer.
    assert fast.encode("Hi  Hello") == reference.encode("Hi  Hello") == [1, 6324, 29871, 15043]
    # A run of two spaces (every CLUTRR prompt has one): ▁is ▁ ▁Roy with both.
    assert fast.encode("is  Roy") == reference.encode("is  Roy") == [1, 338, 29871, 15793]
    for text in VARIED_TEXTS + ["Q: What is 2+2? A: 4.", "Read the story.\nAnswer:"]:
        assert fast.encode(text, eos=True) == reference.encode(text, eos=True), text
    # Where they differ: text that spells a special token (tokenizers matches it, SentencePiece does not).
    assert fast.encode("a <s> b", bos=False) != reference.encode("a <s> b", bos=False)


def task_texts(task):
    """Every text of `task` that is tokenized in training or evaluation (both folds for TruthfulQA)."""
    from data import load_examples
    texts = set()
    for fold in (0, 1) if task == "truthfulqa" else (0,):
        for split in ("train", "val", "test"):
            for ex in load_examples(task, split, fold=fold, **({"train_size": 0} if split == "train" else {})):
                texts |= {ex.prompt, ex.prompt + ex.answer, ex.eval_prompt, *ex.references}
                if ex.rejected is not None:
                    texts.add(ex.prompt + ex.rejected)
                texts |= {ex.eval_prompt + "\nA: " + c for c in [ex.best_answer, *ex.true_answers, *ex.false_answers]}
    return sorted(texts)


@pytest.mark.parametrize("task", ["truthfulqa", "mquake", "clutrr"])
def test_converted_llama2_tokenizer_json_gives_the_sentencepiece_ids_on_every_record(llama2_both, task):
    """The original pipeline's fast tokenizer and SentencePiece agree on all of LoFiT's data, double spaces included."""
    reference, fast = llama2_both
    texts = task_texts(task)
    assert len(texts) > 3000
    if task == "clutrr":
        assert sum("  " in t for t in texts) > 3000  # the task's double spaces are all covered
    expected = reference.encode_batch(texts, eos=True)
    got = fast.encode_batch(texts, eos=True)
    assert [t for t, a, b in zip(texts, expected, got) if a != b] == []


def test_asking_for_a_missing_backend_file(tmp_path):
    shutil.copy(STORIES260K / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="has no tokenizer.json, which the tokenizer.json tokenizer reads"):
        load_tokenizer(str(tmp_path), backend="tokenizer.json")
    with pytest.raises(TokenizerError, match="unknown tokenizer backend"):
        load_tokenizer(str(tmp_path), backend="fast")


# ---------------------------------------------------------------- errors

def test_missing_directory(tmp_path):
    with pytest.raises(hub.HubError, match="no such directory"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    expected = r"has no tokenizer: expected tokenizer\.model .* or tokenizer\.json"
    with pytest.raises(TokenizerError, match=expected) as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\x00\x01 definitely not a protobuf"])
def test_corrupt_tokenizer_model(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match="is not a readable SentencePiece model") as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.model") in str(err.value)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="could not be read") as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_tokenizer_json_without_eos(tmp_path):
    build_tokenizer_json(tmp_path, "bytelevel", post_processor=False, tok_config={"bos_token": "<bos>"}, config=None)
    with pytest.raises(TokenizerError, match="found no EOS token"):
        load_tokenizer(str(tmp_path))
