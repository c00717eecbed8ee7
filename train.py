"""Train LoFiT end to end: stage 1 -> head ranking -> stage 2 -> test-set evaluation -> outputs.

    python train.py --task clutrr --model ../shared/weights/stories260K_hf --out runs/clutrr
    torchrun --nproc_per_node 8 train.py --task truthfulqa --out runs/tqa     # meta-llama/Llama-2-7b-hf
    python train.py --task clutrr --intervention examples/low_rank.py --intervention-arg rank=2

Read top to bottom: the flags -> one Settings built from them (paper defaults filled in) -> the
stages, which see only Settings -> outputs. Stage 1 trains the scale A of every head with an L1
penalty; heads are ranked by ||A||_2 (choose_heads; or seeded random heads, ITI's probe ranking,
a heads.json). Stage 2 starts again from the base model and trains the chosen form
(--intervention; LoFiT's bias v by default) on the top K heads only (method.md). The defaults are
the paper's per task and model (PAPER_TABLE); every flag overrides one of them. Each optimiser
step is logged to metrics.jsonl (and to wandb with --wandb PROJECT).

Under torchrun the result does not depend on the number of processes; the frozen base is
replicated or sharded (--sharding), and the DPO reference pass and evaluation are split across
ranks: distributed.py says how. Only rank 0 writes files and shows progress. Checkpoints after
every epoch (atomic) let --resume continue a killed run to the same adapter as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from adapter import save_adapter
from data import TASK_INFO, TASKS, collate, load_examples, tokenize_ce, tokenize_dpo
from eval import evaluate_split, warn_beyond_context
from iti import fit_iti
from lofit import (
    HeadScore,
    Intervention,
    ce_loss,
    dpo_loss,
    l1_penalty,
    offsets_disabled,
    pair_answer_logprobs,
    rank_heads,
    select_heads,
    setup_stage1,
    setup_stage2,
    trainable_count,
)
from machinery import rundir
from machinery.basics.atomic import WriteError, reported_write, save_torch_atomically, write_json_atomically
from machinery.checkpoints import read_model_config
from machinery.distributed import (
    Dist,
    add_sharding_flag,
    barrier,
    choose_sharding,
    close_distributed,
    gather_lists,
    load_model,
    lockstep,
    rank_share,
    rank_slice,
    same_on_every_rank,
    setup_distributed,
    sync_gradients,
)
from machinery.flags import (
    UsageError,
    add_common_flags,
    add_intervention_flags,
    check_flags,
    check_out_dir,
    report_error,
    resolve_dtype,
    resolve_intervention,
)
from machinery.heads_file import heads_file_source, plot_heads, random_ranking, read_heads_file, write_heads_file
from machinery.runlog import StepLog
from model import LofitError
from tokenizer import load_tokenizer

OUTPUT_FILES = ("config.json", "heads.json", "adapter.safetensors", "metrics.json", "metrics.jsonl",
                "eval_details.json", "heads.png", "checkpoint.pt")

# method.md: (stage-1 lr, lambda, stage-2 lr, K) for each task and model of the paper.
PAPER_TABLE = {
    ("truthfulqa", "llama-2-7b"): (5e-3, 5e-4, 1e-2, 32), ("truthfulqa", "llama-2-13b"): (1e-3, 1e-3, 2e-2, 48),
    ("truthfulqa", "gemma-7b"): (5e-3, 5e-4, 2e-2, 16),
    ("mquake", "llama-2-7b"): (5e-3, 1e-3, 1e-2, 32), ("mquake", "llama-2-13b"): (1e-3, 1e-3, 8e-3, 48),
    ("mquake", "gemma-7b"): (5e-3, 5e-4, 8e-3, 16),
    ("clutrr", "llama-2-7b"): (5e-4, 5e-3, 1e-2, 32), ("clutrr", "llama-2-13b"): (1e-3, 1e-3, 1e-2, 48),
    ("clutrr", "gemma-7b"): (5e-4, 5e-3, 1e-2, 16),
}
# The paper's models, recognised by shape: (model_type, layers, heads, kv heads, hidden size).
PAPER_MODELS = {("llama", 32, 32, 32, 4096): "llama-2-7b", ("llama", 40, 40, 40, 5120): "llama-2-13b",
                ("gemma", 28, 16, 16, 3072): "gemma-7b"}


@dataclass
class Hparams:
    """The hyperparameters this run uses once the defaults are filled in, and where they came from."""
    lr_a: float
    l1: float
    lr_v: float
    k: int
    dtype: str
    source: str


def resolve_hparams(args, config, device_type: str) -> Hparams:
    """Fill unset flags from the paper's table for (task, model); explain the choice in `source`."""
    total = config.n_layers * config.n_heads
    family = PAPER_MODELS.get((config.model_type, config.n_layers, config.n_heads, config.n_kv_heads,
                               config.hidden_size))
    table_task = args.task if args.task in ("truthfulqa", "mquake", "clutrr") else "mquake"
    lr_a, l1, lr_v, k = PAPER_TABLE[(table_task, family or "llama-2-7b")]
    source = f"paper table, {args.task} x {family}" if family else \
        f"{args.task}: model not in the paper's table, so the Llama-2-7B row and K = 3% of {total} heads"
    if family is None:
        k = max(1, int(0.03 * total))  # rounded down, as the original's int(0.1 * L * H)
    if table_task != args.task:  # SIQA / ARC / BoolQ: short-answer CE tasks, "10%" of heads (paper Table 3)
        # The paper's Table 3 and its released Llama-2-7B checkpoints use 96 heads, which it calls 10%.
        k = 96 if family == "llama-2-7b" else max(1, int(0.10 * total))
        source = f"{args.task} (not in the paper's table): MQuAKE's row for this model and K = {k} " \
                 f"(the paper's 10% of {total} heads)"
    if args.k is not None:
        k = args.k
    elif args.k_percent is not None:
        k = int(args.k_percent / 100 * total)
    if k > total:
        raise UsageError(f"K = {k} is more than the model's {total} heads "
                         f"({config.n_layers} layers x {config.n_heads}); pass a smaller --k")
    if k < 1:
        raise UsageError(f"--k-percent {args.k_percent} of {total} heads is less than one head; pass a larger one")
    dtype = resolve_dtype(args.dtype, device_type)
    return Hparams(args.lr_a or lr_a, args.l1 if args.l1 is not None else l1, args.lr_v or lr_v, k, dtype, source)


# ----------------------------------------------------------------------------------------------
# Flags, and the Settings built from them once


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoFiT: stage 1 (head selection), stage 2 (bias tuning), evaluation.")
    p.add_argument("--task", required=True, choices=TASKS)
    add_common_flags(p)
    add_sharding_flag(p)
    p.add_argument("--out", help="output directory (default runs/<task>)")
    p.add_argument("--stage", choices=("1", "2", "both"), help="default: both, or 2 when heads come from elsewhere")
    p.add_argument("--heads", help="heads.json of an earlier run: skip stage 1 and use its ranking")
    p.add_argument("--head-selection", choices=("lofit", "random", "iti", "file"),
                   help="stage 2's heads: lofit (stage 1's ranking; the default), random (drawn with --seed), "
                        "iti (ITI probe accuracy; truthfulqa), file (--heads FILE; the default with --heads)")
    add_intervention_flags(p)
    k = p.add_mutually_exclusive_group()
    k.add_argument("--k", type=int, help="number of heads for stage 2 (default: the paper's)")
    k.add_argument("--k-percent", type=float, help="K as a percentage of all heads")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimiser step, over all processes")
    p.add_argument("--micro-batch-size", type=int, help="per forward pass (default: the whole per-rank share)")
    p.add_argument("--lr-a", type=float, help="stage-1 learning rate")
    p.add_argument("--lr-v", type=float, help="stage-2 learning rate")
    p.add_argument("--l1", type=float, help="stage-1 L1 weight lambda")
    p.add_argument("--beta", type=float, default=0.5, help="DPO beta (TruthfulQA)")
    p.add_argument("--init-std", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fold", type=int, default=0, help="TruthfulQA fold (0 or 1)")
    p.add_argument("--train-size", type=int, help="training examples to draw (default: the task's; 0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's outputs in --out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs (both stages counted), keeping the checkpoint for --resume")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation (score it later with eval.py)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log every step to this Weights & Biases project")
    args = p.parse_args(argv)
    args.out = f"runs/{args.task}" if args.out is None else args.out
    args.head_selection = args.head_selection or ("file" if args.heads else "lofit")
    args.stage = args.stage or ("both" if args.head_selection == "lofit" else "2")
    return args


def validate(args):
    """Reject impossible flag values and combinations before anything is loaded."""
    check_flags(args)
    if args.heads and args.head_selection != "file":
        raise UsageError(f"--heads FILE goes with --head-selection file, not {args.head_selection}")
    if args.head_selection == "file" and not args.heads:
        raise UsageError("--head-selection file needs --heads FILE (a heads.json of an earlier run)")
    if args.head_selection != "lofit" and args.stage != "2":
        chosen_by = "--heads" if args.heads else f"--head-selection {args.head_selection}"
        raise UsageError(f"{chosen_by} replaces stage 1, so it goes with --stage 2 (the default then)")
    if args.stage == "2" and args.head_selection == "lofit":
        raise UsageError("--stage 2 needs --heads FILE (a heads.json from a stage-1 run) or "
                         "--head-selection random or iti")
    if args.head_selection == "iti" and args.task != "truthfulqa":
        raise UsageError(f"--head-selection iti probes true vs false answers, which only truthfulqa has; for "
                         f"{args.task}, run iti.py on truthfulqa and pass its heads.json with --heads")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and ":" in args.device:
        raise UsageError(f"--device {args.device}: under torchrun each process uses cuda:LOCAL_RANK; "
                         f"pass --device cuda")
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    check_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)  # its content: claim_out_dir


def claim_out_dir(args, d: "Dist", argv):
    """Rank 0 holds --out for the whole run (rundir.py): one run at a time, --overwrite keeps the old
    outputs until this run has finished, a start that fails before its first checkpoint is undone."""
    if not d.main:
        return contextlib.nullcontext()
    return rundir.claim(args.out, OUTPUT_FILES, overwrite=args.overwrite, resume=args.resume,
                        checkpoint="checkpoint.pt", command=rundir.command_line("train.py", argv))


@dataclass
class Settings:
    """Everything a run does, decided once from the flags and the model's config; the stages read only this."""
    task: str
    model: str
    data_dir: str | None
    out: Path
    stage: str  # "1", "2" or "both"
    head_selection: str  # lofit, random, iti or file
    heads: str | None  # the --heads file
    given: list | None  # its ranking
    hp: Hparams  # lr_a, l1, lr_v, k, dtype and where they came from
    sharding: tuple[str, str]  # under torchrun: ("replicate" or "shard", why), distributed.choose_sharding
    intervention: Intervention  # stage 2's form, with its hyperparameters
    epochs: int
    batch_size: int
    micro_batch_size: int | None
    beta: float
    init_std: float
    seed: int
    fold: int
    train_size: int | None
    limit: int | None
    no_eval: bool
    eval_batch_size: int
    tokenizer: str
    resume: bool
    overwrite: bool
    stop_after: int | None
    wandb: str | None

    def key(self) -> dict:
        """What decides the result; --resume refuses a checkpoint made with another key."""
        control = {"out", "overwrite", "resume", "stop_after", "micro_batch_size", "limit", "no_eval",
                   "eval_batch_size", "given", "hp", "intervention", "wandb", "sharding"}
        own = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in control}
        hp = {k: v for k, v in asdict(self.hp).items() if k != "source"}
        return {**own, **hp, "intervention": {"name": self.intervention.name, **self.intervention.hparams()}}


def settings_from_flags(args, d: Dist) -> Settings:
    """Fill in every default (the paper's table, the form, K) and check what needs the model's config."""
    config = read_model_config(args.model)
    hp = resolve_hparams(args, config, d.device.type)
    form = resolve_intervention(args.intervention, args.intervention_arg)
    try:
        form.parameters(config)
    except ValueError as e:
        raise UsageError(f"--intervention {form.name}: {e}") from None
    given = read_heads_file(args.heads, config) if args.heads else None
    if given is not None and hp.k > len(given):
        raise UsageError(f"K = {hp.k} but --heads {args.heads} ranks only {len(given)} heads; pass a smaller --k")
    own = {name: getattr(args, name) for name in Settings.__dataclass_fields__ if hasattr(args, name)}
    sharding = choose_sharding(args.sharding, config, getattr(torch, hp.dtype), d)
    return Settings(**{**own, "out": Path(args.out), "given": given, "hp": hp,
                       "intervention": form, "sharding": sharding})


# ----------------------------------------------------------------------------------------------
# Head choice: stage 1, a file, random, ITI, or the checkpoint being resumed


def choose_heads(run: Run, model, tokenizer, examples, data: TrainData, resume, metrics) -> tuple[list, str]:
    """Stage 2's ranking [(layer, head, score or None)], best first, and where it came from.

    Stage 1 (the default) trains A and ranks heads by ||A||_2; its losses go to metrics["train_loss"].
    """
    s = run.s
    if s.stage != "2" and not (resume and resume["stage"] == 2):
        params = setup_stage1(model, init_std=s.init_std, generator=torch.Generator().manual_seed(s.seed))
        metrics["train_loss"]["stage1"] = train_stage(run, 1, model, params, data, resume)
        return [(h.layer, h.head, float(h.score)) for h in rank_heads(model)], "stage 1 of this run"
    if resume is not None:
        metrics["train_loss"].update(resume["extra"]["train_loss"])
        return [tuple(r) for r in resume["extra"]["ranking"]], resume["extra"]["source"]
    if s.head_selection == "file":
        return s.given, f"--heads {s.heads}" + heads_file_source(s.heads)
    if s.head_selection == "random":
        return random_ranking(model.config.n_layers, model.config.n_heads, s.seed), f"random heads, seed {s.seed}"
    val = load_examples(s.task, "val", fold=s.fold, data_dir=s.data_dir)
    with lockstep(model, run.d):  # a sharded base: every rank joins every forward pass
        probes = fit_iti(model, tokenizer, examples, val, batch_size=s.eval_batch_size, progress=run.d.main)
    return [tuple(r) for r in probes.ranking()], "ITI probe accuracy on the validation questions"


# ----------------------------------------------------------------------------------------------
# Training data and losses


@dataclass
class TrainData:
    """Tokenized training examples: (ids, loss_mask) pairs for CE, tokenize_dpo dicts for DPO."""
    loss: str  # "ce" or "dpo"
    items: list
    pad_id: int
    reference: torch.Tensor | None = None  # DPO: (N, 2) base-model log-probs of chosen, rejected

    def normaliser(self, batch: list[int]) -> int:
        """What a global batch's loss is averaged over: its answer tokens (CE) or its pairs (DPO)."""
        if self.loss == "dpo":
            return len(batch)
        return max(1, sum(sum(self.items[i][1][1:]) for i in batch))  # 1: a batch of no-answer examples adds 0

    def tokens(self, batch: list[int]) -> int:
        """Tokens a global batch runs through the model (DPO: chosen and rejected sequences)."""
        if self.loss == "dpo":
            return sum(len(self.items[i][f"{side}_input_ids"]) for i in batch for side in ("chosen", "rejected"))
        return sum(len(self.items[i][0]) for i in batch)

    def sequences(self) -> list[list[int]]:
        """Every token sequence the model reads in training (both answers of a DPO pair)."""
        if self.loss == "dpo":
            return [item[f"{side}_input_ids"] for item in self.items for side in ("chosen", "rejected")]
        return [ids for ids, _ in self.items]


def tokenize_training_set(task, examples, tokenizer) -> TrainData:
    info = TASK_INFO[task]
    if info.loss == "ce":
        items = [tokenize_ce(tokenizer, ex.prompt, ex.answer, max_len=info.max_len) for ex in examples]
    else:
        items = [tokenize_dpo(tokenizer, ex.prompt, ex.answer, ex.rejected, max_len=info.max_len,
                              max_prompt_len=info.max_prompt_len) for ex in examples]
    return TrainData(info.loss, items, tokenizer.pad_id)


def pair_logprobs(model, data: TrainData, chunk: list[int], device) -> torch.Tensor:
    """(n, 2) summed answer log-probs of the chosen and rejected answers of pairs `chunk`.

    Each pair's shared prompt runs once (lofit.pair_answer_logprobs: 9-10% faster per DPO step on
    CPU, benchmarks/README.md; equal to running both full sequences up to fp32 rounding), except
    under FSDP sharding, whose blocks reshard after each forward and cannot serve two forwards of
    a block before one backward: there both full sequences run in one batch.
    """
    return pair_answer_logprobs(model, [data.items[i] for i in chunk], data.pad_id, device,
                                shared_prefix=not isinstance(model, FSDPModule))


@torch.no_grad()
def reference_logprobs(model, data: TrainData, batch_size: int, d: Dist, progress: bool = False) -> torch.Tensor:
    """DPO's reference: every pair's log-probs under the base model (LoFiT off), computed once.

    Each rank computes its rank_slice of the pairs; every rank gets all of them, in order.
    """
    mine = list(range(len(data.items)))[rank_slice(len(data.items), d)]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = tqdm(chunks, desc="DPO reference log-probs", disable=not (progress and d.main), dynamic_ncols=True)
    with offsets_disabled(model), lockstep(model, d):
        rows = [pair_logprobs(model, data, chunk, d.device).float().cpu() for chunk in bar]
    return torch.cat(gather_lists(rows, d)).to(d.device)  # (N, 2)


def micro_batch_loss(model, data: TrainData, chunk: list[int], normaliser: int, beta: float, device):
    """This micro-batch's share of the global batch's mean loss: its summed loss / the batch normaliser."""
    if data.loss == "dpo":
        policy = pair_logprobs(model, data, chunk, device)  # (n, 2)
        reference = data.reference[chunk]  # (n, 2)
        per_pair_mean = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=beta)
        return per_pair_mean * len(chunk) / normaliser
    batch = {k: v.to(device) for k, v in collate([data.items[i] for i in chunk], data.pad_id).items()}
    return ce_loss(model, batch) * batch["loss_mask"][:, 1:].sum() / normaliser  # token mean -> token sum


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded with seed + epoch, cut in order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------
# One stage: epochs of AdamW steps, each logged, a checkpoint after each epoch


@dataclass
class Run:
    """What every stage of one run shares."""
    s: Settings
    d: Dist
    log: StepLog
    epochs_run: int = 0  # epochs finished by this process, for --stop-after


class Stopped(Exception):
    """--stop-after was reached; the checkpoint holds everything --resume needs."""


class Diverged(LofitError):
    """The loss or the gradient stopped being a finite number; the last good checkpoint is kept."""


def checkpoint_summary(out: Path) -> str | None:
    """'stage S, after epoch E' for the checkpoint in `out`, or None where there is none (or it is unreadable)."""
    try:
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        return f"stage {state['stage']}, after epoch {state['epoch']}"
    except Exception:
        return None


def check_finite(run: "Run", stage: int, epoch: int, step: int, loss: float, grad_norm: torch.Tensor):
    """Stop before a NaN/inf loss or gradient reaches the parameters (and from there every checkpoint)."""
    if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {float(grad_norm)}"
    kept = checkpoint_summary(run.s.out)
    kept = f"the last good checkpoint ({kept}) is kept in {run.s.out / 'checkpoint.pt'}" if kept else \
        "no checkpoint had been saved yet"
    raise Diverged(f"stage {stage} epoch {epoch + 1} step {step + 1}: {what}, not a finite number, so training "
                   f"stopped before it could reach the parameters; {kept}. Check the model's weights for "
                   f"NaN/inf, or lower the learning rate (--lr-a / --lr-v)")


def log(d: Dist, message: str):
    if d.main:
        print(message, flush=True)


def train_stage(run: Run, stage: int, model, params, data: TrainData, resume=None, extra=None) -> list[float]:
    """Train `params` (A in stage 1, the form's in stage 2) for the epochs; return each epoch's mean loss.

    AdamW (0.9, 0.999, eps 1e-8, no weight decay), linear decay to 0 without warmup, grad-norm
    clip 1.0: HF Trainer's defaults, which the original used. `resume` is a checkpoint of this
    stage; `extra` (primitives) is stored in every checkpoint, e.g. the stage-1 ranking.
    """
    s, d = run.s, run.d
    lr, l1 = (s.hp.lr_a, s.hp.l1) if stage == 1 else (s.hp.lr_v, 0.0)
    total_steps = -(-len(data.items) // s.batch_size) * s.epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total_steps - step) / total_steps))
    named = {name: p for name, p in model.named_parameters() if any(p is q for q in params)}
    history, start = [], 0
    if resume is not None:  # continue exactly where the checkpoint left off
        if missing := sorted(set(named) - set(resume["params"])):
            raise UsageError(f"{s.out / 'checkpoint.pt'} is incomplete (no {', '.join(missing[:3])}); "
                             f"start again with --overwrite")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(resume["params"][name])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        history, start = list(resume["history"]), resume["epoch"]
        run.log.cut(resume["log_lines"])
        log(d, f"resuming from stage {stage} epoch {start + 1}/{s.epochs} (the checkpoint after epoch {start})"
            if start < s.epochs else f"resuming after stage {stage}'s last epoch (its checkpoint)")
    micro = s.micro_batch_size or -(-s.batch_size // d.world)
    for epoch in range(start, s.epochs):
        began, losses = time.time(), []
        bar = tqdm(epoch_batches(len(data.items), s.batch_size, s.seed, epoch), disable=not d.main,
                   desc=f"stage {stage} epoch {epoch + 1}/{s.epochs}", dynamic_ncols=True)
        for step, batch in enumerate(bar):
            step_began, normaliser = time.time(), data.normaliser(batch)
            loss_sum = torch.zeros((), device=d.device)
            for i, (chunk, weight) in enumerate(rank_share(batch, d, micro)):
                loss = micro_batch_loss(model, data, chunk, normaliser, s.beta, d.device) * weight
                if l1 and d.main and i == 0:  # the L1 penalty counts once per global batch
                    loss = loss + l1 * l1_penalty(model)
                loss.backward()
                loss_sum += loss.detach().float()
            losses.append(sync_gradients(params, loss_sum, d).item())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            check_finite(run, stage, epoch, step, losses[-1], grad_norm)
            step_lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            run.log.step(stage=stage, step=schedule.last_epoch, epoch=epoch + 1, loss=losses[-1], lr=step_lr,
                         grad_norm=float(grad_norm), tokens_per_s=data.tokens(batch) / (time.time() - step_began))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append(sum(losses) / len(losses))
        log(d, f"stage {stage} epoch {epoch + 1}/{s.epochs}: mean loss {history[-1]:.4f}, "
               f"{time.time() - began:.1f} s")
        if d.main:
            state = {"key": s.key(), "stage": stage, "epoch": epoch + 1, "history": history, "extra": extra or {},
                     "params": {name: p.detach().cpu() for name, p in named.items()}, "log_lines": run.log.lines,
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
            save_torch_atomically(s.out / "checkpoint.pt", state)
        run.epochs_run += 1
        if s.stop_after and run.epochs_run >= s.stop_after:
            raise Stopped
    return history


def load_checkpoint(out: Path, key: dict) -> dict:
    """The checkpoint of the run in `out`, after checking it belongs to a run with these settings."""
    path = out / "checkpoint.pt"
    damaged = f"{path} is damaged or incomplete"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message advises weights_only=False, which would run the file's code: not shown
        reason = "not a checkpoint written by train.py" if "weights_only" in str(e) or "pickle" in str(e).lower() \
            else str(e).splitlines()[0][:200]
        raise UsageError(f"{damaged} ({reason}); start again with --overwrite") from None
    needed = {"key": dict, "stage": int, "epoch": int, "history": list, "extra": dict, "params": dict,
              "optimizer": dict, "schedule": dict, "log_lines": int}
    wrong = [k for k, kind in needed.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise UsageError(f"{damaged} (missing or malformed: {', '.join(wrong)}); start again with --overwrite")
    tensors = {**state["params"], **{f"optimizer {k}": v for k, v in _optimizer_tensors(state["optimizer"])}}
    if bad := [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]:
        raise UsageError(f"{path} holds non-finite values (NaN/inf) in {', '.join(bad[:4])}; it cannot be "
                         f"continued: start again with --overwrite")
    differ = sorted(k for k in set(key) | set(state["key"]) if key.get(k) != state["key"].get(k))
    if differ:
        had = ", ".join(f"{k}={state['key'].get(k)!r}" for k in differ)
        raise UsageError(f"--resume: the run in {out} used other settings ({had}); "
                         f"pass the same flags, or start again with --overwrite")
    return state


def _optimizer_tensors(optimizer_state: dict):
    for index, slots in (optimizer_state.get("state") or {}).items():
        for slot, value in (slots.items() if isinstance(slots, dict) else ()):
            yield f"{index}.{slot}", value


# ----------------------------------------------------------------------------------------------
# The recipe


def run_pipeline(s: Settings, d: Dist, flags: dict) -> int:
    """Load, choose heads (stage 1 or another way), train stage 2, evaluate, write every output."""
    started = time.time()
    resume = load_checkpoint(s.out, s.key()) if s.resume else None
    record = {"flags": flags, "resolved": asdict(s.hp), "intervention": s.key()["intervention"],
              "world_size": d.world, "device": str(d.device),
              "sharding": {"choice": s.sharding[0], "reason": s.sharding[1]},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    tokenizer = load_tokenizer(s.model, backend=s.tokenizer)
    examples = load_examples(s.task, "train", fold=s.fold, data_dir=s.data_dir, train_size=s.train_size, seed=s.seed)
    test = load_examples(s.task, "test", fold=s.fold, data_dir=s.data_dir)[:s.limit]
    data = tokenize_training_set(s.task, examples, tokenizer)
    if data.loss == "ce" and (empty := sum(not any(mask[1:]) for _, mask in data.items)):
        log(d, f"warning: {empty} of {len(data.items)} training examples have a prompt of at least "
               f"{TASK_INFO[s.task].max_len} tokens, so no answer token is left after the cut; they add no "
               f"loss (the original did so for CLUTRR; see data/tokenize.py)")
    log(d, "LoFiT " + json.dumps({**flags, **asdict(s.hp), "world_size": d.world}, indent=1))
    log(d, f"frozen base: {s.sharding[0]} ({s.sharding[1]})")
    barrier(d)  # every rank has checked --out before rank 0 touches it
    if d.main:  # rank 0 holds --out (claim_out_dir)
        write_json_atomically(s.out / "config.json", record)

    log(d, f"loading {s.model} ({s.hp.dtype}) ...")
    began = time.time()
    model = load_model(s.model, d, getattr(torch, s.hp.dtype), s.sharding[0], progress=True)
    log(d, f"model loaded in {time.time() - began:.1f} s")
    warn_beyond_context(model, [len(ids) for ids in data.sequences()], "training sequences", d.main)
    if data.loss == "dpo":
        log(d, f"DPO reference pass: the base model's log-probs of {len(data.items)} answer pairs")
        data.reference = reference_logprobs(model, data, s.eval_batch_size, d, progress=True)
    run = Run(s, d, StepLog(s.out, d.main, s.wandb, record))
    log(d, f"{len(examples)} training examples, {len(test)} test examples; loss {data.loss}")

    metrics = {"train_loss": {}}
    try:
        ranking, source = same_on_every_rank(choose_heads(run, model, tokenizer, examples, data, resume, metrics), d)
        selected = select_heads([HeadScore(*r) for r in ranking], k=s.hp.k)
        if d.main:
            write_heads_file(s.out / "heads.json", ranking, selected, task=s.task, model=s.model, source=source,
                             config=model.config)
            plot_heads(s.out / "heads.png", ranking, selected, model.config, source)
        if s.stage == "1":
            return finish(run, model, selected, metrics, record, started, stage=1)
        params = setup_stage2(model, selected, init_std=s.init_std, generator=torch.Generator().manual_seed(s.seed),
                              intervention=s.intervention)
        metrics["trainable_parameters"] = trainable_count(model)  # LoFiT: K x head_dim
        extra = {"ranking": [list(r) for r in ranking], "source": source, "train_loss": metrics["train_loss"]}
        metrics["train_loss"]["stage2"] = train_stage(run, 2, model, params, data,
                                                      resume if resume and resume["stage"] == 2 else None, extra)
    except Stopped:
        log(d, f"stopped after {run.epochs_run} epoch(s) as asked (--stop-after); "
               f"continue with the same flags and --resume")
        run.log.close()
        return 0
    if not s.no_eval:
        result = evaluate_split(model, tokenizer, s.task, test, d, batch_size=s.eval_batch_size, progress=d.main)
        metrics["test"] = result["summary"]
        log(d, "test: " + json.dumps(result["summary"]))
        if d.main:
            write_json_atomically(s.out / "eval_details.json", result["details"])
    return finish(run, model, selected, metrics, record, started, stage=2)


def finish(run: Run, model, selected, metrics, record, started, stage: int) -> int:
    """Write the adapter, metrics and final config record; drop the checkpoint (the run is complete)."""
    s = run.s
    if run.d.main:
        hparams = {"lr": s.hp.lr_a if stage == 1 else s.hp.lr_v, "l1": s.hp.l1, "k": s.hp.k,
                   "epochs": s.epochs, "batch_size": s.batch_size, "seed": s.seed,
                   "fold": s.fold,  # eval.py refuses to test a TruthfulQA adapter on its own training fold
                   "head_selection": s.head_selection}
        with reported_write(s.out / "adapter.safetensors"):
            save_adapter(s.out / "adapter.safetensors", model, None if stage == 1 else selected,
                         stage=stage, task=s.task, hparams=hparams)  # stage 1: every head's A; the form's own settings
        write_json_atomically(s.out / "metrics.json", metrics)
        write_json_atomically(s.out / "config.json", {**record, "seconds": round(time.time() - started, 1)})
        rundir.commit(s.out)  # the run is complete: its checkpoint and the run it replaced go
        print(f"outputs in {s.out}: " + ", ".join(n for n in OUTPUT_FILES if (s.out / n).exists()))
    run.log.close()
    return 0


def interrupted(args, argv) -> int:
    """Ctrl-C: no traceback; say what is kept and the command that continues."""
    out = Path(args.out)
    kept = checkpoint_summary(out)
    if kept:
        print(f"\ninterrupted: the last checkpoint is {out / 'checkpoint.pt'} ({kept}); continue with\n  "
              f"{rundir.resume_command('train.py', argv)}", file=sys.stderr)
    else:
        print(f"\ninterrupted before the first checkpoint, so nothing of this run was kept in {out}; run the "
              f"same command again to start it", file=sys.stderr)
    return 130  # 128 + SIGINT, as a shell reports it


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        validate(args)
        d = setup_distributed(args.device)
        finished = False
        try:
            with claim_out_dir(args, d, argv):
                code = run_pipeline(settings_from_flags(args, d), d, vars(args))
            finished = True
            return code
        finally:
            close_distributed(finished)
    except WriteError as e:
        kept = checkpoint_summary(Path(args.out))
        hint = f"; the last checkpoint ({kept}) is kept: once it can be written, continue with --resume" if kept \
            else ""
        return report_error(WriteError(e.errno, f"{e}{hint}"), print_message=first_rank)
    except LofitError as e:
        return report_error(e, print_message=first_rank)
    except KeyboardInterrupt:
        return interrupted(args, argv) if first_rank else 130


if __name__ == "__main__":
    sys.exit(main())
