"""Stage-2 LoFiT training of a Llama-2-7B-shaped model on one GPU: tokens/s, MFU, peak memory.

The model is random (the cost of a step does not depend on the values): built on the meta device,
materialised on the GPU in bf16, weights ~ N(0, 0.02), norms 1. The transformers baseline is a
LlamaForCausalLM that shares the very same weight tensors (load_state_dict(assign=True)), with the
o_proj hooks of train_bench.py; K = 32 heads drawn with a fixed seed (the paper's K for 7B). Rows
are full length (no padding), so both sides run causal SDPA without a mask (flash attention).

Model FLOPs utilisation = the FLOPs a frozen-base stage-2 step needs / (step time x peak). The
count (`stage2_step_flops`), with N = B*T tokens, P = a layer's linear parameters
(q, k, v, o, gate, up, down), n = answer tokens in the loss, l0 = the lowest layer with a
trained head, L layers:
  forward:   L * (2*N*P + attention) + 2*n*D*V          attention = 2*B*H*T^2*hd (QK^T and PV, causal half)
  backward:  gradients w.r.t. activations only (the weights are frozen, so no weight gradients):
             2*n*D*V through lm_head, (L-1-l0) * (2*N*P + 2*attention) for the layers above l0,
             and in layer l0 only its MLP and o_proj (2*N*(P_mlp + P_o)): v enters at o_proj's input.
Elementwise work (norms, RoPE, softmax, SiLU) is not counted. The same count is used for both
sides, so the baseline's full-vocabulary logits count as waste, not as useful FLOPs.

The convention: 2 FLOPs per multiply-add, the FLOPs this step NEEDS (not the 6 * parameters *
tokens of full fine-tuning, which would count weight gradients a frozen base never computes, and
not the hardware FLOPs actually executed, e.g. full causal score matrices), over the GPU's dense
bf16 tensor-core peak (PEAK_TFLOPS; sparsity figures halved). MFU numbers from the 6N convention
are therefore not comparable with these: the same step scores up to 1.5x higher there.
"""
from __future__ import annotations

import logging
import re

import torch
import train_bench  # noqa: E402
from common import Row, interleaved_times, median, peak_memory  # first: puts the repo root on sys.path

import lofit  # noqa: E402
from model import Llama, LlamaConfig, hf_name, rope_inv_freq  # noqa: E402

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32,
               n_kv_heads=32, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, n_layers=4, n_heads=8,
                 n_kv_heads=8, head_dim=8),  # to check this code path on a CPU
}

# Dense bf16 tensor-core peaks in TFLOP/s: NVIDIA data sheets' figures without sparsity (half the
# "with sparsity" ones). A key matches whole words of torch.cuda.get_device_name() ("NVIDIA H100 NVL"
# is an H100 NVL, not an H100 SXM; "NVIDIA L40" is not an L4); the first match wins.
PEAK_TFLOPS = [("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.0), ("H100", 989.4),
               ("A100", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0), ("A10", 125.0)]


def random_model(shape: dict, dtype, device, seed: int = 0) -> Llama:
    """A Llama of the given shape with random weights, never materialised on the CPU."""
    config = LlamaConfig(**shape, max_position_embeddings=4096)
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif ".lofit_" in name:  # fp32 in a bf16 model, as Llama.from_pretrained makes them
                p.data = torch.zeros_like(p, dtype=torch.float32)
            else:
                p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def hf_twin(model: Llama, device):
    """transformers' LlamaForCausalLM holding the same weight tensors as `model` (no copy)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    config = HFConfig.from_dict(model.config.to_hf(), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {hf_name(n): p for n, p in model.named_parameters() if ".lofit_" not in n}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(device)  # real fp32 buffers, not meta
    return hf.eval()


def stage2_step_flops(config: LlamaConfig, batch: int, seq: int, loss_tokens: int, lowest_layer: int) -> dict:
    """FLOPs one frozen-base stage-2 step needs (module docstring); keys forward, backward, total."""
    D, V, H, hd = config.hidden_size, config.vocab_size, config.n_heads, config.head_dim
    tokens = batch * seq
    p_o = H * hd * D
    p_attn = D * H * hd + 2 * D * config.n_kv_heads * hd + p_o  # q, k, v, o
    p_mlp = 3 * D * config.intermediate_size  # gate, up, down
    attention = 2 * batch * H * seq * seq * hd  # QK^T and PV, 2 FLOPs per multiply-add, causal half
    head = 2 * loss_tokens * D * V
    forward = config.n_layers * (2 * tokens * (p_attn + p_mlp) + attention) + head
    above = config.n_layers - 1 - lowest_layer
    backward = head + above * (2 * tokens * (p_attn + p_mlp) + 2 * attention) + 2 * tokens * (p_mlp + p_o)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def peak_for(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named `name`, or None when PEAK_TFLOPS lacks it."""
    words = re.split(r"[^A-Z0-9]+", name.upper())  # "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB
    for key, tflops in PEAK_TFLOPS:
        n = len(key.split())
        if any(words[i:i + n] == key.upper().split() for i in range(len(words))):
            return tflops
    return None


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return peak_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def run(args) -> tuple[list[Row], dict]:
    """Time stage-2 steps of ours (and transformers + hooks); return rows and raw numbers."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.gpu_model]
    label = {"7b": "Llama-2-7B shape", "tiny": "tiny"}[args.gpu_model]
    model = random_model(shape, dtype, device)
    hf = None if args.no_baseline else hf_twin(model, device)
    cfg = model.config
    train_shape = train_bench.TrainShape(batch=args.gpu_batch, seq=args.gpu_seq, ragged=False)
    batch = {k: t.to(device) for k, t in train_bench.make_batch(cfg.vocab_size, train_shape).items()}
    heads = train_bench.pick_heads(cfg.n_layers, cfg.n_heads, fraction=args.gpu_heads / (cfg.n_layers * cfg.n_heads))
    sides, hooks = train_bench.build_sides(model, hf, 2, batch, heads, full_logits_variant=False)
    if args.compile:
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks are expected (data-dependent shapes)
        loss = torch.compile(lambda: lofit.ce_loss(model, batch))
        sides.append(train_bench.Side("ours, torch.compile", train_bench.make_step(loss, sides[-1].params),
                                      sides[-1].params, model))
    peaks = {}
    for side in sides:  # warm-up (and compilation), with the step's peak memory measured
        peaks[side.name] = peak_memory(side.step, device)
    repeats = args.repeats or 10
    times = interleaved_times({s.name: s.step for s in sides}, repeats, device, args.clock)
    tokens = train_shape.batch * train_shape.seq
    flops = stage2_step_flops(cfg, train_shape.batch, train_shape.seq, int(batch["loss_mask"][:, 1:].sum()),
                              min(layer for layer, _ in heads))
    peak = peak_tflops(args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {}
    for side in sides:
        seconds = median(times[side.name])
        results[side.name] = {"tokens_per_s": tokens / seconds, "step_s": seconds,
                              "tflops_per_s": flops["total"] / seconds / 1e12,
                              "mfu": flops["total"] / seconds / (peak * 1e12) if peak else None,
                              "peak_bytes": weights + peaks[side.name]}
    if hooks is not None:
        hooks.remove()
    what = (f"{label} {str(dtype).removeprefix('torch.')}, stage 2 K={len(heads)}, "
            f"batch {train_shape.batch} x {train_shape.seq}")
    base = results.get("transformers+hooks")
    rows = []
    for name, r in results.items():
        if name == "transformers+hooks":
            continue
        tag = "" if name == "ours" else f" [{name}]"
        if base:
            rows.append(Row("gpu", label, f"{what}, tokens/s{tag}", base["tokens_per_s"], r["tokens_per_s"],
                            "tok/s", True, None))
            rows.append(Row("gpu", label, f"{what}, peak memory (weights + step){tag}", base["peak_bytes"] / 2**30,
                            r["peak_bytes"] / 2**30, "GiB", False, 1.0 if name == "ours" else None))
        if r["mfu"] is not None:
            rows.append(Row("gpu", label, f"{what}, MFU{tag}", 100 * base["mfu"] if base else float("nan"),
                            100 * r["mfu"], "%", True, 40.0 if name == "ours" else None, absolute=True,
                            note=f"{r['tflops_per_s']:.3g} of {peak:g} peak TFLOP/s"))
    raw = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "peak_tflops": peak,
           "shape": shape, "train_shape": vars(train_shape), "heads": heads, "step_flops": flops,
           "times_s": times, "results": results}
    return rows, raw
