"""What every benchmark shares: the models compared, timing, peak memory, and the result record.

Both sides of every comparison load the SAME checkpoint: a random transformers LlamaForCausalLM
saved once to a temporary directory (or the real stories260K), read by our `Llama.from_pretrained`
and by transformers' `LlamaForCausalLM.from_pretrained`. Timings alternate the sides round by
round (A B C, B C A, ...) so load from other processes on a shared machine hits both alike, and
each reported number is the median over rounds.

Peak memory is what one step allocates on top of what was live before it, as counted by
PyTorch's own allocator: on CUDA `torch.cuda.max_memory_allocated`; on CPU the allocation and
free events that `torch.profiler` records with `profile_memory=True` (the running sum of their
sizes, in time order, then its maximum). Memory that libraries allocate outside PyTorch's
allocator (e.g. oneDNN scratch buffers) is not counted, on either side.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
STORIES_DIR = SHARED / "weights" / "stories260K_hf"
LLAMA2_TOKENIZER = SHARED / "weights" / "llama2_tokenizer" / "tokenizer.model"
DATASETS_DIR = SHARED / "datasets"

from model import Llama  # noqa: E402  (after the sys.path line above)


@dataclass
class ModelSpec:
    """One model both sides load.

    Attributes:
        name: Short label for tables ("stories260K", "medium").
        path: An existing HF checkpoint directory (with its tokenizer), or None to build a random
            one from `hf_config`.
        hf_config: transformers LlamaConfig keyword arguments for a random checkpoint.
        tokenizer: tokenizer.model to place beside a random checkpoint.
    """
    name: str
    path: Path | None = None
    hf_config: dict = field(default_factory=dict)
    tokenizer: Path | None = None


STORIES = ModelSpec("stories260K", path=STORIES_DIR)
# The "medium" model: 12 layers, hidden 768, 12 heads, the Llama-2 vocabulary (32,000).
MEDIUM = ModelSpec("medium", hf_config=dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2), tokenizer=LLAMA2_TOKENIZER)
SPECS = {spec.name: spec for spec in (STORIES, MEDIUM)}


def checkpoint_dir(spec: ModelSpec, workdir: Path, seed: int = 0) -> Path:
    """The checkpoint directory of `spec`: the real one, or a random one saved by transformers."""
    for needed in (spec.path, spec.tokenizer):
        if needed is not None and not Path(needed).exists():
            raise SystemExit(f"{needed} is missing: the {spec.name} benchmarks read weights and tokenizers "
                             f"from ../shared/weights (run from a checkout next to ../shared)")
    if spec.path is not None:
        return Path(spec.path)
    directory = Path(workdir) / spec.name
    if not (directory / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM
        quiet_transformers()
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**spec.hf_config)).save_pretrained(directory)
        if spec.tokenizer is not None:
            os.symlink(Path(spec.tokenizer).resolve(), directory / "tokenizer.model")
    return directory


def load_ours(directory: Path, dtype=torch.float32, device="cpu") -> Llama:
    return Llama.from_pretrained(str(directory), dtype=dtype, device=device)


def load_hf(directory: Path, dtype=torch.float32, device="cpu"):
    """transformers' LlamaForCausalLM with SDPA attention (its fastest stock CPU/GPU path)."""
    from transformers import LlamaForCausalLM
    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def quiet_transformers() -> None:
    """No progress bars from transformers' saving and loading (they would interleave with the table)."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def new_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lofit-bench-")


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def user_cpu_time() -> float:
    """This process's CPU time in user mode: `cpu` without the kernel's share (e.g. zeroing the fresh
    pages of each step's large temporary tensors, which the allocator maps and unmaps every time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "user": user_cpu_time}


def interleaved_times(fns: dict, repeats: int, device="cpu", clock: str = "wall") -> dict[str, list[float]]:
    """Seconds each function in `fns` takes, over `repeats` rounds, the order rotating per round.

    clock "wall" is elapsed time; "cpu" is this process's CPU time (all its threads), which other
    processes' load on a shared machine does not inflate (use it with --threads 1; GPU work is not
    counted by it); "user" is the part of "cpu" spent in user mode (the kernel's page faults left out).
    """
    now = CLOCKS[clock]
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = now()
            fns[name]()
            synchronize(device)
            times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_peak_flops(device="cpu", n: int = 2048, repeats: int = 5, dtype=torch.float32,
                      clock: str = "wall") -> float:
    """This machine's measured matmul peak: FLOP/s of the fastest of `repeats` (n, n) @ (n, n) products.

    The yardstick for "fraction of the limit" rows: a step can only be as fast as its matrix
    multiplies run at this rate (with torch's current thread count). Measure it with the clock
    the steps are timed with (on a loaded machine, wall time would understate it).
    """
    now = CLOCKS[clock]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = now()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, now() - start)
    return 2 * n ** 3 / best


def linear_params(model) -> int:
    """N: the weights every token multiplies through (every nn.Linear, lm_head included; not embeddings)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# ----------------------------------------------------------------------------------------------
# Memory


def peak_memory(fn, device="cpu") -> int:
    """Bytes that running `fn()` allocates at its peak, above what was allocated before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_bytes(tensors) -> int:
    """Total bytes of distinct tensor storages (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the results table: a throughput (higher is better) or a memory (lower is better).

    `ratio` is ours / baseline in both cases. `target` applies to that ratio (>= for throughput,
    <= for memory), or with `absolute` to ours itself (e.g. MFU >= 0.40).
    """
    section: str
    config: str
    metric: str
    baseline: float
    ours: float
    unit: str
    higher_is_better: bool = True
    target: float | None = None
    absolute: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ours if self.absolute else self.ratio
        return value >= self.target if self.higher_is_better else value <= self.target
