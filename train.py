"""Train LoFiT end to end: stage 1 -> head ranking -> stage 2 -> test-set evaluation -> outputs.

    python train.py --task clutrr --model tests/assets/stories260K --out runs/clutrr
    torchrun --nproc_per_node 8 train.py --task truthfulqa --out runs/tqa     # meta-llama/Llama-2-7b-hf
    python train.py --task clutrr --intervention examples/low_rank.py --intervention-arg rank=2
    python train.py --task truthfulqa --model DIR --plan --gpus 8 --gpu-memory 80   # memory per GPU, no run

Read top to bottom: the paper's table -> the flags (TrainConfig) -> the loss of one batch -> one
stage's training loop -> head choice -> run(), the recipe. Stage 1 trains the scale A of every head
with an L1 penalty; heads are ranked by ||A||_2 (or chosen at random, by ITI's probes, or read from
a heads.json). Stage 2 starts again from the base model and trains the chosen form (--intervention;
LoFiT's bias v by default) on the top K heads only. The defaults are the paper's per task and model
(PAPER_TABLE); every flag overrides one. Each optimiser step is logged to metrics.jsonl.

Under torchrun the result does not depend on the number of processes (machinery/distributed.py
says how); only rank 0 writes files and shows progress. A checkpoint after every epoch lets
--resume continue a killed run to the same adapter as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import lofit
from adapter import save_adapter
from data import TASK_INFO, TASKS, TrainData, collate, load_examples, tokenize_training_set
from eval import evaluate_split, warn_beyond_context
from iti import fit_iti
from machinery import distributed, flags, report, rundir, speed, train_state
from machinery.checkpoints import read_model_config
from machinery.distributed import Dist, close_distributed, load_model, rank_share
from machinery.flags import UsageError, flag
from machinery.heads_file import heads_file_source, plot_heads, random_ranking, read_heads_file, write_heads_file
from machinery.memory_plan import print_plan, sharding_for_run
from machinery.runlog import StepLog, plot_loss
from model import LofitError
from storage.atomic import WriteError, reported_write, write_json_atomically, write_text_atomically
from tokenizer import BACKENDS, load_tokenizer

OUTPUT_FILES = rundir.RUNS["train.py"].outputs  # rundir.py knows what each command writes

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


# ----------------------------------------------------------------------------------------------
# The flags: one field each, checked once


@dataclass
class TrainConfig:
    """Every flag of train.py. None means "the paper's value for this task and model" (resolve_hparams)."""
    task: str = flag(None, "the task", choices=TASKS, required=True)
    model: str = flag("meta-llama/Llama-2-7b-hf", flags.MODEL_HELP + "; default meta-llama/Llama-2-7b-hf")
    data_dir: str | None = flag(None, flags.DATA_DIR_HELP)
    tokenizer: str = flag("auto", flags.TOKENIZER_HELP, choices=BACKENDS)
    dtype: str = flag("auto", flags.DTYPE_HELP, choices=flags.DTYPES)
    device: str = flag("auto", flags.DEVICE_HELP)
    limit: int | None = flag(None, flags.LIMIT_HELP, aliases=["--limit-eval"])
    eval_batch_size: int = flag(8, flags.EVAL_BATCH_HELP)
    sharding: str = flag("auto", distributed.SHARDING_HELP, choices=distributed.SHARDINGS)
    out: str | None = flag(None, "output directory (default runs/<task>)")
    stage: str | None = flag(None, "default: both, or 2 when heads come from elsewhere", choices=("1", "2", "both"))
    heads: str | None = flag(None, "heads.json of an earlier run: skip stage 1 and use its ranking")
    head_selection: str | None = flag(None, "stage 2's heads: lofit (stage 1's ranking; the default), random "
                                      "(drawn with --seed), iti (ITI probe accuracy; truthfulqa), file (--heads "
                                      "FILE; the default with --heads)", choices=("lofit", "random", "iti", "file"))
    intervention: str = flag("lofit", flags.INTERVENTION_HELP, metavar="NAME|FILE.py")
    intervention_arg: list[str] = flag(None, flags.INTERVENTION_ARG_HELP, metavar="KEY=VALUE")
    k: int | None = flag(None, "number of heads for stage 2 (default: the paper's)", group="k")
    k_percent: float | None = flag(None, "K as a percentage of all heads", group="k")
    epochs: int = flag(5, "epochs per stage")
    batch_size: int = flag(8, "examples per optimiser step, over all processes")
    micro_batch_size: int | None = flag(None, "per forward pass (default: the whole per-rank share)")
    lr_a: float | None = flag(None, "stage-1 learning rate")
    lr_v: float | None = flag(None, "stage-2 learning rate")
    l1: float | None = flag(None, "stage-1 L1 weight lambda")
    beta: float = flag(0.5, "DPO beta (TruthfulQA)")
    init_std: float = flag(1e-3, "standard deviation of the offsets' initialisation")
    seed: int = flag(42, "seed of the offsets' initialisation, the data order and the --train-size draw")
    fold: int = flag(0, "TruthfulQA fold (0 or 1)")
    train_size: int | None = flag(None, "training examples to draw (default: the task's; 0 = all)")
    overwrite: bool = flag(False, "replace another run's outputs in --out")
    resume: bool = flag(False, "continue the run in --out from its checkpoint")
    stop_after: int | None = flag(None, "stop after this many epochs (both stages counted), keeping the "
                                  "checkpoint for --resume", metavar="EPOCHS")
    no_eval: bool = flag(False, "skip the test-set evaluation (score it later with eval.py)")
    threads: int | None = flag(None, flags.THREADS_HELP)
    no_baseline: bool = flag(False, "do not score the base model on the test set for the report (its scores "
                             "are cached per model, task, split, fold, limit, dtype, tokenizer and data directory)")
    wandb: str | None = flag(None, "also log every step to this Weights & Biases project", metavar="PROJECT")
    plan: bool = flag(False, "print the memory plan per GPU (from config.json alone, no weights read) and exit")
    gpus: int | None = flag(None, "--plan for this many GPUs (default: this job's processes)", metavar="N")
    gpu_memory: float | None = flag(None, "memory of one GPU for the plan and the run's check (default: the "
                                    "device's; --plan without a GPU: 80)", metavar="GiB")
    matmul_precision: str = flag("highest", speed.MATMUL_HELP, choices=speed.MATMUL_PRECISIONS)
    compile: bool = flag(False, speed.COMPILE_HELP)

    def __post_init__(self):
        self.out = f"runs/{self.task}" if self.out is None else self.out
        self.head_selection = self.head_selection or ("file" if self.heads else "lofit")
        self.stage = self.stage or ("both" if self.head_selection == "lofit" else "2")

    def check(self) -> None:
        """Refuse impossible values and combinations before anything is loaded."""
        flags.check_flags(self)
        chosen_by = "--heads" if self.heads else f"--head-selection {self.head_selection}"
        refusals = [
            (self.heads and self.head_selection != "file",
             f"--heads FILE goes with --head-selection file, not {self.head_selection}"),
            (self.head_selection == "file" and not self.heads,
             "--head-selection file needs --heads FILE (a heads.json of an earlier run)"),
            (self.head_selection != "lofit" and self.stage != "2",
             f"{chosen_by} replaces stage 1, so it goes with --stage 2 (the default then)"),
            (self.stage == "2" and self.head_selection == "lofit",
             "--stage 2 needs --heads FILE (a heads.json from a stage-1 run) or --head-selection random or iti"),
            (self.head_selection == "iti" and self.task != "truthfulqa",
             f"--head-selection iti probes true vs false answers, which only truthfulqa has; for {self.task}, "
             f"run iti.py on truthfulqa and pass its heads.json with --heads"),
            (self.dtype == "float16", "--dtype float16 would train without loss scaling, so small gradients "
             "underflow to zero; use --dtype bfloat16 (the same memory, float32's range)"),
            (self.gpus is not None and not self.plan, "--gpus N plans for hardware this job does not have: "
             "it goes with --plan"),
            (self.compile and self.sharding == "shard", "--compile compiles a replicated base's forward; "
             "with --sharding shard, leave --compile out")]
        if self.wandb:
            refusals.append((not StepLog.wandb_installed(), "--wandb needs the wandb package: pip install wandb"))
        for refused, message in refusals:
            if refused:
                raise UsageError(message)
        flags.check_out_dir(self.out, overwrite=self.overwrite, resume=self.resume)

    def key(self, hp: Hparams, form) -> dict:
        """What decides the result; --resume refuses a checkpoint made with another key."""
        own = {name: getattr(self, name) for name in ("task", "model", "data_dir", "stage", "head_selection",
                                                       "heads", "epochs", "batch_size", "beta", "init_std", "seed",
                                                       "fold", "train_size", "tokenizer")}
        hparams = {k: v for k, v in asdict(hp).items() if k != "source"}
        return {**own, **hparams, "intervention": {"name": form.name, **form.hparams()}}


def parse_args(argv=None) -> TrainConfig:
    return flags.parse_flags(TrainConfig, argv, "LoFiT: stage 1 (head selection), stage 2 (bias tuning), evaluation.")


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
    dtype = flags.resolve_dtype(args.dtype, device_type)
    return Hparams(args.lr_a or lr_a, args.l1 if args.l1 is not None else l1, args.lr_v or lr_v, k, dtype, source)


# ----------------------------------------------------------------------------------------------
# The loss of one batch


def pair_logprobs(model, data: TrainData, chunk: list[int], device) -> torch.Tensor:
    """(n, 2) summed answer log-probs of the chosen and rejected answers of pairs `chunk`; each pair's
    prompt runs once, except under FSDP sharding, which cannot run a block twice before a backward."""
    return lofit.pair_answer_logprobs(model, [data.items[i] for i in chunk], data.pad_id, device,
                                      shared_prefix=not isinstance(model, FSDPModule))


@torch.no_grad()
def reference_logprobs(model, data: TrainData, batch_size: int, d: Dist, progress: bool = False) -> torch.Tensor:
    """DPO's reference: every pair's log-probs under the base model (LoFiT off), computed once.

    Each rank computes its distributed.rank_slice of the pairs; every rank gets all of them, in order.
    """
    mine = list(range(len(data.items)))[distributed.rank_slice(len(data.items), d)]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = tqdm(chunks, desc="DPO reference log-probs", disable=not (progress and d.main), dynamic_ncols=True)
    with lofit.offsets_disabled(model), distributed.lockstep(model, d):
        rows = [pair_logprobs(model, data, chunk, d.device).float().cpu() for chunk in bar]
    return torch.cat(distributed.gather_lists(rows, d)).to(d.device)  # (N, 2)


def micro_batch_loss(model, data: TrainData, chunk: list[int], normaliser: int, beta: float, device):
    """This micro-batch's share of the global batch's mean loss: its summed loss / the batch normaliser."""
    if data.loss == "dpo":
        policy = pair_logprobs(model, data, chunk, device)  # (n, 2)
        reference = data.reference[chunk]  # (n, 2)
        per_pair_mean = lofit.dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=beta)
        return per_pair_mean * len(chunk) / normaliser
    batch = {k: v.to(device) for k, v in collate([data.items[i] for i in chunk], data.pad_id).items()}
    return lofit.ce_loss(model, batch) * batch["loss_mask"][:, 1:].sum() / normaliser  # token mean -> token sum


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded with seed + epoch, cut in order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------
# One stage: epochs of AdamW steps, each logged, a checkpoint after each epoch


@dataclass
class Run:
    """What every stage of one run shares."""
    cfg: TrainConfig
    hp: Hparams
    key: dict  # TrainConfig.key: stored in every checkpoint
    given: list | None  # the --heads file's ranking
    d: Dist
    log: StepLog
    form: lofit.Intervention  # stage 2's form
    epochs_run: int = 0  # epochs finished by this process, for --stop-after


class Stopped(Exception):
    """--stop-after was reached; the checkpoint holds everything --resume needs."""


def say(d: Dist, message: str) -> None:
    """The one way this script talks to the user: a line on stdout, from rank 0 only."""
    if d.main:
        print(message, flush=True)


def train_stage(run: Run, stage: int, model, params, data: TrainData, resume=None, extra=None) -> list[float]:
    """Train `params` (A in stage 1, the form's in stage 2) for the epochs; return each epoch's mean loss.

    AdamW (0.9, 0.999, eps 1e-8, no weight decay), linear decay to 0 without warmup, grad-norm
    clip 1.0: HF Trainer's defaults, which the original used. `resume` is a checkpoint of this
    stage; `extra` (primitives) is stored in every checkpoint, e.g. the stage-1 ranking.
    """
    cfg, d = run.cfg, run.d
    lr, l1 = (run.hp.lr_a, run.hp.l1) if stage == 1 else (run.hp.lr_v, 0.0)
    total_steps = -(-len(data.items) // cfg.batch_size) * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total_steps - step) / total_steps))
    named = {name: p for name, p in model.named_parameters() if any(p is q for q in params)}
    form = lofit.intervention_of(model) if stage == 2 else lofit.LoFiT()  # its penalty and state (e.g. a generator)
    history, start = [], 0
    if resume is not None:  # continue exactly where the checkpoint left off
        history, start = train_state.restore(resume, named, optimizer, schedule, cfg.out)
        form.load_state_dict(resume["extra"].get("form", {}))
        run.log.cut(resume["log_lines"])
        say(d, f"resuming from stage {stage} epoch {start + 1}/{cfg.epochs} (the checkpoint after epoch {start})"
            if start < cfg.epochs else f"resuming after stage {stage}'s last epoch (its checkpoint)")
    micro = cfg.micro_batch_size or -(-cfg.batch_size // d.world)
    model.train()  # what a form's edit sees as EditContext.training (LoFiT's arithmetic does not change)
    for epoch in range(start, cfg.epochs):
        began, losses = time.time(), []
        bar = tqdm(epoch_batches(len(data.items), cfg.batch_size, cfg.seed, epoch), disable=not d.main,
                   desc=f"stage {stage} epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        for step, batch in enumerate(bar):
            step_began, normaliser = time.time(), data.normaliser(batch)
            loss_sum, penalty = torch.zeros((), device=d.device), {}
            form.start_step(model)  # a stochastic form draws this step's noise: the same on every rank
            for i, (chunk, weight) in enumerate(rank_share(batch, d, micro)):
                loss = micro_batch_loss(model, data, chunk, normaliser, cfg.beta, d.device) * weight
                if l1 and d.main and i == 0:  # the L1 penalty counts once per global batch
                    loss = loss + l1 * lofit.l1_penalty(model)
                if d.main and i == 0 and (extra_loss := form.penalty(model)) is not None:  # so does a form's
                    loss, penalty = loss + extra_loss, {"penalty": float(extra_loss.detach())}
                loss.backward()
                loss_sum += loss.detach().float()
            losses.append(distributed.sync_gradients(params, loss_sum, d).item())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            train_state.check_finite(cfg.out, stage, epoch, step, losses[-1], grad_norm)
            step_lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            run.log.step(stage=stage, step=schedule.last_epoch, epoch=epoch + 1, loss=losses[-1], lr=step_lr,
                         grad_norm=float(grad_norm), tokens_per_s=data.tokens(batch) / (time.time() - step_began),
                         **penalty)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append(sum(losses) / len(losses))
        say(d, f"stage {stage} epoch {epoch + 1}/{cfg.epochs}: mean loss {history[-1]:.4f}, "
               f"{time.time() - began:.1f} s")
        if d.main:
            train_state.save_checkpoint(Path(cfg.out), key=run.key, stage=stage, epoch=epoch + 1, history=history,
                                        extra={**(extra or {}), "form": form.state_dict()}, params=named,
                                        optimizer=optimizer, schedule=schedule, log_lines=run.log.lines)
        run.epochs_run += 1
        if cfg.stop_after and run.epochs_run >= cfg.stop_after:
            model.eval()
            raise Stopped
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Head choice: stage 1, a file, random, ITI, or the checkpoint being resumed


def choose_heads(run: Run, model, tokenizer, examples, data: TrainData, resume, metrics) -> tuple[list, str]:
    """Stage 2's ranking [(layer, head, score or None)], best first, and where it came from.

    Stage 1 (the default) trains A and ranks heads by ||A||_2; its losses go to metrics["train_loss"].
    """
    cfg, form = run.cfg, run.form
    if form.selects_heads and cfg.stage != "1":  # the form localizes by itself: every head, no stage 1
        every = [(layer, h, None) for layer in range(model.config.n_layers) for h in range(model.config.n_heads)]
        return every, f"every head: the {form.name} intervention chooses its own"
    if cfg.stage != "2" and not (resume and resume["stage"] == 2):
        params = lofit.setup_stage1(model, cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
        metrics["train_loss"]["stage1"] = train_stage(run, 1, model, params, data, resume)
        return [(h.layer, h.head, float(h.score)) for h in lofit.rank_heads(model)], "stage 1 of this run"
    if resume is not None:
        metrics["train_loss"].update(resume["extra"]["train_loss"])
        return [tuple(r) for r in resume["extra"]["ranking"]], resume["extra"]["source"]
    if cfg.head_selection == "file":
        return run.given, f"--heads {cfg.heads}" + heads_file_source(cfg.heads)
    if cfg.head_selection == "random":
        return random_ranking(model.config.n_layers, model.config.n_heads, cfg.seed), f"random heads, seed {cfg.seed}"
    val = load_examples(cfg.task, "val", fold=cfg.fold, data_dir=cfg.data_dir)
    with distributed.lockstep(model, run.d):  # a sharded base: every rank joins every forward pass
        probes = fit_iti(model, tokenizer, examples, val, batch_size=cfg.eval_batch_size, progress=run.d.main)
    return [tuple(r) for r in probes.ranking()], "ITI probe accuracy on the validation questions"


# ----------------------------------------------------------------------------------------------
# The recipe


def run(cfg: TrainConfig, d: Dist) -> int:
    """Load, choose heads (stage 1 or another way), train stage 2, evaluate, write every output."""
    started, seconds = time.time(), {}  # seconds: wall time per phase, for metrics.json and the report
    config = read_model_config(cfg.model)
    flags.set_threads(cfg.threads, config)  # the banner says how many
    hp = resolve_hparams(cfg, config, d.device.type)
    form = flags.resolve_intervention(cfg.intervention, cfg.intervention_arg, config)
    if form.selects_heads and cfg.head_selection != "lofit":
        raise UsageError(f"--intervention {form.name} chooses its own heads (it trains every head); "
                         f"leave out --head-selection {cfg.head_selection} and --heads")
    given = read_heads_file(cfg.heads, config) if cfg.heads else None
    if given is not None and hp.k > len(given):
        raise UsageError(f"K = {hp.k} but --heads {cfg.heads} ranks only {len(given)} heads; pass a smaller --k")
    tokenizer = load_tokenizer(cfg.model, backend=cfg.tokenizer)
    examples = load_examples(cfg.task, "train", fold=cfg.fold, data_dir=cfg.data_dir, train_size=cfg.train_size,
                             seed=cfg.seed)
    test = load_examples(cfg.task, "test", fold=cfg.fold, data_dir=cfg.data_dir)[:cfg.limit]
    data = tokenize_training_set(cfg.task, examples, tokenizer)
    sharding, plan = sharding_for_run(cfg, config, hp, data, d)  # refuses, on a GPU, a run that cannot fit
    if cfg.compile and sharding[0] == "shard":
        raise UsageError("--compile compiles a replicated base's forward and auto chose --sharding shard; "
                         "leave --compile out")
    key = cfg.key(hp, form)
    resume = train_state.load_checkpoint(Path(cfg.out), key) if cfg.resume else None
    record = {"flags": asdict(cfg), "resolved": asdict(hp), "intervention": key["intervention"],
              "world_size": d.world, "device": str(d.device),
              "sharding": {"choice": sharding[0], "reason": sharding[1]},
              "code_version": report.code_version(), "versions": report.library_versions()}
    if d.device.type == "cuda":
        record["memory_plan"] = plan.summary()
    if empty := data.without_answer():
        say(d, f"warning: {empty} of {len(data.items)} training examples have a prompt of at least "
               f"{TASK_INFO[cfg.task].max_len} tokens, so no answer token is left after the cut; they add no "
               f"loss (the original did so for CLUTRR; see data/tokenize.py)")
    say(d, report.banner(cfg, hp, form, d, sharding, len(examples), len(test), data.loss))
    if d.device.type == "cuda":
        say(d, f"  memory plan: {plan.per_gpu_gib:.1f} GiB per GPU of {plan.gpu_memory_gib:.1f} GiB")
    distributed.barrier(d)  # every rank has checked --out before rank 0 touches it
    if d.main:  # rank 0 holds --out (rundir.claim in main)
        write_json_atomically(Path(cfg.out) / "config.json", record)

    say(d, f"loading {cfg.model} ({hp.dtype}) ...")
    with report.timed(seconds, "load"):
        model = load_model(cfg.model, d, getattr(torch, hp.dtype), sharding[0], progress=True)
    say(d, f"model loaded in {seconds['load']:.1f} s")
    if cfg.compile:
        speed.compile_forward(model)
    lofit.check_form(model, form)  # its parameters, its edit at zero and its merge, before any training
    warn_beyond_context(model, [len(ids) for ids in data.sequences()], "training sequences", d.main)
    if data.loss == "dpo":
        say(d, f"DPO reference pass: the base model's log-probs of {len(data.items)} answer pairs")
        with report.timed(seconds, "reference"):
            data.reference = reference_logprobs(model, data, cfg.eval_batch_size, d, progress=True)
    run = Run(cfg, hp, key, given, d, StepLog(Path(cfg.out), d.main, cfg.wandb, record), form)
    metrics = {"train_loss": {}, "seconds": seconds}
    try:
        with report.timed(seconds, "stage 1" if cfg.stage != "2" else "heads"):
            chosen = choose_heads(run, model, tokenizer, examples, data, resume, metrics)
        ranking, source = distributed.same_on_every_rank(chosen, d)
        selected = lofit.select_heads([lofit.HeadScore(*r) for r in ranking],
                                      k=len(ranking) if form.selects_heads and cfg.stage != "1" else hp.k)
        if d.main:
            write_heads_file(Path(cfg.out) / "heads.json", ranking, selected, task=cfg.task, model=cfg.model,
                             source=source, config=model.config)
            plot_heads(Path(cfg.out) / "heads.png", ranking, selected, model.config, source)
        if cfg.stage == "1":
            return finish(run, model, selected, metrics, record, started, stage=1)
        params = lofit.setup_stage2(model, selected, init_std=cfg.init_std, intervention=form,
                                    generator=torch.Generator().manual_seed(cfg.seed))
        metrics["trainable_parameters"] = lofit.trainable_count(model)  # LoFiT: K x head_dim
        extra = {"ranking": [list(r) for r in ranking], "source": source, "train_loss": metrics["train_loss"]}
        with report.timed(seconds, "stage 2"):
            metrics["train_loss"]["stage2"] = train_stage(run, 2, model, params, data,
                                                          resume if resume and resume["stage"] == 2 else None, extra)
    except Stopped:
        say(d, f"stopped after {run.epochs_run} epoch(s) as asked (--stop-after); "
               f"continue with the same flags and --resume")
        run.log.close()
        return 0
    if not cfg.no_eval:
        with report.timed(seconds, "evaluation"):
            result = evaluate_split(model, tokenizer, cfg.task, test, d, batch_size=cfg.eval_batch_size,
                                    progress=d.main)
        metrics["test"] = result["summary"]
        say(d, "test: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in result["summary"].items()))
        if d.main:
            write_json_atomically(Path(cfg.out) / "eval_details.json", result["details"])
        if cfg.no_baseline:
            metrics["intervals"] = report.intervals(result["details"])
        else:
            def score_base():  # the same questions with the offsets off; cached (report.baseline_key)
                with lofit.offsets_disabled(model):
                    return evaluate_split(model, tokenizer, cfg.task, test, d, batch_size=cfg.eval_batch_size,
                                          progress=d.main)
            report.against_base(metrics, result["details"], score_base, d, model=cfg.model, task=cfg.task,
                                split="test", fold=cfg.fold, limit=cfg.limit, dtype=hp.dtype, tokenizer=cfg.tokenizer,
                                data_dir=cfg.data_dir)
    return finish(run, model, selected, metrics, record, started, stage=2)


def finish(run: Run, model, selected, metrics, record, started, stage: int) -> int:
    """Write the adapter, metrics and final config record; drop the checkpoint (the run is complete)."""
    cfg, hp, out = run.cfg, run.hp, Path(run.cfg.out)
    if run.d.main:
        hparams = {"lr": hp.lr_a if stage == 1 else hp.lr_v, "l1": hp.l1, "k": hp.k, "epochs": cfg.epochs,
                   "batch_size": cfg.batch_size, "seed": cfg.seed,
                   "fold": cfg.fold,  # eval.py refuses to test a TruthfulQA adapter on its own training fold
                   "head_selection": cfg.head_selection}
        with reported_write(out / "adapter.safetensors"):  # stage 1: every head's A; the form's own settings
            save_adapter(out / "adapter.safetensors", model, None if stage == 1 else selected, stage=stage,
                         task=cfg.task, hparams=hparams)
        write_json_atomically(out / "metrics.json", metrics)
        write_json_atomically(out / "config.json", {**record, "seconds": round(time.time() - started, 1)})
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        files = [n for n in OUTPUT_FILES if n != "checkpoint.pt" and ((out / n).exists() or n == "summary.md")]
        summary = report.format_report(report.train_report(cfg, metrics, selected, stage, files))
        write_text_atomically(out / "summary.md", summary)
        rundir.commit(out)  # the run is complete: its checkpoint and the run it replaced go
        say(run.d, "\n" + summary)
    run.log.close()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg.check()
        if cfg.plan:  # the memory plan from the config alone: nothing loaded, nothing written
            config = read_model_config(cfg.model, need_weights=False)
            return print_plan(cfg, config, resolve_hparams(cfg, config, "cuda"))
        d = distributed.setup_distributed(cfg.device)
        finished = False
        try:
            claim = rundir.claim(cfg.out, OUTPUT_FILES, overwrite=cfg.overwrite, resume=cfg.resume,
                                 checkpoint="checkpoint.pt", command=rundir.command_line("train.py", argv)) \
                if d.main else contextlib.nullcontext()  # rank 0 holds --out for the whole run
            with claim, speed.matmul_precision(cfg.matmul_precision):
                code = run(cfg, d)
            finished = True
            return code
        finally:
            close_distributed(finished)
    except WriteError as e:  # say whether a checkpoint is kept to --resume from
        return flags.report_error(train_state.with_checkpoint_hint(e, Path(cfg.out)), print_message=first_rank)
    except LofitError as e:
        return flags.report_error(e, print_message=first_rank)
    except KeyboardInterrupt:
        if first_rank:
            resume = rundir.resume_command("train.py", argv)
            print(train_state.interrupted_message(Path(cfg.out), resume), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
