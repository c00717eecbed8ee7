"""How fast can one greedy decoding step's matrix multiplies run on this CPU? (a measurement)

During batched greedy generation every new token multiplies each weight matrix by only B rows
(B = 8 here), so the step reads all the weights once and does little arithmetic per byte. This
script times the weights of the medium benchmark model (12 layers x 768, MLP 2048, vocab 32,000;
~440 MB in fp32, far more than the caches) multiplied by 8 rows, in several ways, and reports
GB of fp32 weights per second next to the memory bandwidth a plain `sum` over the same bytes
reaches:

    linear          torch.nn.functional.linear(x, W), W stored (out, in) as checkpoints store it
    pre-transposed  x @ W_t with W_t stored (in, out)
    oneDNN packed   torch.utils.mkldnn's prepacked linear
    fused           q/k/v as one (3 D, D) matrix and gate/up as one (2 I, D) matrix
    bf16            the same multiplies in bfloat16 (different numbers: for reference only)
    compiled        with --compile: torch.compile, max-autotune, weights frozen as constants
                    (inductor may pick its own C++ GEMM kernel over MKL; takes a minute or two)

    python benchmarks/decode_gemm.py --threads 1 [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.utils.mkldnn

D, INTER, LAYERS, VOCAB, ROWS = 768, 2048, 12, 32000, 8


def layer_weights(generator) -> list[torch.Tensor]:
    """One layer's q, k, v, o, gate, up, down weights, (out, in) each."""
    shapes = [(D, D)] * 4 + [(INTER, D)] * 2 + [(D, INTER)]
    return [torch.randn(shape, generator=generator) / shape[1] ** 0.5 for shape in shapes]


def seconds(fn, repeats: int) -> float:
    """Median CPU time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def compiled_step(weights: list[torch.Tensor], rows: dict[int, torch.Tensor]):
    """The F.linear step compiled by inductor with max-autotune, the weights frozen into the graph."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    inductor_config.max_autotune = True

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linears = torch.nn.ModuleList()
            for w in weights:
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                linear.weight = torch.nn.Parameter(w, requires_grad=False)
                self.linears.append(linear)

        def forward(self, x_model, x_inter):
            return [linear(x_inter if linear.in_features == INTER else x_model) for linear in self.linears]

    step = torch.compile(Step().eval())
    no_grad = torch.no_grad()
    return no_grad(lambda: step(rows[D], rows[INTER]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile max-autotune row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    layers = [layer_weights(generator) for _ in range(LAYERS)]
    lm_head = torch.randn(VOCAB, D, generator=generator) / D ** 0.5  # (vocab, D)
    weights = [w for layer in layers for w in layer] + [lm_head]
    rows = {width: torch.randn(ROWS, width, generator=generator) for width in (D, INTER)}  # (B, in)
    gigabytes = sum(w.numel() for w in weights) * 4 / 1e9

    transposed = [w.t().contiguous() for w in weights]  # (in, out)
    packed = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        packed.append(torch.utils.mkldnn.to_mkldnn(linear))
    fused = [m for q, k, v, o, gate, up, down in layers for m in (torch.cat([q, k, v]), o, torch.cat([gate, up]), down)]
    fused.append(lm_head)
    bf16 = [w.bfloat16() for w in weights]
    bf16_rows = {width: x.bfloat16() for width, x in rows.items()}
    flat = torch.cat([w.flatten() for w in weights])

    ways = {
        "linear": lambda: [torch.nn.functional.linear(rows[w.shape[1]], w) for w in weights],
        "pre-transposed": lambda: [rows[w.shape[0]] @ w for w in transposed],
        "oneDNN packed": lambda: [m(rows[w.shape[1]]) for m, w in zip(packed, weights)],
        "fused q/k/v, gate/up": lambda: [torch.nn.functional.linear(rows[w.shape[1]], w) for w in fused],
        "bf16 (other numbers)": lambda: [torch.nn.functional.linear(bf16_rows[w.shape[1]], w) for w in bf16],
        "sum over the weights": lambda: flat.sum(),
    }
    if args.compile:
        ways["compiled (max-autotune, frozen)"] = compiled_step(weights, rows)
    print(f"{torch.__version__}, {args.threads} thread(s); {gigabytes:.2f} GB of fp32 weights x {ROWS} rows per step")
    print("| way | ms per step | GB/s of fp32 weights |")
    print("|---|---:|---:|")
    for name, fn in ways.items():
        t = seconds(fn, args.repeats)
        print(f"| {name} | {t * 1e3:.1f} | {gigabytes / t:.1f} |")


if __name__ == "__main__":
    main()
