"""model.py against transformers' LlamaForCausalLM: same checkpoints, same logits, same tokens."""
import json

import pytest
import torch

from conftest import STORIES260K
from hf_reference import FAMILIES, load_hf, make_checkpoint
from machinery.checkpoints import load_model
from model import CheckpointError, Llama, LlamaConfig


def random_ids(vocab, B, T, seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_fp32(tmp_path, family):
    path, hf = make_checkpoint(tmp_path, family)
    ours = Llama.from_pretrained(path)
    ids = random_ids(128, 2, 80)  # 80 > original_max_position_embeddings (32) of the llama3-scaled configs
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits)


def test_sharded_checkpoint(tmp_path):
    path, hf = make_checkpoint(tmp_path, "llama2", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    ids = random_ids(128, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(path)(ids), hf(ids).logits)


@pytest.mark.parametrize("family", ["llama2", "llama3.1", "smollm2"])
def test_logits_match_transformers_bf16_bitwise(tmp_path, family):
    path, _ = make_checkpoint(tmp_path, family)
    hf = load_hf(path, torch.bfloat16)
    ours = Llama.from_pretrained(path, dtype=torch.bfloat16)
    ids = random_ids(128, 2, 40)
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids).logits)


def test_rope_llama3_far_positions():
    """Scaled inverse frequencies equal transformers' for factor 8 and 32, out to 131,072 positions."""
    from transformers import LlamaConfig as HFConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from model import rope_cos_sin, rope_inv_freq
    for factor in (8.0, 32.0):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        hf_cfg = HFConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling,
                          max_position_embeddings=131072)
        hf_rope = LlamaRotaryEmbedding(hf_cfg)
        cfg = LlamaConfig.from_hf(hf_cfg.to_dict())
        pos = torch.tensor([[0, 1, 8191, 8192, 65536, 131071]])
        x = torch.zeros(1, 1, dtype=torch.float32)
        hf_cos, hf_sin = hf_rope(x, pos)
        cos, sin = rope_cos_sin(rope_inv_freq(cfg), pos, torch.float32)
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_unpadded_logits(tmp_path, side):
    path, _ = make_checkpoint(tmp_path, "llama3.1")
    model = Llama.from_pretrained(path)
    rows = [random_ids(128, 1, n, seed=n)[0] for n in (12, 7, 3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    with torch.no_grad():
        for i, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[i, span], mask[i, span] = r, 1
        batched = model(ids, mask)
        for i, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(batched[i, span], model(r[None])[0])


def test_kv_cache_generation_equals_recompute(tmp_path):
    path, _ = make_checkpoint(tmp_path, "smollm2")
    model = Llama.from_pretrained(path)
    prompt = random_ids(128, 1, 5)
    new = model.generate(prompt, max_new_tokens=20)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):  # no cache: rerun the whole sequence for every token
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 5:])


def test_batched_left_padded_generation_equals_single(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    model = Llama.from_pretrained(path)
    rows = [random_ids(128, 1, n, seed=n)[0] for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    batched = model.generate(ids, mask, max_new_tokens=12)
    for i, r in enumerate(rows):
        assert torch.equal(batched[i], model.generate(r[None], max_new_tokens=12)[0])


def test_generation_stops_at_eos_and_pads(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    model = Llama.from_pretrained(path)
    prompt = random_ids(128, 2, 6)
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 2])  # pretend row 0's third token is EOS
    out = model.generate(prompt, max_new_tokens=10, eos_id=eos, pad_id=0)
    assert torch.equal(out[0, :3], free[0, :3]) and (out[0, 3:] == 0).all()
    hits = (free[1] == eos).nonzero()
    end = int(hits[0]) + 1 if len(hits) else 10
    assert torch.equal(out[1, :end], free[1, :end])


def test_sampling_is_seeded_and_respects_top_p(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    model = Llama.from_pretrained(path)
    prompt = random_ids(128, 2, 6)
    a = model.generate(prompt, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    tiny_p = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=1e-9,
                            generator=torch.Generator().manual_seed(2))
    assert torch.equal(tiny_p, model.generate(prompt, max_new_tokens=8))  # top_p -> 0 is greedy


# ---- real weights: stories260K --------------------------------------------------------------

def test_stories260k_logits_and_greedy_200_tokens_match_transformers():
    path = STORIES260K
    ours = Llama.from_pretrained(path)
    hf = load_hf(path)
    bos = torch.tensor([[1]])
    with torch.no_grad():
        ids = random_ids(512, 2, 64)
        torch.testing.assert_close(ours(ids), hf(ids).logits)
        expected = hf.generate(bos, max_new_tokens=200, do_sample=False, min_new_tokens=200)[0, 1:]
    got = ours.generate(bos, max_new_tokens=200)[0]
    assert torch.equal(got, expected)


def test_stories260k_golden_text():
    path = STORIES260K
    from tokenizer import load_tokenizer
    model, tok = Llama.from_pretrained(path), load_tokenizer(path)
    text = tok.decode(model.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=200)[0].tolist())
    assert text.startswith("Once upon a time, there was a little girl named Lily. "
                           "She loved to play outside in the park.")


# ---- bad input ------------------------------------------------------------------------------

def test_missing_directory():
    with pytest.raises(Exception, match="no such directory"):
        load_model("./does/not/exist")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_hf_config()))
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        Llama.from_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Llama.from_pretrained(path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = make_checkpoint(tmp_path, "llama2")
    state = load_file(path / "model.safetensors")
    state["model.extra.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                              r"unexpected \['model.extra.weight'\]"):
        Llama.from_pretrained(path)


def test_wrong_shape(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* config.json implies"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3 rope scaling needs the numbers original_max_position_embeddings, low_freq_factor, high_freq_factor"),
    ({"rope_scaling": {"type": "linear"}}, "linear rope scaling needs the numbers factor"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config is set"),
    ({"model_type": "gemma", "hidden_act": "gelu", "use_bidirectional_attention": True},
     "use_bidirectional_attention is set"),
    ({"model_type": "mistral", "max_position_embeddings": 32768}, r"sliding-window attention \(window 4096\)"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig.from_hf({**make_hf_config(), **change})


def test_null_rope_theta_is_the_default():
    assert LlamaConfig.from_hf({**make_hf_config(), "rope_theta": None}).rope_theta == 10000.0


def test_broken_shard_index(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2", max_shard_size="40KB")
    index = path / "model.safetensors.index.json"
    for content in ("{not json", json.dumps({"metadata": {}})):
        index.write_text(content)
        with pytest.raises(CheckpointError, match="is not a shard index with a weight_map"):
            Llama.from_pretrained(path)


def test_tensor_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = make_checkpoint(tmp_path, "llama2", max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    first, last = load_file(shards[0]), load_file(shards[-1])
    name = next(iter(last))
    save_file({**first, name: torch.zeros_like(last[name])}, shards[0], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} appears in more than one shard"):
        Llama.from_pretrained(path)


def test_tied_model_with_a_stored_lm_head_loads_like_transformers(tmp_path):
    from safetensors.torch import load_file, save_file
    path, hf = make_checkpoint(tmp_path, "smollm2")  # tied embeddings
    state = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(128, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(path)(ids), hf(ids).logits)


def test_generate_argument_edges(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama2")
    model = Llama.from_pretrained(path)
    ids = random_ids(128, 2, 5)
    assert model.generate(ids, max_new_tokens=0).shape == (2, 0)
    with pytest.raises(ValueError, match="at least a BOS"):
        model.generate(ids[:, :0])
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        model.generate(ids, temperature=1.0, top_p=0.0)
    tiny_p = model.generate(ids, max_new_tokens=4, temperature=1.0, top_p=1e-9)
    assert torch.equal(tiny_p, model.generate(ids, max_new_tokens=4))  # only the top token survives: greedy


def test_a_new_lofit_parameter_loads_at_zero(tmp_path, monkeypatch):
    """README's recipe for a new intervention: a zero lofit_* parameter beside lofit_A needs no loader change."""
    import model as model_module
    path, hf = make_checkpoint(tmp_path, "llama2")
    original_init = model_module.Attention.__init__

    def with_low_rank(self, config):
        original_init(self, config)
        self.lofit_U = torch.nn.Parameter(torch.zeros(config.n_heads, config.head_dim, 2))

    monkeypatch.setattr(model_module.Attention, "__init__", with_low_rank)
    model = Llama.from_pretrained(path)
    U = model.layers[0].self_attn.lofit_U
    assert U.device.type == "cpu" and U.shape[-1] == 2 and not U.any()
    ids = random_ids(128, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits)


def test_both_config_spellings():
    old = {**make_hf_config(), "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    new = {**make_hf_config(), "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}}
    a, b = LlamaConfig.from_hf(old), LlamaConfig.from_hf(new)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"


def test_gated_repo_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # what the hub raises for a gated repo without a token
        Exception.__init__(error, "403 gated")
        raise error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(Exception, match="is gated: accept its license.*HF_TOKEN"):
        load_model("meta-llama/Llama-2-7b-hf")


def make_hf_config():
    return {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5}
