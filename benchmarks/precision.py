"""What bf16 changes in LoFiT, measured: the numbers behind the README's "Precision" paragraph.

    python benchmarks/precision.py                                   # (1 + A) == 1 at init; batching
    python benchmarks/precision.py --compare runs/fp32 runs/bf16     # two or more train.py --out dirs

Without --compare: the share of (1 + A) entries that are exactly 1 at the paper's init (A ~ N(0,
1e-3)) in bf16 and fp32, and how far summed DPO answer log-probs of the same TruthfulQA pairs move
between batches of 1 and of 8 (the base model, each dtype). With --compare: for each run after the
first, how many of the first's top-4/8/16 stage-1 heads it shares, Spearman's rho of the two
rankings, its last stage-2 epoch loss and its test metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

import train  # noqa: E402
from data import load_examples  # noqa: E402
from model import Llama  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def init_and_batching(model_dir: str, data_dir: str, pairs: int) -> None:
    A = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    print(f"A ~ N(0, 1e-3): (1 + A) == 1 for {((1 + A.bfloat16()) == 1).float().mean():.1%} of entries in bf16, "
          f"{((1 + A) == 1).float().mean():.1%} in fp32")
    examples = load_examples("truthfulqa", "train", fold=0, data_dir=data_dir)
    data = train.tokenize_training_set("truthfulqa", examples, load_tokenizer(model_dir))
    for dtype in (torch.float32, torch.bfloat16):
        model = Llama.from_pretrained(model_dir, dtype=dtype)
        with torch.no_grad():
            one = torch.cat([train.pair_logprobs(model, data, [i], "cpu") for i in range(pairs)])  # (pairs, 2)
            eight = torch.cat([train.pair_logprobs(model, data, list(range(i, min(i + 8, pairs))), "cpu")
                               for i in range(0, pairs, 8)])
        diff = (one - eight).abs()
        print(f"{str(dtype).removeprefix('torch.')}: summed answer log-probs of {pairs} TruthfulQA pairs, batches "
              f"of 1 vs 8: max |difference| {diff.max():.2g} nats, mean {diff.mean():.2g}")


def compare(runs: list[Path]) -> None:
    def ranking(run):
        return [(r["layer"], r["head"]) for r in json.loads((run / "heads.json").read_text())["ranking"]]
    reference = ranking(runs[0])
    position = {head: i for i, head in enumerate(reference)}
    for run in runs[1:]:
        order, metrics = ranking(run), json.loads((run / "metrics.json").read_text())
        shared = ", ".join(f"{len(set(order[:k]) & set(reference[:k]))}/{k}" for k in (4, 8, 16))
        n = len(order)
        rho = 1 - 6 * sum((i - position[head]) ** 2 for i, head in enumerate(order)) / (n * (n * n - 1))
        test = {k: round(v, 4) for k, v in metrics["test"].items() if isinstance(v, float)}
        print(f"{run} vs {runs[0]}: top-4/8/16 heads shared {shared}, Spearman {rho:.3f}, "
              f"stage-2 final loss {metrics['train_loss']['stage2'][-1]:.4f}, test {test}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "weights" / "stories260K_hf"))
    p.add_argument("--data-dir", default=str(SHARED / "datasets"))
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--compare", nargs="+", type=Path, help="train.py output directories, the reference first")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.compare:
        compare(args.compare)
    else:
        init_and_batching(args.model, args.data_dir, args.pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
