"""GGUF checkpoints: our loader against transformers' own GGUF loading and against the weights written.

Tiny files are written here with gguf.GGUFWriter in llama.cpp's layout (q/k rows permuted as its
converter does, quantized blocks, tied or untied output, GQA); the real SmolLM2-135M-Instruct file
from ../shared is checked too where it exists.
"""
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from machinery.checkpoints import load_model
from model import CheckpointError
from tokenizer import TokenizerError, load_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
SMOLLM2 = ("weights", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXTS = ["Hello world", "  two  spaces\n\nnewlines\ttab  ", "Ünïcödé — “quotes” 日本語 🤖 naïve café",
         "<|im_start|>user\nhi<|im_end|>", "It's 3.14159, isn't it? I'll say: 1,000,000!", "x" * 50, "",
         "What happens to you if you eat watermelon seeds?\nA: Nothing happens."]
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128)


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's q/k row order, written from its description: per head (2, pair) -> (pair, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def byte_level_vocab():
    """A small byte-level BPE (vocabulary and merges) trained here, with two control tokens first."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the cat sat on the mat, then the dog ate the hat"] * 50, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, merges


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0, arch: str = "llama", tokenizer_model: str = "gpt2",
                    rope_scaling: str | None = None):
    """A random llama GGUF file; returns the HF-layout state dict it encodes (dequantized, fp32)."""
    g = torch.Generator().manual_seed(seed)
    c = TINY
    tokens, merges = byte_level_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    w.add_uint32(a + "block_count", c["layers"])
    w.add_uint32(a + "context_length", 256)
    w.add_uint32(a + "embedding_length", c["hidden"])
    w.add_uint32(a + "feed_forward_length", c["inter"])
    w.add_uint32(a + "attention.head_count", c["heads"])
    w.add_uint32(a + "attention.head_count_kv", c["kv_heads"])
    w.add_uint32(a + "rope.dimension_count", c["head_dim"])
    w.add_float32(a + "rope.freq_base", 100000.0)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(a + "vocab_size", vocab)
    if rope_scaling:
        w.add_string(a + "rope.scaling.type", rope_scaling)
        w.add_float32(a + "rope.scaling.factor", 2.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")  # plain GPT-2 splitting, as the vocabulary above was trained
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    hf = {}

    def add(gguf_name, hf_name, shape, qtype, scale=0.2, permute_heads=None, offset=0.0):
        t = offset + scale * torch.randn(shape, generator=g)
        stored = llama_cpp_permute(t, permute_heads) if permute_heads else t
        data = stored.numpy()
        if qtype in (Q.Q8_0, Q.Q4_1):
            data = gguf.quantize(data, qtype)
        elif qtype == Q.F16:
            data = data.astype("float16")
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        back = torch.from_numpy(gguf.dequantize(data, qtype).copy()).float().reshape(shape)  # what the file holds
        hf[hf_name] = unpermute_for_reference(back, permute_heads) if permute_heads else back

    hd, H, Hkv, D, F = c["head_dim"], c["heads"], c["kv_heads"], c["hidden"], c["inter"]
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, D), Q.Q8_0)
    for i in range(c["layers"]):
        p, m = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", m + "input_layernorm.weight", (D,), Q.F32, 0.1, offset=1.0)
        add(p + "attn_q.weight", m + "self_attn.q_proj.weight", (H * hd, D), Q.Q4_1, permute_heads=H)
        add(p + "attn_k.weight", m + "self_attn.k_proj.weight", (Hkv * hd, D), Q.Q8_0, permute_heads=Hkv)
        add(p + "attn_v.weight", m + "self_attn.v_proj.weight", (Hkv * hd, D), Q.F16)
        add(p + "attn_output.weight", m + "self_attn.o_proj.weight", (D, H * hd), Q.Q4_1)
        add(p + "ffn_norm.weight", m + "post_attention_layernorm.weight", (D,), Q.F32, 0.1, offset=1.0)
        add(p + "ffn_gate.weight", m + "mlp.gate_proj.weight", (F, D), Q.Q8_0)
        add(p + "ffn_up.weight", m + "mlp.up_proj.weight", (F, D), Q.Q4_1)
        add(p + "ffn_down.weight", m + "mlp.down_proj.weight", (D, F), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", (D,), Q.F32, 0.1, offset=1.0)
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, D), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, vocab


def unpermute_for_reference(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of llama_cpp_permute, checked against it in test_permutation_roundtrip."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_permutation_roundtrip():
    w = torch.arange(4 * 16 * 3).reshape(4 * 16, 3)
    assert torch.equal(unpermute_for_reference(llama_cpp_permute(w, 4), 4), w)
    assert not torch.equal(llama_cpp_permute(w, 4), w)


def hf_model_from_state(state: dict, vocab: int, tied: bool):
    """transformers' LlamaForCausalLM holding exactly the weights the GGUF file encodes (HF layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = TINY
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=c["hidden"], intermediate_size=c["inter"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_logits_match_written_weights_and_transformers(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    state, vocab = write_tiny_gguf(path, tied=tied)
    ours = load_model(path)
    assert ours.config.tie_word_embeddings == tied and ours.config.n_kv_heads == 2
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(ids)
        reference = hf_model_from_state(state, vocab, tied)(ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_tokenizer_matches_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    ours = load_tokenizer(str(path))
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text, bos=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.bos_id is None and ours.eos_id == 1  # add_bos_token false; eos from the metadata


@pytest.mark.parametrize("kind, match", [
    (dict(arch="qwen2"), "architecture 'qwen2' is not supported"),
    (dict(rope_scaling="yarn"), "rope scaling 'yarn' is not supported"),
])
def test_unsupported_gguf_is_refused(tmp_path, kind, match):
    path = tmp_path / "x.gguf"
    write_tiny_gguf(path, tied=True, **kind)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_unsupported_gguf_tokenizer_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tied=True, tokenizer_model="llama")
    with pytest.raises(TokenizerError, match="tokenizer type 'llama' is not supported"):
        load_tokenizer(str(path))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(tmp_path / "missing.gguf")


def test_tiny_gguf_linear_rope_scaling_read(tmp_path):
    path = tmp_path / "linear.gguf"
    write_tiny_gguf(path, tied=True, rope_scaling="linear")
    assert load_model(path).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.fixture(scope="module")
def smollm2():
    """(path, our model, our tokenizer, transformers' model, transformers' tokenizer) for the real file."""
    path = shared_path(*SMOLLM2)
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    their_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return path, load_model(path), load_tokenizer(str(path)), theirs, their_tok


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2):
    path, ours, tok, theirs, _ = smollm2
    assert sum(p.numel() for p in ours.parameters()) == 134_549_568  # 134.5M, tied head counted once
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)
        new = ours.generate(ids, max_new_tokens=30)
        their_new = theirs.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_id)[:, ids.shape[1]:]
    assert new.tolist() == their_new.tolist()
    assert tok.decode(new[0]).startswith("The capital of France is Paris.")


def test_smollm2_tokenizer_matches_transformers_and_splits_numbers_like_the_model(smollm2):
    _, _, tok, _, their_tok = smollm2
    from data import load_examples
    questions = [ex.prompt for ex in load_examples("truthfulqa", "test", fold=0)]
    for text in TEXTS + questions:
        assert tok.encode(text, bos=False) == their_tok.encode(text, add_special_tokens=False), text
    # Where the two differ: SmolLM2's own tokenizer.json (Digits(individual_digits) before the byte-level
    # regex) and llama.cpp's "smollm" pre-tokenizer cut every numeric character (\p{N}) off on its own,
    # spaces included; transformers' GGUF tokenizer keeps " ²" together. Each piece alone is plain BPE.
    text, pieces = "½ ² Ⅻ 12", ["½", " ", "²", " ", "Ⅻ", " ", "1", "2"]
    expected = [i for piece in pieces for i in their_tok.encode(piece, add_special_tokens=False)]
    assert tok.encode(text, bos=False) == expected
    assert tok.encode(text, bos=False) != their_tok.encode(text, add_special_tokens=False)
    assert tok.bos_id is None and tok.decode(tok.encode(text)) == text


def test_merged_export_of_a_gguf_model_is_an_hf_checkpoint(tmp_path):
    from adapter import export_merged
    from lofit import setup_stage2
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    model = load_model(path)
    setup_stage2(model, [(0, 1), (1, 3)], init_std=0.5, generator=torch.Generator().manual_seed(0))
    out = export_merged(model, tmp_path / "merged", tokenizer_dir=path)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(out)(ids), model(ids), rtol=1e-5, atol=1e-5)
    ours, exported, hf_tok = load_tokenizer(str(path)), load_tokenizer(str(out)), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert exported.encode(text) == ours.encode(text) == hf_tok.encode(text), text
    assert (exported.bos_id, exported.eos_id, exported.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
