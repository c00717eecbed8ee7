"""Inference-Time Intervention (ITI; Li et al., NeurIPS 2023, arXiv 2306.03341): a learning-free baseline.

ITI edits the same place as LoFiT: head h's output z in layer l (its slice of o_proj's input).

1. Collect: run the base model on "Q: {question} A: {answer}" for every true and false answer of
   the training questions; keep each head's z at the last token (collect_head_activations).
2. Rank: fit one logistic-regression probe per head (true vs false) on the training questions and
   score it by its accuracy on the validation questions (probe_accuracies, rank_heads_iti).
3. Direction: u = unit(mean z of true answers - mean z of false answers), the "mass-mean" shift,
   and sigma = the standard deviation of z . u (iti_directions).
4. Intervene: z <- z + alpha * sigma * u on the top-K heads (K = 48, alpha = 15).

Step 4 is a LoFiT bias: v[l, h] = alpha * sigma * u with A = 0 (apply_iti). So ITI needs no hook to
run: it is saved as an ordinary adapter, merges into o_proj and is scored by eval.py like LoFiT.

    python iti.py --task truthfulqa --model meta-llama/Llama-2-7b-hf --fold 0 --out runs/iti_fold0
    python eval.py --task truthfulqa --model meta-llama/Llama-2-7b-hf --adapter runs/iti_fold0/adapter.safetensors

As in the original (likenneth/honest_llama, validate_2fold.py with --use_center_of_mass): the
prompt with BOS; the last token; the probe-train / probe-val split (LoFiT's fold CSVs are ITI's own
split: seed 42, validation ratio 0.2); probes with sklearn LogisticRegression()'s objective (L2,
C = 1, unpenalised intercept, decision > 0); the mass mean over train + val; the population std.
Where this differs, and why:
- The offset is added at every position, the prompt included: that is what makes it a LoFiT v and
  an o_proj bias. ITI adds it from the answer's first token on (MC scoring) or at the newest token.
- sigma is measured on the same train + val activations as the direction. ITI measures it on a
  second set ("Q: q A: a Q: another q") over all 817 questions, test questions included.
- The answers are the CSV's Correct / Incorrect Answers (the lists the MC metrics score); ITI's
  probes read the HF dataset's MC2 candidates, which are nearly the same lists.
- Probes are solved exactly by Newton's method for many heads at once, not by lbfgs head by head.
- Heads with equal probe accuracy are ordered by (layer, head); np.argsort leaves that to the sort.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import eval as evaluation  # the module, not the builtin: its evaluate() scores the test set
from adapter import save_adapter
from data import TASKS, load_examples
from lofit import (
    HeadScore,
    LoFiT,
    attentions,
    check_heads,
    install,
    offsets_disabled,
    reset_offsets,
    select_heads,
)
from machinery import rundir
from machinery.checkpoints import load_model
from machinery.flags import (
    UsageError,
    add_common_flags,
    check_flags,
    check_out_dir,
    report_error,
    resolve_device,
    resolve_dtype,
)
from machinery.heads_file import write_heads_file
from model import LofitError
from storage.atomic import reported_write, write_json_atomically
from tokenizer import load_tokenizer

PROMPT = "Q: {question} A: {answer}"


# ----------------------------------------------------------------------------------------------
# 1. Head outputs at the last token


def iti_texts(examples) -> tuple[list[str], torch.Tensor]:
    """ITI's probing texts: "Q: {question} A: {answer}" for each true, then each false answer.

    Args:
        examples: data.Example items with question, true_answers and false_answers (TruthfulQA).

    Returns:
        (texts, labels): labels (N,) long, 1 for a true answer and 0 for a false one.

    Raises:
        ValueError: an example without both true and false answers (only TruthfulQA has them).
    """
    texts, labels = [], []
    for ex in examples:
        if not ex.question or not ex.true_answers or not ex.false_answers:
            raise ValueError(f"example {ex.id!r} has no question with true and false answers; ITI probes "
                             f"need them (TruthfulQA has them; other tasks do not)")
        for answers, label in ((ex.true_answers, 1), (ex.false_answers, 0)):
            texts += [PROMPT.format(question=ex.question, answer=a) for a in answers]
            labels += [label] * len(answers)
    return texts, torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def collect_head_activations(model, tokenizer, texts: list[str], batch_size: int = 8,
                             progress: bool = False) -> torch.Tensor:
    """Every head's output z at the last token of each text, from the base model (offsets off).

    z is read where model.py forms it, as the input of each layer's o_proj (a forward pre-hook
    that only reads). Texts get BOS; batches are right-padded, which leaves the last real token's
    z unchanged (attention is causal and padding is masked).

    Args:
        model: A Llama. tokenizer: Its tokenizer. texts: N strings.
        batch_size: Texts per forward pass (texts of similar length are batched together).

    Returns:
        (N, L, H, head_dim) float32 on the CPU, in the order of `texts`.
    """
    cfg = model.config
    device = model.embed_tokens.weight.device
    ids = tokenizer.encode_batch(texts, bos=True)
    out = torch.empty(len(texts), cfg.n_layers, cfg.n_heads, cfg.head_dim)  # (N, L, H, hd)
    where = {}  # the current batch: rows, last positions, and which texts they are

    def reader(layer):
        def hook(module, inputs):
            z = inputs[0][where["rows"], where["last"]]  # (B, H * hd): each row's last real token
            out[where["texts"], layer] = z.view(-1, cfg.n_heads, cfg.head_dim).float().cpu()
        return hook

    handles = [attn.o_proj.register_forward_pre_hook(reader(layer)) for layer, attn in enumerate(attentions(model))]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        with offsets_disabled(model):
            for batch in tqdm(batches, desc="head activations", disable=not progress, leave=False):
                lengths = torch.tensor([len(ids[i]) for i in batch])
                width = int(lengths.max())
                input_ids = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)  # (B, T)
                for row, i in enumerate(batch):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                mask = (torch.arange(width) < lengths[:, None]).long()  # (B, T)
                where.update(rows=torch.arange(len(batch), device=device), last=(lengths - 1).to(device),
                             texts=torch.tensor(batch))
                model.hidden_states(input_ids.to(device), mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return out


# ----------------------------------------------------------------------------------------------
# 2. Probes: one logistic regression per head


def fit_probes(X: torch.Tensor, y: torch.Tensor, l2: float = 1.0, max_steps: int = 100,
               tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic-regression probes for G heads at once, with sklearn LogisticRegression()'s objective.

    For each head, minimise 0.5 * l2 * ||w||^2 + sum_i [softplus(s_i) - y_i * s_i], s_i = w . x_i + b
    (l2 = 1 / C; the intercept b is not penalised). The objective is strictly convex, so its
    minimum is unique; Newton's method with step halving reaches it in a few steps, in float64.

    Args:
        X: (G, N, d) features of N examples for each of G heads.
        y: (N,) labels, 0 or 1.
        l2: Weight of the L2 penalty (sklearn's default C = 1.0 is l2 = 1.0); must be positive.

    Returns:
        (w (G, d), b (G,)), float64 on X's device.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive (it keeps separable data from diverging), got {l2}")
    G, N, d = X.shape
    X1 = torch.cat([X.double(), X.new_ones(G, N, 1, dtype=torch.float64)], dim=-1)  # (G, N, d + 1)
    y = y.to(X1)  # (N,)
    penalty = torch.full((d + 1,), float(l2), dtype=torch.float64, device=X.device)
    penalty[-1] = 0.0  # no penalty on the intercept

    def objective(theta):  # (G,)
        s = (X1 @ theta[..., None])[..., 0]  # (G, N)
        return 0.5 * (penalty * theta ** 2).sum(-1) + (F.softplus(s) - y * s).sum(-1)

    theta = torch.zeros(G, d + 1, dtype=torch.float64, device=X.device)  # (G, d + 1): w then b
    loss = objective(theta)
    for _ in range(max_steps):
        p = torch.sigmoid((X1 @ theta[..., None])[..., 0])  # (G, N)
        grad = (X1 * (p - y)[..., None]).sum(1) + penalty * theta  # (G, d + 1)
        if grad.abs().max() <= tol * N:
            break
        hessian = X1.transpose(1, 2) @ (X1 * (p * (1 - p))[..., None]) + torch.diag(penalty)  # (G, d+1, d+1)
        step = torch.linalg.solve(hessian, grad)  # (G, d + 1)
        t = torch.ones(G, 1, dtype=torch.float64, device=X.device)  # per-head step size
        for _ in range(40):  # halve the step of every head whose objective would rise
            worse = objective(theta - t * step) > loss
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        theta = theta - t * step
        loss = objective(theta)
    return theta[:, :-1], theta[:, -1]


def probe_accuracies(acts: torch.Tensor, labels: torch.Tensor, val_acts: torch.Tensor, val_labels: torch.Tensor,
                     l2: float = 1.0, heads_per_chunk: int = 64, device=None) -> torch.Tensor:
    """Validation accuracy of each head's probe (fit_probes), the score ITI ranks heads by.

    Args:
        acts: (N, L, H, hd) training activations; labels: (N,) 0/1.
        val_acts: (M, L, H, hd) validation activations; val_labels: (M,) 0/1.
        l2: The probes' L2 weight. heads_per_chunk: Heads fitted together (memory vs speed).
        device: Where to fit (default: acts' device).

    Returns:
        (L, H) float32: the fraction of validation examples whose label the probe predicts
        (class 1 where w . x + b > 0).
    """
    N, L, H, hd = acts.shape
    device = device or acts.device
    flat, val_flat = acts.reshape(N, L * H, hd), val_acts.reshape(len(val_acts), L * H, hd)
    val_y = val_labels.to(device).bool()  # (M,)
    scores = []
    for start in range(0, L * H, heads_per_chunk):
        X = flat[:, start:start + heads_per_chunk].transpose(0, 1).to(device)  # (G, N, hd)
        w, b = fit_probes(X, labels.to(device), l2)
        X_val = val_flat[:, start:start + heads_per_chunk].transpose(0, 1).to(device).double()  # (G, M, hd)
        predicted = (X_val @ w[..., None])[..., 0] + b[:, None] > 0  # (G, M)
        scores.append((predicted == val_y).double().mean(-1))  # (G,)
    return torch.cat(scores).float().cpu().view(L, H)


def rank_heads_iti(accuracies: torch.Tensor) -> list[HeadScore]:
    """Heads by probe accuracy, best first, ties by (layer, head): the format of lofit.rank_heads."""
    L, H = accuracies.shape
    ranking = [HeadScore(layer, h, float(accuracies[layer, h])) for layer in range(L) for h in range(H)]
    return sorted(ranking, key=lambda r: (-r.score, r.layer, r.head))


# ----------------------------------------------------------------------------------------------
# 3. Directions and 4. the intervention


def iti_directions(acts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's mass-mean direction u and the spread sigma of the activations along it.

    u = (mean of true-answer activations - mean of false-answer ones), scaled to unit length (0
    where the two means are equal); sigma = population standard deviation (numpy's np.std) of
    z . u over all N activations. Computed in float64, one layer at a time.

    Args:
        acts: (N, L, H, hd) activations; labels: (N,) 1 for true answers, 0 for false ones.

    Returns:
        (u (L, H, hd), sigma (L, H)), float32.
    """
    if not (labels == 1).any() or not (labels == 0).any():
        raise ValueError("ITI directions need activations of both true (1) and false (0) answers")
    true, false = labels == 1, labels == 0
    us, sigmas = [], []
    for layer in range(acts.shape[1]):
        z = acts[:, layer].double()  # (N, H, hd)
        shift = z[true].mean(0) - z[false].mean(0)  # (H, hd)
        norm = shift.norm(dim=-1, keepdim=True)  # (H, 1)
        u = torch.where(norm > 0, shift / norm.clamp_min(1e-300), torch.zeros_like(shift))  # (H, hd)
        projection = (z * u).sum(-1)  # (N, H)
        us.append(u)
        sigmas.append(projection.std(dim=0, correction=0))  # (H,)
    return torch.stack(us).float(), torch.stack(sigmas).float()


def apply_iti(model, heads, u: torch.Tensor, sigma: torch.Tensor, alpha: float) -> None:
    """Make `model` the ITI model: v[l, h] = alpha * sigma[l, h] * u[l, h] on `heads`, all else 0.

    Every A and every other v is set to 0, so the result is exactly a LoFiT stage-2 model (save it
    with adapter.save_adapter, merge it with adapter.merge_offsets). alpha = 0 is the base model.

    Args:
        model: A Llama, changed in place. heads: (layer, head) pairs, e.g. the top K of rank_heads_iti.
        u: (L, H, hd) unit directions. sigma: (L, H) spreads. alpha: The strength (ITI: 15).
    """
    heads = check_heads(model, heads)
    install(model, LoFiT())  # ITI's shift is LoFiT's v; any other form is taken off
    reset_offsets(model)
    with torch.no_grad():
        for layer, head in heads:
            v = alpha * sigma[layer, head] * u[layer, head]  # (hd,)
            attn = attentions(model)[layer]
            attn.lofit_v[head] = v.to(attn.lofit_v.device, attn.lofit_v.dtype)


# ----------------------------------------------------------------------------------------------
# All four steps


@dataclass
class ITIProbes:
    """What ITI learns from the data before choosing K and alpha."""
    accuracies: torch.Tensor  # (L, H) probe accuracy on the validation questions
    u: torch.Tensor  # (L, H, hd) unit mass-mean directions
    sigma: torch.Tensor  # (L, H) std of the activations along u
    n_train: int  # probing texts (answers) of the training questions
    n_val: int  # probing texts of the validation questions

    def ranking(self) -> list[HeadScore]:
        return rank_heads_iti(self.accuracies)


def fit_iti(model, tokenizer, train_examples, val_examples, *, batch_size: int = 8, l2: float = 1.0,
            progress: bool = False) -> ITIProbes:
    """Steps 1-3: activations of both splits, probes fitted on train and scored on val, directions.

    Args:
        model: The base Llama (its offsets are ignored while reading activations).
        train_examples: Questions the probes and directions are fitted on (TruthfulQA train split).
        val_examples: Questions the probes are scored on (TruthfulQA val split); they also count
            for the directions, as in ITI.
    """
    texts, labels = iti_texts(train_examples)
    val_texts, val_labels = iti_texts(val_examples)
    acts = collect_head_activations(model, tokenizer, texts, batch_size, progress)  # (N, L, H, hd)
    val_acts = collect_head_activations(model, tokenizer, val_texts, batch_size, progress)  # (M, L, H, hd)
    accuracies = probe_accuracies(acts, labels, val_acts, val_labels, l2=l2,
                                  device=model.embed_tokens.weight.device)
    u, sigma = iti_directions(torch.cat([acts, val_acts]), torch.cat([labels, val_labels]))
    return ITIProbes(accuracies, u, sigma, len(texts), len(val_texts))


# ----------------------------------------------------------------------------------------------
# Command line: ITI on a task -> heads.json, adapter.safetensors, metrics.json, eval_details.json


OUTPUT_FILES = rundir.RUNS["iti.py"].outputs  # rundir.py knows what each command writes


@dataclass
class ITISettings:
    """The choices of one ITI run (flags with defaults filled in)."""
    k: int
    alpha: float
    l2: float
    dtype: str
    device: str


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ITI: probe-ranked heads shifted by alpha * sigma * u, no training.")
    p.add_argument("--task", default="truthfulqa", choices=TASKS, help="needs true and false answers: truthfulqa")
    add_common_flags(p)
    p.add_argument("--out", help="output directory (default runs/iti_<task>)")
    p.add_argument("--fold", type=int, default=0, help="TruthfulQA fold (0 or 1)")
    p.add_argument("--k", type=int, default=48, help="heads to intervene on (ITI: 48)")
    p.add_argument("--alpha", type=float, default=15.0, help="intervention strength (ITI: 15)")
    p.add_argument("--probe-l2", type=float, default=1.0, help="probe L2 weight, 1/C (sklearn default: 1)")
    p.add_argument("--train-size", type=int, help="training questions to probe (default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the --train-size draw")
    p.add_argument("--no-eval", action="store_true", help="write the adapter only (score it later with eval.py)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's outputs in --out")
    args = p.parse_args(argv)
    args.out = f"runs/iti_{args.task}" if args.out is None else args.out
    return args


def check_args(args) -> ITISettings:
    """Reject bad flags before anything is loaded (main then claims --out: rundir.py)."""
    if args.task != "truthfulqa":
        raise UsageError(f"ITI probes true vs false answers, which only truthfulqa has, not {args.task}; "
                         f"to use ITI's heads on {args.task}, run iti.py --task truthfulqa and pass its heads.json "
                         f"to train.py --task {args.task} --heads")
    check_flags(args)
    check_out_dir(args.out, overwrite=args.overwrite)
    device = resolve_device(args.device)
    return ITISettings(args.k, args.alpha, args.probe_l2, resolve_dtype(args.dtype, device), device)


def run(args) -> dict:
    """Load, fit ITI, write the adapter and heads, evaluate; return the metrics."""
    started = time.time()
    settings = check_args(args)
    model = load_model(args.model, dtype=getattr(torch, settings.dtype), device=settings.device,
                       progress=sys.stderr.isatty())
    total = model.config.n_layers * model.config.n_heads
    if settings.k > total:
        raise UsageError(f"K = {settings.k} is more than the model's {total} heads "
                         f"({model.config.n_layers} layers x {model.config.n_heads}); pass a smaller --k")
    tokenizer = load_tokenizer(args.model, backend=args.tokenizer)
    train = load_examples(args.task, "train", fold=args.fold, data_dir=args.data_dir,
                          train_size=args.train_size if args.train_size is not None else 0, seed=args.seed)
    val = load_examples(args.task, "val", fold=args.fold, data_dir=args.data_dir)
    try:
        probes = fit_iti(model, tokenizer, train, val, batch_size=args.eval_batch_size, l2=settings.l2,
                         progress=True)
    except ValueError as e:
        raise UsageError(f"--task {args.task}: {e}") from None
    ranking = probes.ranking()
    heads = select_heads(ranking, k=settings.k)
    apply_iti(model, heads, probes.u, probes.sigma, settings.alpha)

    out = Path(args.out)  # held by main (rundir.claim): the run it replaces is kept until this one finishes
    record = {"flags": vars(args), "resolved": asdict(settings), "method": "iti"}
    write_json_atomically(out / "config.json", record)
    config = model.config
    write_heads_file(out / "heads.json", ranking, heads, task=args.task, model=args.model,
                     source="ITI probe accuracy on the validation questions", config=config)
    hparams = {"method": "iti", "k": settings.k, "alpha": settings.alpha, "probe_l2": settings.l2,
               "fold": args.fold, "seed": args.seed}
    with reported_write(out / "adapter.safetensors"):
        save_adapter(out / "adapter.safetensors", model, heads, stage=2, task=args.task, hparams=hparams)
    metrics = {"method": "iti", "k": settings.k, "alpha": settings.alpha,
               "probe_texts": {"train": probes.n_train, "val": probes.n_val},
               "probe_accuracy": {"selected_mean": sum(s for _, _, s in ranking[:settings.k]) / settings.k,
                                  "best": ranking[0].score},
               "sigma_selected": [float(probes.sigma[layer, h]) for layer, h in heads]}
    if not args.no_eval:
        test = load_examples(args.task, "test", fold=args.fold, data_dir=args.data_dir)[:args.limit]
        result = evaluation.evaluate(model, tokenizer, args.task, test, batch_size=args.eval_batch_size)
        metrics["test"] = result["summary"]
        write_json_atomically(out / "eval_details.json", result["details"])
        print("test: " + json.dumps(result["summary"]))
    write_json_atomically(out / "metrics.json", metrics)
    write_json_atomically(out / "config.json", {**record, "seconds": round(time.time() - started, 1)})
    rundir.commit(out, checkpoint=None)
    print(f"outputs in {out}: " + ", ".join(n for n in OUTPUT_FILES if (out / n).exists()))
    return metrics


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_args(args)
        with rundir.claim(args.out, OUTPUT_FILES, overwrite=args.overwrite,
                          command=rundir.command_line("iti.py", argv)):
            run(args)
    except LofitError as e:
        return report_error(e)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out} was left as it was before this run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
