"""Opt-in speed that keeps the method: TF32 matrix products and torch.compile (both off by default).

    python train.py --task clutrr --matmul-precision high --compile

- --matmul-precision high: fp32 matrix products may use TF32 (10 mantissa bits) on GPUs that have
  it (NVIDIA Ampere and later), via torch.set_float32_matmul_precision. The default, highest, is
  full fp32 as the paper; docs/gpu.md says what TF32 does to LoFiT's 1e-3 offsets.
- --compile: torch.compile of the model's forward (Llama.hidden_states, which training, the DPO
  reference pass, scoring and generation all go through); the same computation, fused. The first
  passes of each new shape compile (seconds to minutes); later ones reuse the code. Not with a
  sharded base (FSDP2 registers hidden_states itself).
tests/test_speed.py holds both to the eager fp32 loss and gradients on the CPU.
"""
from __future__ import annotations

import contextlib

import torch

MATMUL_PRECISIONS = ("highest", "high")
MATMUL_HELP = ("fp32 matrix products: highest (full fp32, as the paper) or high (TF32 on GPUs that have it: "
               "faster, each input rounded to 10 mantissa bits; see docs/gpu.md)")
COMPILE_HELP = ("torch.compile the model's forward (training, scoring, generation): faster steps after a "
                "compile of each new shape; not with --sharding shard")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block; the previous setting after it."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {MATMUL_PRECISIONS}, not {precision!r}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def compile_forward(model):
    """Compile `model.hidden_states` in place (model.forward calls it, so logits are compiled too).

    Shapes that change (batches of other lengths) make the compiler generalise them after the
    first change; switching the offsets off (lofit.offsets_disabled) compiles a second version.
    """
    model.hidden_states = torch.compile(model.hidden_states)
    return model
