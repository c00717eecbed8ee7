"""bf16 base, fp32 LoFiT: the parameters, their AdamW state and the (1 + A) * z + v edit stay fp32."""
import torch

import train
from conftest import STORIES260K
from model import Llama


def test_bf16_model_edits_in_fp32(tmp_path):
    """At the paper's init scale, 1 + A rounds to 1 in bf16; computed in fp32 the edit still acts.

    Layer 0's z does not depend on any offset, so its o_proj input with the offsets on must be
    exactly ((1 + A) * z + v) rounded once to bf16 (a hand computation from z read with them off).
    """
    model = Llama.from_pretrained(str(STORIES260K), dtype=torch.bfloat16)
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if ".lofit_" in n} == {torch.float32}
    with torch.no_grad():
        attn.lofit_A.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
        attn.lofit_v.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
    assert ((1 + attn.lofit_A.bfloat16()) == 1).float().mean() > 0.9  # what bf16 parameters would do
    seen = []
    attn.o_proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    attn.lofit_enabled = False
    model.hidden_states(ids)
    attn.lofit_enabled = True
    model.hidden_states(ids)
    z, edited = seen[0], seen[1]  # (1, T, H * hd) each, bf16
    B, T, _ = z.shape
    by_hand = ((1 + attn.lofit_A) * z.view(B, T, 8, -1).float() + attn.lofit_v).to(torch.bfloat16).view(B, T, -1)
    assert edited.dtype == torch.bfloat16
    assert torch.equal(edited, by_hand)
    assert not torch.equal(edited, z)


def test_bf16_training_keeps_lofit_and_adamw_state_fp32(tmp_path):
    out = tmp_path / "run"
    argv = ["--task", "mquake", "--model", str(STORIES260K),
            "--out", str(out), "--dtype", "bfloat16", "--train-size", "6",
            "--batch-size", "3", "--epochs", "1", "--k", "4", "--stop-after", "1"]
    assert train.main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["key"]["dtype"] == "bfloat16"
    assert {t.dtype for t in state["params"].values()} == {torch.float32}
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert len(moments) == 2 * len(state["params"]) and {t.dtype for t in moments} == {torch.float32}
    A = torch.stack(list(state["params"].values()))
    assert (A != 0).all() and ((1 + A) != 1).all()  # no (1 + A) entry is exactly 1 after a step
