"""Batched greedy generation: our Llama.generate against transformers' generate.

The workload of MQuAKE and CLUTRR evaluation: 8 prompts of the test file, left-padded into one
batch, 16 new tokens by greedy decoding with a KV cache, stopping early only if every row has
emitted EOS. Both sides get the same tensors; the generated ids must be identical (they are
reported). Throughput is new tokens (batch x steps) per second, the prompt's prefill included.

A third measurement bounds what any implementation of the same arithmetic can reach: the model's
linear layers alone (every q/k/v/o/gate/up/down projection over the prompts' real tokens, padding
left out, then over 8 rows per new token, and lm_head over 8 rows per token), with no attention,
norms, cache or sampling. transformers' time divided by that time is the largest speed-up left to win.
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


def linear_layers_only(model, batch: int, prompt_tokens: int, new_tokens: int):
    """A function running just `model`'s matrix multiplies for one greedy `generate` call.

    The prefill multiplies every layer's weights by `prompt_tokens` rows (the prompts' tokens
    without padding, as a packed prefill would) and lm_head by the last positions' `batch` rows;
    each further token multiplies every weight by `batch` rows.
    """
    weights = [m.weight for block in model.layers for m in block.modules() if isinstance(m, torch.nn.Linear)]
    lm_head = model.lm_head.weight  # (vocab, D)
    dtype, device = lm_head.dtype, lm_head.device
    prompt_rows = {w.shape[1]: torch.randn(prompt_tokens, w.shape[1], dtype=dtype, device=device)
                   for w in weights}  # (prompt tokens, in) per input width
    token_rows = {width: x[:batch] for width, x in prompt_rows.items()}  # (B, in)

    def one_call():
        for w in weights:
            torch.nn.functional.linear(prompt_rows[w.shape[1]], w)
        torch.nn.functional.linear(token_rows[lm_head.shape[1]], lm_head)
        for _ in range(new_tokens - 1):
            for w in weights:
                torch.nn.functional.linear(token_rows[w.shape[1]], w)
            torch.nn.functional.linear(token_rows[lm_head.shape[1]], lm_head)
    return one_call


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
    steps = out["ours"].shape[1]
    floor = torch.no_grad()(linear_layers_only(ours_model, ids.shape[0], int(mask.sum()), steps))
    floor()  # warm-up
    times = interleaved_times({"transformers generate": baseline, "ours": ours,
                               "linear layers only": floor}, repeats, device, clock)
    new_tokens = out["ours"].numel()
    same = out["ours"].shape == out["transformers generate"].shape and \
        bool((out["ours"] == out["transformers generate"]).all())
    tps = {name: new_tokens / median(t) for name, t in times.items()}
    row = Row("generate", config, f"greedy {task} batch {batch}, {out['ours'].shape[1]} new tokens, tokens/s",
              tps["transformers generate"], tps["ours"], "tok/s", True, 1.5 if config == "medium" else None,
              note=f"prompt width {ids.shape[1]}; generated ids {'identical' if same else 'DIFFER'}")
    bound = Row("generate", config, f"greedy {task}: upper bound, the linear layers alone, tokens/s",
                tps["transformers generate"], tps["linear layers only"], "tok/s", True,
                note="no implementation of the same arithmetic can pass this ratio")
    raw = {"task": task, "batch": batch, "prompt_width": ids.shape[1], "new_tokens": new_tokens,
           "times_s": times, "tokens_per_s": tps, "identical_ids": same}
    return [row, bound], raw
