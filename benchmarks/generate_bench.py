"""Batched greedy generation: our Llama.generate against transformers' generate.

The workload of MQuAKE and CLUTRR evaluation: 8 prompts of the test file, left-padded into one
batch, 16 new tokens by greedy decoding with a KV cache, stopping early only if every row has
emitted EOS. Both sides get the same tensors; the generated ids must be identical (they are
reported). Throughput is new tokens (batch x steps) per second, the prompt's prefill included.
"""
from __future__ import annotations

import torch

from common import DATASETS_DIR, Row, interleaved_times, median  # first: puts the repo root on sys.path
from data import load_examples  # noqa: E402

MAX_NEW_TOKENS = 16


def prompt_batch(tokenizer, task: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` test prompts of `task`, left-padded: input_ids and attention_mask (B, T)."""
    prompts = [ex.eval_prompt for ex in load_examples(task, "test", data_dir=DATASETS_DIR)[:batch]]
    encoded = tokenizer.encode_batch(prompts, bos=True)
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)  # (B, T)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def run(config: str, ours_model, hf_model, tokenizer, task: str, batch: int, repeats: int,
        clock: str = "wall", device="cpu") -> tuple[list[Row], dict]:
    ids, mask = (t.to(device) for t in prompt_batch(tokenizer, task, batch))
    eos = tokenizer.eos_id
    out = {}

    @torch.no_grad()
    def ours():
        out["ours"] = ours_model.generate(ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_id=eos,
                                          pad_id=tokenizer.pad_id)

    @torch.no_grad()
    def baseline():
        full = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_id, use_cache=True)
        out["transformers generate"] = full[:, ids.shape[1]:]

    ours(), baseline()  # warm-up
    times = interleaved_times({"transformers generate": baseline, "ours": ours}, repeats, device, clock)
    new_tokens = out["ours"].numel()
    same = out["ours"].shape == out["transformers generate"].shape and \
        bool((out["ours"] == out["transformers generate"]).all())
    tps = {name: new_tokens / median(t) for name, t in times.items()}
    row = Row("generate", config, f"greedy {task} batch {batch}, {out['ours'].shape[1]} new tokens, tokens/s",
              tps["transformers generate"], tps["ours"], "tok/s", True, 1.5 if config == "medium" else None,
              note=f"prompt width {ids.shape[1]}; generated ids {'identical' if same else 'DIFFER'}")
    raw = {"task": task, "batch": batch, "prompt_width": ids.shape[1], "new_tokens": new_tokens,
           "times_s": times, "tokens_per_s": tps, "identical_ids": same}
    return [row], raw
