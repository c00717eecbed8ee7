"""Running under torchrun: processes, replicating or sharding the frozen base, gradient sync, shared work.

    torchrun --standalone --nproc_per_node 8 train.py --task truthfulqa      # NCCL, one GPU per process
    torchrun --standalone --nproc_per_node 2 eval.py --task mquake --model M  # gloo on a CPU

The number of processes never changes the result:
- Data order: each epoch is a permutation of the whole training set drawn from a generator seeded
  with seed + epoch; it is cut into global batches of --batch-size examples.
- A global batch is split into equal per-rank shares (rank_share), each run as micro-batches of at
  most --micro-batch-size. Every micro-batch loss is a SUM divided by the global batch's normaliser
  (CE: its number of answer tokens; DPO: its number of pairs), so summing gradients over all
  micro-batches and ranks gives exactly the single-process gradient of the batch mean. A rank with
  nothing left runs a filler micro-batch with weight 0, so every rank makes the same calls.
- Gradient sync: the LoFiT parameters (fp32, also in a bf16 model) are plain, replicated tensors on
  every rank. After the last micro-batch their gradients are summed with one all_reduce
  (sync_gradients); clipping and AdamW then run on identical numbers everywhere, so the replicas
  never drift. The base is frozen before anything else happens: no base tensor ever requires or
  holds a gradient, so nothing else is ever reduced.
- A and v are initialised from a generator seeded with --seed, the same on every rank; head
  rankings (stage 1's, ITI's) are rank 0's, broadcast (same_on_every_rank).

The frozen base (choose_sharding; --sharding overrides auto, and the choice is printed and saved):
- replicate (auto picks it when train.py's memory plan, machinery/memory_plan.py, says a replicated
  run fits the device; eval.py and iti.py, which train nothing, when the base weights take at most
  half of one device's memory): every rank holds the whole base and runs its forward passes on
  its own. Only the LoFiT gradients travel (one all_reduce per step): for 7B/13B at batch 8 this
  is the fast choice.
- shard: FSDP2. Every Block is a fully_shard unit and the Llama is the root (its own embeddings,
  final norm and lm_head, and every LoFiT parameter, are left out and stay replicated), with
  model.hidden_states registered as a forward method. So each block's weights are all-gathered
  just before it runs and freed right after (forward and backward): a rank holds 1/world of the
  blocks plus about one gathered block. Each rank reads only its own rows of every block tensor
  from the safetensors files (load_sharded), all ranks at once.
Every rank must then join every forward pass. Training makes the same calls on every rank by
construction; the DPO reference pass, evaluation and ITI's activations run inside lockstep(), where
a rank that has finished its own work joins the others' forward passes with a one-token dummy
until all are done (generation lengths depend on the examples).

Shared work: the DPO reference pass and evaluation are split across ranks (rank_slice: contiguous
equal shares) and gathered in order on every rank (gather_lists), so 8 processes do 1/8 each.
The process group waits PROCESS_GROUP_TIMEOUT (not NCCL's 10 minutes) for a slow rank, e.g. one
still reading a 70B checkpoint. Only rank 0 writes files and shows progress.
A job started by hand instead of by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set in each
process) says what each process waits for and gives up after $LOFIT_JOIN_TIMEOUT seconds (600)
where another process never starts (join_manual_launch).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from machinery.checkpoints import load_model as load_checkpoint
from machinery.flags import UsageError, resolve_device
from model import CheckpointError, Llama, checkpoint_files, hf_name, read_config, rope_inv_freq
from storage.gguf_file import is_gguf
from storage.hub import resolve_model_dir

SHARDINGS = ("auto", "replicate", "shard")
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)
SHARDING_HELP = ("under torchrun: replicate the frozen base on every device, or shard it with FSDP2; auto "
                 "replicates when the memory plan says a replicated run fits (see --plan)")
FIT_FRACTION = 0.5  # without a training plan (eval.py, iti.py), auto replicates a base whose weights take at most
# this share of one device's memory


@dataclass
class Dist:
    """This process's place in the job: rank, number of processes, its device, how the base is held."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharding: str = "replicate"  # set by load_model: "replicate" or "shard"

    @property
    def main(self) -> bool:
        return self.rank == 0


def add_sharding_flag(parser) -> None:
    """Add --sharding {auto,replicate,shard} (see choose_sharding)."""
    parser.add_argument("--sharding", choices=SHARDINGS, default="auto", help=SHARDING_HELP)


def setup_distributed(device_flag: str) -> Dist:
    """Join the torchrun job if there is one: NCCL with one GPU per process, else gloo on the CPU.

    Under torchrun a process group is made even for one process (so --sharding shard runs FSDP2
    on one GPU too); a plain `python train.py` makes none.
    """
    device = process_device(resolve_device(device_flag), os.environ)
    if "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=PROCESS_GROUP_TIMEOUT, **join_manual_launch())
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def join_timeout() -> float:
    """Seconds a manually launched process waits for the others to start: $LOFIT_JOIN_TIMEOUT, default 600."""
    text = os.environ.get("LOFIT_JOIN_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"LOFIT_JOIN_TIMEOUT={text!r} must be a positive number of seconds")
    return seconds


def _wait_for_port(host: str, port: int, seconds: float) -> None:
    """Return once something listens at host:port; RuntimeError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"nothing listens at {host}:{port} ({e.strerror or e})") from None
            time.sleep(0.5)


def join_manual_launch() -> dict:
    """Under torchrun, nothing (its agent gathers the processes and says what it waits for). A job
    started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set per process): meet the others
    at MASTER_ADDR:MASTER_PORT, saying what this process waits for, and give up after join_timeout()
    with a message instead of waiting silently for a process that never starts. Returns the
    init_process_group arguments (the store the processes met at, rank and world size)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return {}
    try:
        rank, world = int(os.environ.get("RANK", "")), int(os.environ["WORLD_SIZE"])
        host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", ""))
    except ValueError:
        raise UsageError("a job started without torchrun needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set "
                         "in every process (RANK 0 .. WORLD_SIZE-1); or start it with torchrun") from None
    if not host or not 0 <= rank < world:
        raise UsageError(f"RANK={rank}, WORLD_SIZE={world}, MASTER_ADDR={host!r}: each process needs its own RANK "
                         f"in 0 .. WORLD_SIZE-1 and the same MASTER_ADDR and MASTER_PORT; or start it with torchrun")
    seconds = join_timeout()
    if world > 1:
        others = "RANK 1" if world == 2 else f"RANK 1 .. {world - 1}"
        waits_for = f"the other process(es) ({others})" if rank == 0 else "RANK 0"
        print(f"rank {rank}: waiting up to {seconds:g} s for {waits_for} of this {world}-process job at "
              f"{host}:{port} (LOFIT_JOIN_TIMEOUT sets the wait)", file=sys.stderr, flush=True)
    try:
        if rank != 0:  # wait for RANK 0's port here: torch's own client logs every failed try at length
            _wait_for_port(host, port, seconds)
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timedelta(seconds=seconds),
                              wait_for_workers=True)
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError: a timeout, a port in use
        missing = f"not all {world} processes started" if rank == 0 else f"RANK 0 was not reachable at {host}:{port}"
        error = UsageError(f"rank {rank}: the job did not come together within {seconds:g} s ({missing}: "
                           f"{str(e).splitlines()[0][:160]}); start every RANK 0 .. {world - 1} with the same "
                           f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or use torchrun")
        if rank != 0:  # the scripts print only rank 0's errors (under torchrun the others repeat them)
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise error from None
    store.set_timeout(PROCESS_GROUP_TIMEOUT)  # from here on, as patient as the process group
    return {"store": store, "rank": rank, "world_size": world}


def process_device(requested: str, env) -> torch.device:
    """This process's device, from the resolved --device (flags.resolve_device) and the environment.

    Without torchrun (no WORLD_SIZE in `env`): the device asked for. Under torchrun: CUDA means
    cuda:LOCAL_RANK, one GPU per process; anything else the CPU (gloo). A numbered GPU (cuda:1)
    is honoured with one process and refused with several (each process needs its own GPU), so
    it is never silently replaced by another one.

    Raises:
        UsageError: a numbered GPU under torchrun with more than one process.
    """
    if "WORLD_SIZE" not in env:
        return torch.device(requested)
    if not requested.startswith("cuda"):
        return torch.device("cpu")
    if ":" in requested:
        if int(env["WORLD_SIZE"]) > 1:
            raise UsageError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK; pass "
                             f"--device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        return torch.device(requested)
    return torch.device("cuda", int(env.get("LOCAL_RANK", "0")))


def close_distributed(finished: bool = False) -> None:
    """Leave the job. After a run that `finished` on this rank, first wait for every rank to get
    here: a rank that tore its process group down while another still had its last collective in
    flight could make that one abort (gloo, on the CPU). After a failure, leave at once (torchrun
    stops the others)."""
    if dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The sharding choice and loading


def base_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the base model's weights in `dtype` (a tied embedding counted once)."""
    with torch.device("meta"):
        model = Llama(config)
    return sum(p.numel() for n, p in model.named_parameters() if ".lofit_" not in n) * dtype.itemsize


def device_memory(device: torch.device) -> int:
    """Bytes one process may use: the GPU's memory, or on a CPU the host's RAM over its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local


def choose_sharding(requested: str, config, dtype: torch.dtype, d: Dist, plan_for=None) -> tuple[str, str]:
    """("replicate" or "shard", why) for the frozen base under --sharding `requested`.

    auto with one process replicates. With several, `plan_for` (sharding -> a
    memory_plan.MemoryPlan of this run's training step; train.py passes one) decides: replicate
    when the plan says a replicated base fits, else shard (pick_sharding). Without one (eval.py,
    iti.py: no training step), replicate when the base weights take at most FIT_FRACTION of the
    device's memory.

    Raises:
        UsageError: shard was asked for outside torchrun.
    """
    if requested == "shard" and not dist.is_initialized():
        raise UsageError("--sharding shard needs torchrun (e.g. torchrun --nproc_per_node 1 train.py ...)")
    if plan_for is not None or requested != "auto" or d.world == 1:
        return pick_sharding(requested, d.world, plan_for)
    weights = base_bytes(config, dtype)
    memory = device_memory(d.device)
    fits = weights <= FIT_FRACTION * memory
    return ("replicate" if fits else "shard"), \
        f"auto: base weights {weights / 2**30:.2f} GiB {'<=' if fits else '>'} {FIT_FRACTION:g} x " \
        f"{memory / 2**30:.1f} GiB of {d.device.type} memory per process"


def pick_sharding(requested: str, world: int, plan_for) -> tuple[str, str]:
    """The sharding choice from a memory plan: what --sharding asks for, else replicate with one
    process, else replicate when plan_for("replicate") fits and shard when it does not."""
    if requested != "auto":
        return requested, f"--sharding {requested}"
    if world == 1:
        return "replicate", "one process"
    plan = plan_for("replicate")
    verdict = "fits in" if plan.fits else "does not fit in"
    return ("replicate" if plan.fits else "shard"), \
        f"auto: replicated, the memory plan's {plan.per_gpu_gib:.1f} GiB per process {verdict} " \
        f"{plan.gpu_memory_gib:.1f} GiB"


def load_model(name: str, d: Dist, dtype: torch.dtype, sharding: str, progress: bool = False) -> Llama:
    """The base model with its base weights frozen, held on d.device as `sharding` says."""
    d.sharding = sharding
    if sharding == "shard":
        model = load_sharded(name, d, dtype)
    else:
        model = load_checkpoint(name, dtype=dtype, device=d.device, progress=progress and d.main)
    for param_name, p in model.named_parameters():
        if ".lofit_" not in param_name:
            p.requires_grad_(False)
    return model


def load_sharded(name: str, d: Dist, dtype: torch.dtype) -> Llama:
    """A Llama whose blocks are FSDP2-sharded over the job's ranks, each rank reading only its rows.

    Built on the meta device and frozen before fully_shard (so the sharded parameters never
    require gradients); then each block tensor's dim-0 slice that this rank keeps (FSDP2's
    torch.chunk layout) is read from the safetensors files; embeddings, final norm and lm_head are
    read whole. The same checks as Llama.from_pretrained: every tensor present with its shape.
    """
    if is_gguf(name):
        raise UsageError(f"--sharding shard reads each rank's rows from safetensors files; {name} is a GGUF file, "
                         f"which is read whole: pass --sharding replicate")
    directory = resolve_model_dir(name)
    config = read_config(directory)
    with torch.device("meta"):
        model = Llama(config).to(dtype)
        for block in model.layers:  # LoFiT parameters stay fp32 (as from_pretrained makes them)
            attn = block.self_attn
            for param_name, param in list(attn.named_parameters(recurse=False)):
                if param_name.startswith("lofit_"):
                    setattr(attn, param_name, nn.Parameter(torch.zeros(param.shape, dtype=torch.float32)))
    model.requires_grad_(False)
    lofit = {p for n, p in model.named_parameters() if ".lofit_" in n}
    replicated = lofit | {p for m in (model.embed_tokens, model.norm, model.lm_head) for p in m.parameters()}
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=lofit)
    fully_shard(model, mesh=mesh, ignored_params=replicated)  # the root: blocks reshard after forward
    register_fsdp_forward_method(model, "hidden_states")  # losses and evaluation call it, not forward
    model.to_empty(device=d.device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters())
    expected = {hf_name(n): n for n in params if ".lofit_" not in n}
    loaded, unexpected = set(), []
    with torch.no_grad():
        for file in checkpoint_files(directory):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        tied_copy = key == "lm_head.weight" and config.tie_word_embeddings
                        if key.endswith("rotary_emb.inv_freq") or tied_copy:
                            continue
                        if key not in expected:
                            unexpected.append(key)
                            continue
                        param, rows = params[expected[key]], f.get_slice(key)
                        if tuple(rows.get_shape()) != tuple(param.shape):
                            raise CheckpointError(f"{file.name}: {key} has shape {tuple(rows.get_shape())}, "
                                                  f"config.json implies {tuple(param.shape)}")
                        if isinstance(param, DTensor):
                            local = param.to_local()  # this rank's rows, a view into FSDP's storage
                            start = min(d.rank * -(-param.shape[0] // d.world), param.shape[0])
                            assert local.shape[0] == min(param.shape[0] - start, -(-param.shape[0] // d.world))
                            if local.shape[0]:
                                local.copy_(rows[start:start + local.shape[0]])
                        else:
                            param.copy_(rows[:])
                        loaded.add(key)
            except SafetensorError as e:
                raise CheckpointError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
        missing = sorted(set(expected) - loaded)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {directory} does not match its config.json: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")
        for n, p in model.named_parameters():  # to_empty made new parameter objects: look them up again
            if ".lofit_" in n:
                p.zero_()
    model.inv_freq = rope_inv_freq(config).to(d.device)
    model.source = str(name)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Training: each rank's share of a batch, and the gradient sum


def rank_share(batch: list[int], d: Dist, micro: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of a global batch, each with its weight: 1, or 0 for a filler.

    Every rank gets the same number of micro-batches (a sharded base needs all ranks in every
    forward), so a rank whose share is short runs the batch's first example with weight 0.
    """
    share = -(-len(batch) // d.world)  # ceil
    mine = batch[d.rank * share:(d.rank + 1) * share]
    chunks = [mine[i:i + micro] for i in range(0, share, micro)]
    return [(chunk, 1.0) if chunk else (batch[:1], 0.0) for chunk in chunks]


def sync_gradients(params, loss_sum: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum the LoFiT gradients and the loss over all ranks with one all_reduce; return the summed loss."""
    if d.world == 1:
        return loss_sum
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten().float() for p in params] + [loss_sum.view(1).float()])
    dist.all_reduce(flat)  # SUM
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[-1]


# ----------------------------------------------------------------------------------------------
# Work split across ranks, and keeping ranks in step


def rank_slice(n: int, d: Dist) -> slice:
    """This rank's contiguous share of n items: ceil(n / world) of them (fewer or none on the last ranks)."""
    share = -(-n // d.world)
    return slice(min(d.rank * share, n), min((d.rank + 1) * share, n))


def gather_lists(items: list, d: Dist) -> list:
    """Every rank's `items` (picklable; e.g. its rank_slice's results) joined in rank order, on every rank."""
    if d.world == 1:
        return items
    parts = [None] * d.world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def barrier(d: Dist) -> None:
    """Wait until every rank gets here."""
    if d.world > 1:
        dist.barrier()


def same_on_every_rank(obj, d: Dist):
    """Rank 0's `obj` on every rank (e.g. a head ranking), so ranks can never disagree on it."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool, d: Dist) -> bool:
    t = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(t)
    return bool(t.item())


@contextlib.contextmanager
def lockstep(model: Llama, d: Dist):
    """Inside this block every rank makes the same number of model.hidden_states calls.

    Needed where the base is sharded and ranks do different amounts of work (their own slice of
    the evaluation; generation that stops early). Each call first tells the others it is coming
    (one all_reduce of a flag); on leaving, a rank joins the calls still made elsewhere with a
    one-token dummy forward until no rank has any left. A no-op when the base is replicated.
    """
    if d.sharding != "shard" or d.world == 1:
        yield
        return
    real = model.hidden_states  # the FSDP-registered method

    def announced(*args, **kwargs):
        _any_rank(True, d)
        return real(*args, **kwargs)

    model.hidden_states = announced
    try:
        yield
    except BaseException:
        model.hidden_states = real  # torchrun stops the other ranks when this one fails
        raise
    model.hidden_states = real
    dummy = torch.zeros(1, 1, dtype=torch.long, device=d.device)
    with torch.no_grad():
        while _any_rank(False, d):
            real(dummy)
