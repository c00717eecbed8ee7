"""Gemma (v1) through the same model.py: parity with transformers' GemmaForCausalLM."""
import pytest
import torch

from hf_reference import GEMMA_FAMILIES, load_hf_gemma, make_gemma_checkpoint
from model import Llama, LlamaConfig


def ids(B=2, T=40, seed=0):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(GEMMA_FAMILIES))
def test_gemma_logits_match_transformers_fp32(tmp_path, family):
    path, hf = make_gemma_checkpoint(tmp_path, family)
    ours = Llama.from_pretrained(path)
    assert ours.config.model_type == "gemma" and ours.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), hf(ids()).logits)


def test_gemma_bf16_bitwise(tmp_path):
    path, _ = make_gemma_checkpoint(tmp_path, "gemma-7b")
    ours, hf = Llama.from_pretrained(path, dtype=torch.bfloat16), load_hf_gemma(path, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(ids()), hf(ids()).logits)


def test_gemma_generation_matches_transformers(tmp_path):
    path, hf = make_gemma_checkpoint(tmp_path, "gemma-2b")
    ours = Llama.from_pretrained(path)
    prompt = ids(1, 5)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, 5:]
    assert torch.equal(ours.generate(prompt, max_new_tokens=20), expected)


def test_gemma_legacy_gelu_spelling_and_config_round_trip():
    hf = {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
          "rms_norm_eps": 1e-6, "hidden_act": "gelu", "rope_theta": 10000.0}
    cfg = LlamaConfig.from_hf(hf)  # gemma-7b's config.json
    assert cfg.tie_word_embeddings and cfg.n_heads * cfg.head_dim == 4096 != cfg.hidden_size
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


# ---- LoFiT on Gemma, end to end ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A random Gemma-7B-shaped checkpoint with vocab 512 and the stories260K SentencePiece tokenizer."""
    import shutil

    from conftest import STORIES260K
    tokenizer = STORIES260K / "tokenizer.model"
    path, _ = make_gemma_checkpoint(tmp_path_factory.mktemp("gemma"), "gemma-7b", vocab_size=512)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def test_gemma_train_and_eval_end_to_end(tiny_gemma, tmp_path):
    import json

    import eval as evaluation
    import train
    from adapter import export_merged, load_adapter
    from conftest import SPLITS_DIR
    data = str(SPLITS_DIR)
    out = tmp_path / "run"
    assert train.main(["--task", "mquake", "--model", str(tiny_gemma), "--data-dir", data, "--out", str(out),
                       "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--limit-eval", "4",
                       "--k", "3", "--lr-a", "0.05", "--lr-v", "0.05"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(json.loads((out / "heads.json").read_text())["selected"]) == 3

    # eval.py with the adapter, and with the merged export, give the same metrics as training reported.
    assert evaluation.main(["--task", "mquake", "--model", str(tiny_gemma),
                            "--adapter", str(out / "adapter.safetensors"), "--data-dir", data, "--limit", "4",
                            "--out", str(tmp_path / "adapter.json")]) == 0
    model = Llama.from_pretrained(tiny_gemma)
    load_adapter(out / "adapter.safetensors", model)
    merged = export_merged(model, tmp_path / "merged", tokenizer_dir=tiny_gemma)
    assert evaluation.main(["--task", "mquake", "--model", str(merged), "--data-dir", data, "--limit", "4",
                            "--out", str(tmp_path / "merged.json")]) == 0
    with_adapter = json.loads((tmp_path / "adapter.json").read_text())
    with_merge = json.loads((tmp_path / "merged.json").read_text())
    assert with_adapter["summary"] == with_merge["summary"] == metrics["test"]
    assert with_adapter["details"] == with_merge["details"]  # the same generated text, example by example
