"""export.py: a LoFiT adapter exported as a peft adapter loads in peft and computes our model's logits.

Nothing is trained: offsets are set by hand on a tiny random checkpoint (tests/hf_reference.py),
saved with adapter.save_adapter, exported with export.main, then loaded by transformers'
LlamaForCausalLM + peft.PeftModel and compared with our Llama carrying the same offsets.
"""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft", reason="peft (a test-only dependency) is not installed; pip install peft")

import export  # noqa: E402
import lofit  # noqa: E402
from adapter import save_adapter  # noqa: E402
from conftest import ROOT  # noqa: E402
from hf_reference import load_hf, make_checkpoint  # noqa: E402
from machinery.flags import import_intervention_file  # noqa: E402
from model import Llama  # noqa: E402

VOCAB = 128
HEADS = [(0, 1), (1, 3), (1, 0)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two shapes: plain Llama-2 (no biases), and head_dim * heads != hidden with an o_proj bias."""
    root = tmp_path_factory.mktemp("bases")
    return {"llama2": make_checkpoint(root / "llama2", "llama2", vocab_size=VOCAB)[0],
            "biases": make_checkpoint(root / "biases", "biases", vocab_size=VOCAB, head_dim=24)[0]}


def with_offsets(path, *, v: bool, a: bool, seed=0) -> Llama:
    """Our Llama with random non-zero v on HEADS and/or random A on every head (std 0.5)."""
    model = Llama.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer, attn in enumerate(lofit.attentions(model)):
            if a:
                attn.lofit_A.copy_(0.5 * torch.randn(attn.lofit_A.shape, generator=g))  # (H, hd)
            for at, h in HEADS:
                if v and at == layer:
                    attn.lofit_v[h] = 0.5 * torch.randn(attn.head_dim, generator=g)  # (hd,)
    return model


def ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def export_peft(tmp_path, base, model, *extra, stage=2, heads=HEADS):
    """Save `model`'s offsets of `heads` (None: every head) and export them as --format peft; (status, file, out)."""
    file = tmp_path / "adapter.safetensors"
    save_adapter(file, model, heads, stage=stage, task="mquake")
    out = tmp_path / "peft"
    code = export.main(["--adapter", str(file), "--model", str(base), "--format", "peft", "--out", str(out),
                        *extra])
    return code, file, out


@pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias term")
@pytest.mark.parametrize("family", ["llama2", "biases"])
@pytest.mark.parametrize("kind", ["BEFT", "IA3"])
def test_peft_export_matches_our_logits(tmp_path, checkpoints, family, kind):
    from peft import PeftModel
    base = checkpoints[family]
    model = with_offsets(base, v=kind == "BEFT", a=kind == "IA3")
    code, file, out = export_peft(tmp_path, base, model, **({} if kind == "BEFT" else dict(stage=1, heads=None)))
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == kind and config["base_model_name_or_path"] == str(base)
    provenance = json.loads((out / "lofit_export.json").read_text())
    assert provenance["adapter_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    hf = load_hf(base)
    with torch.no_grad():
        plain = hf(ids()).logits  # (B, T, V)
        peft_model = PeftModel.from_pretrained(hf, out).eval()
        theirs = peft_model(ids()).logits
        ours = model(ids())
    assert (theirs - ours).abs().max() <= 1e-5
    assert (plain - ours).abs().max() > 1e-2  # the offsets do change the logits: the check is not vacuous


def test_both_offsets_are_refused(tmp_path, checkpoints, capsys):
    model = with_offsets(checkpoints["llama2"], v=True, a=True)
    code, _, out = export_peft(tmp_path, checkpoints["llama2"], model, heads=None)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "both scale (A) and bias (v)" in err and "--format merged" in err
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no staging left behind


def test_other_form_is_refused(tmp_path, checkpoints, capsys):
    (name,) = import_intervention_file(str(ROOT / "examples" / "low_rank.py"))  # registers the form
    form = lofit.INTERVENTIONS[name]
    model = Llama.from_pretrained(checkpoints["llama2"])
    lofit.setup_stage2(model, HEADS, init_std=0.3, generator=torch.Generator().manual_seed(0), intervention=form())
    code, _, out = export_peft(tmp_path, checkpoints["llama2"], model)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and err.count("\n") == 1
    assert f"holds the {form.name!r} intervention" in err


def test_existing_out_needs_overwrite_and_is_kept_until_replaced(tmp_path, checkpoints, capsys):
    model = with_offsets(checkpoints["llama2"], v=True, a=False)
    out = tmp_path / "peft"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, _ = export_peft(tmp_path, checkpoints["llama2"], model)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    # a refused export with --overwrite leaves the old directory as it was
    bad = with_offsets(checkpoints["llama2"], v=True, a=True)
    save_adapter(tmp_path / "bad.safetensors", bad, None, stage=2, task="mquake")
    assert export.main(["--adapter", str(tmp_path / "bad.safetensors"), "--model", str(checkpoints["llama2"]),
                        "--format", "peft", "--out", str(out), "--overwrite"]) == 2
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, _, _ = export_peft(tmp_path, checkpoints["llama2"], model, "--overwrite")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "lofit_export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "bad.safetensors", "peft"]


def test_merged_export_matches(tmp_path, checkpoints):
    base = checkpoints["llama2"]
    model = with_offsets(base, v=True, a=True)
    save_adapter(tmp_path / "a.safetensors", model, None, stage=2, task="mquake")
    out = tmp_path / "merged"
    assert export.main(["--adapter", str(tmp_path / "a.safetensors"), "--model", str(base),
                        "--format", "merged", "--out", str(out)]) == 0
    assert json.loads((out / "lofit_export.json").read_text())["format"] == "merged"
    with torch.no_grad():
        assert (load_hf(out)(ids()).logits - model(ids())).abs().max() <= 1e-5


def test_gguf_base_is_named_by_file_with_its_sha256(tmp_path):
    gguf = tmp_path / "deep" / "model-Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    assert export.base_record(str(gguf)) == {"base_model_name_or_path": "model-Q8_0.gguf",
                                             "base_model_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}


def test_export_imports_neither_peft_nor_transformers():
    code = "import sys, export; print(sorted({'peft', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
