"""Text <-> token ids for every supported model family, behind one small interface.

Two backends, picked by the files in the checkpoint directory:

* ``tokenizer.model`` read by SentencePiece (Llama-2, TinyLlama, Gemma, llama2.c's stories models).
  SentencePiece itself is the reference for these files, so it is preferred whenever it can read one.
* ``tokenizer.json`` read by the ``tokenizers`` library (Llama-3, SmolLM). Llama-3 also ships a
  ``tokenizer.model`` in tiktoken format, which SentencePiece cannot read; we then fall back here.

``backend="tokenizer.json"`` picks the second even where SentencePiece could read the first: for
Llama-2 that is transformers' fast tokenizer, which the original LoFiT pipeline used; built by
transformers' converter from Meta's tokenizer.model, it gives SentencePiece's ids on every
TruthfulQA, MQuAKE and CLUTRR record, runs of spaces included (tests/test_tokenizer.py).

BOS and EOS are added only through the ``bos=``/``eos=`` flags. A literal "<s>" in the text stays text
with SentencePiece (as in Meta's tokenizer); ``tokenizers`` matches its file's added tokens, as HF does.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece
import tokenizers

from model import LofitError
from storage import gguf_file
from storage.hub import resolve_model_dir


class TokenizerError(LofitError, ValueError):
    """A tokenizer could not be loaded; the message names the directory and what was expected."""


class Tokenizer:
    """Encodes and decodes text for one model.

    Attributes:
        bos_id: id prepended by ``encode(bos=True)``; None if the model's tokenizer adds no BOS.
        eos_id: end-of-sequence id (appended by ``encode(eos=True)``; generation stops on it).
        pad_id: the tokenizer's own pad token if it has one, else ``eos_id``. Padded positions are
            always masked out (attention mask and loss), so the value never reaches the model's output.
        vocab_size: number of ids the tokenizer can produce (the model's embedding may be larger).
    """

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    # Each backend implements _encode_plain(texts) -> ids without specials, and _decode(ids, skip_special).

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS first (if ``bos`` and the model has one) and EOS last if ``eos``."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (the backends tokenize a batch in parallel native code)."""
        head, tail = [self.bos_id] if bos and self.bos_id is not None else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in self._encode_plain(list(texts))]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor); special tokens are dropped if ``skip_special``."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._decode([int(i) for i in ids], skip_special)


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model`` file read by SentencePiece: its own BOS/EOS/pad ids."""

    def __init__(self, processor):
        self.sp = processor
        self.bos_id = processor.bos_id() if processor.bos_id() >= 0 else None
        self.eos_id = processor.eos_id()
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else self.eos_id
        self.vocab_size = processor.get_piece_size()

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]  # a model's embedding may be larger than the vocab
        if skip_special:
            return self.sp.decode(ids)  # SentencePiece drops control tokens (BOS/EOS/pad) itself
        parts, run = [], []  # decode the runs between special tokens; show those as their text
        for i in ids:
            if self.sp.is_control(i):
                parts += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.sp.decode(run)])


class HFTokenizersTokenizer(Tokenizer):
    """A ``tokenizer.json`` file read by the ``tokenizers`` library.

    BOS is what the file's own post-processor prepends (e.g. Llama-3's <|begin_of_text|>), or None if it
    prepends nothing (GPT-2-style files such as SmolLM's). That is exactly when transformers adds one: it
    ignores ``add_bos_token`` in tokenizer_config.json whenever a tokenizer.json is present. EOS and pad
    come from tokenizer_config's ``eos_token``/``pad_token`` (a string or {"content": ...}), else
    config.json's ``*_token_id``.
    """

    def __init__(self, backend, bos_id: int | None, eos_id: int, pad_id: int):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def save_hf(self, directory: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json into `directory`, as an HF checkpoint holds them."""
        self.backend.save(str(Path(directory) / "tokenizer.json"))
        token = self.backend.id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": token(self.eos_id),
                  "pad_token": token(self.pad_id), "add_bos_token": self.bos_id is not None,
                  **({"bos_token": token(self.bos_id)} if self.bos_id is not None else {})}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


BACKENDS = ("auto", "sentencepiece", "tokenizer.json")


def load_tokenizer(path_or_repo_id: str, token: str | None = None, backend: str = "auto") -> Tokenizer:
    """Load the tokenizer of a checkpoint directory or hub repo id.

    Args:
        path_or_repo_id: local checkpoint directory, Hugging Face repo id (see ``storage.hub.resolve_model_dir``),
            or a llama.cpp .gguf file (its vocabulary and merges, see storage/gguf_file.py).
        token: optional hub token for gated or private repos.
        backend: "auto" (SentencePiece if it can read ``tokenizer.model``, else ``tokenizer.json``),
            or "sentencepiece" / "tokenizer.json" to insist on one.

    Returns:
        A Tokenizer backed by SentencePiece or by the ``tokenizers`` library.

    Raises:
        hub.HubError: the name is neither a directory nor a reachable repo.
        TokenizerError: no usable tokenizer file, the asked-for one is missing, or it is corrupt.
    """
    if backend not in BACKENDS:
        raise TokenizerError(f"unknown tokenizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if gguf_file.is_gguf(path_or_repo_id):
        if backend == "sentencepiece":
            raise TokenizerError(f"{path_or_repo_id} is a GGUF file: its tokenizer is byte-level BPE, not "
                                 f"SentencePiece; use --tokenizer auto")
        return _load_gguf_tokenizer(path_or_repo_id)
    directory = resolve_model_dir(path_or_repo_id, token, need_weights=False)
    sp_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if not sp_file.is_file() and not json_file.is_file():
        raise TokenizerError(f"{directory} has no tokenizer: expected tokenizer.model (SentencePiece) "
                             f"or tokenizer.json (Hugging Face tokenizers) in it")
    wanted = {"sentencepiece": sp_file, "tokenizer.json": json_file}.get(backend)
    if wanted is not None and not wanted.is_file():
        raise TokenizerError(f"{directory} has no {wanted.name}, which the {backend} tokenizer reads; "
                             f"use the automatic choice (--tokenizer auto) instead")
    if sp_file.is_file() and backend != "tokenizer.json":
        try:
            return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(sp_file)))
        except Exception as err:  # not a SentencePiece model (e.g. Llama-3's tiktoken file) or corrupt
            if backend == "sentencepiece" or not json_file.is_file():
                raise TokenizerError(f"{sp_file} is not a readable SentencePiece model ({err}); "
                                     f"replace it with the model's original tokenizer.model") from None
    return _load_tokenizer_json(directory)


def _load_gguf_tokenizer(path) -> HFTokenizersTokenizer:
    try:
        data = gguf_file.gguf_tokenizer(gguf_file.open_gguf(path), Path(path).name)
    except gguf_file.GGUFError as e:
        raise TokenizerError(str(e)) from None
    return HFTokenizersTokenizer(data.backend, data.bos_id, data.eos_id, data.pad_id)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} if there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _load_tokenizer_json(directory: Path) -> HFTokenizersTokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        tok_config = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")
    except Exception as err:
        raise TokenizerError(f"{directory}/tokenizer.json (or its JSON configs) could not be read ({err}); "
                             f"replace them with the model's original files") from None

    def special_id(name: str) -> int | None:
        """Id of tokenizer_config's ``<name>_token`` (a string or {"content": ...}), else config.json's."""
        content = tok_config.get(f"{name}_token")
        if isinstance(content, dict):
            content = content.get("content")
        if content is not None and backend.token_to_id(content) is not None:
            return backend.token_to_id(content)
        fallback = model_config.get(f"{name}_token_id")
        return fallback[0] if isinstance(fallback, list) else fallback

    eos_id = special_id("eos")
    if eos_id is None:
        raise TokenizerError(f"{directory}: found no EOS token; expected eos_token in tokenizer_config.json "
                             f"or eos_token_id in config.json")
    with_special, plain = backend.encode("a").ids, backend.encode("a", add_special_tokens=False).ids
    bos_id = with_special[0] if with_special[1:len(plain) + 1] == plain else None  # what the file prepends
    pad_id = special_id("pad")
    return HFTokenizersTokenizer(backend, bos_id, eos_id, eos_id if pad_id is None else pad_id)
