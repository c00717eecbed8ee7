"""Benchmarks, side by side with transformers: LoFiT training, TruthfulQA scoring, generation.

    python benchmarks/bench.py                      # CPU: every section, both models (a few minutes)
    python benchmarks/bench.py --quick              # fewer repeats, smaller workloads
    python benchmarks/bench.py --only train --configs medium --threads 1 --clock cpu
    python benchmarks/bench.py --only train --configs medium --threads 1 --repeats 3 --compile   # + compiled
    python benchmarks/bench.py --only gpu --device cuda --out gpu.json   # Llama-2-7B-shaped, bf16

Prints a Markdown table of ours / transformers ratios (median over rounds, the two sides
alternating each round) and, with --out, writes it with every raw timing to a JSON file. This is
a measurement script, not a test: it asserts nothing, it reports. What each section compares:
train_bench.py, score_bench.py, generate_bench.py, gpu_bench.py; how timing and memory are
measured: common.py; results and how to read them: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import SPECS, Row, checkpoint_dir, load_hf, load_ours, new_workdir

SECTIONS = ("train", "score", "generate", "gpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SECTIONS, action="append",
                   help="run only this section (repeatable); default: train, score, generate on CPU, gpu on CUDA")
    p.add_argument("--configs", default="stories260K,medium",
                   help="CPU models, comma-separated: stories260K (real, 260K params), medium (random, 12 x 768)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller workloads (about a minute or two)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default: per model)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu", "user"), default="wall",
                   help="wall: elapsed time; cpu: process CPU time, robust to other load (use with --threads 1); "
                        "user: the user-mode part of cpu (leaves out the kernel's page-fault time)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the gpu section")
    p.add_argument("--gpu-model", choices=("7b", "tiny"), default="7b",
                   help="gpu section: Llama-2-7B shape, or a tiny one to check the code path anywhere")
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-seq", type=int, default=512)
    p.add_argument("--gpu-heads", type=int, default=32, help="gpu section: K heads in stage 2 (paper: 32 for 7B)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="gpu section: the device's dense bf16 peak, if its name is not in gpu_bench.PEAK_TFLOPS")
    p.add_argument("--no-baseline", action="store_true", help="gpu section: skip transformers (ours only)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with a compiled forward (train section: the full-logits step, as train.py "
                        "--compile; gpu section: ours)")
    p.add_argument("--out", type=Path, default=None, help="write the rows and raw timings here (JSON)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Workload:
    """How much to measure on one model: timed rounds per section and TruthfulQA questions."""
    train_repeats: int
    score_questions: int
    score_repeats: int
    generate_repeats: int

    def scaled(self, quick: bool, repeats: int | None) -> "Workload":
        """--quick halves everything (at least 2); --repeats overrides every round count."""
        w = Workload(*(max(2, n // 2) for n in astuple(self))) if quick else self
        if repeats:
            w = Workload(repeats, w.score_questions, repeats, repeats)
        return w


# A stories260K step takes milliseconds; a medium one seconds (and its full-prompt scoring ~1 s per candidate).
WORKLOADS = {"stories260K": Workload(10, 20, 3, 10), "medium": Workload(3, 4, 2, 3)}


def run_cpu(args, configs: list[str], sections: list[str]) -> tuple[list[Row], dict]:
    import generate_bench
    import score_bench
    import train_bench

    from tokenizer import load_tokenizer

    rows, raw = [], {}
    peak = None
    if "train" in sections:
        from common import matmul_peak_flops
        peak = matmul_peak_flops(clock=args.clock)
        say(f"matmul peak: {peak / 1e9:.0f} GFLOP/s ({args.threads} thread(s), fp32, 2048^3, {args.clock} clock)")
        raw["matmul_peak_flops"] = peak
    with new_workdir() as workdir:
        for name in configs:
            work = WORKLOADS[name].scaled(args.quick, args.repeats)
            directory = checkpoint_dir(SPECS[name], Path(workdir))
            tokenizer = load_tokenizer(str(directory))
            if "train" in sections:
                ours, hf = load_ours(directory), load_hf(directory)
                for stage in (1, 2):
                    say(f"{name}: training stage {stage}")
                    r, x = train_bench.run_stage(name, ours, hf, stage, train_bench.TrainShape(), work.train_repeats,
                                                 clock=args.clock, full_logits_variant=not args.quick,
                                                 peak_flops=peak, compiled_variant=args.compile)
                    rows += r
                    raw[f"train/{name}/stage{stage}"] = x
            ours, hf = load_ours(directory), load_hf(directory)  # fresh: base models, no LoFiT offsets
            if "score" in sections:
                say(f"{name}: TruthfulQA scoring, {work.score_questions} questions")
                r, x = score_bench.run(name, ours, hf, tokenizer, work.score_questions, work.score_repeats,
                                       clock=args.clock)
                rows += r
                raw[f"score/{name}"] = x
            if "generate" in sections:
                for task in ("mquake", "clutrr"):
                    say(f"{name}: generation, {task} prompts")
                    r, x = generate_bench.run(name, ours, hf, tokenizer, task, 8, work.generate_repeats,
                                              clock=args.clock)
                    rows += r
                    raw[f"generate/{name}/{task}"] = x
    return rows, raw


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine(args) -> dict:
    import transformers
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "clock": args.clock,
            "load_average_start": os.getloadavg()}
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(rows: list[Row]) -> str:
    """The results table: one line per measurement, ratio = ours / transformers."""
    lines = ["| section | model | measurement | transformers | ours | ours / transformers | target |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        target = "" if r.target is None else \
            f"{'>=' if r.higher_is_better else '<='} {r.target:g}{'' if r.absolute else 'x'} " \
            f"{'met' if r.met else 'MISSED'}"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.section} | {r.config} | {r.metric}{note} | {fmt(r.baseline)} {r.unit} | "
                     f"{fmt(r.ours)} {r.unit} | {f'{r.ratio:.2f}x' if r.baseline else '-'} | {target} |")
    return "\n".join(lines)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def write_json_atomically(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    sections = args.only or (["gpu"] if cuda else ["train", "score", "generate"])
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in SPECS]
    if unknown:
        print(f"error: unknown --configs {unknown}; choose from {', '.join(SPECS)}", file=sys.stderr)
        return 2
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    if "gpu" in sections and not cuda and args.gpu_model == "7b":
        print("error: the gpu section needs --device cuda (or --gpu-model tiny to check it on CPU)", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.resolve().parent.is_dir():
        print(f"error: the directory of --out {args.out} does not exist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine(args)
    rows, raw = [], {}
    cpu_sections = [s for s in sections if s != "gpu"]
    if cpu_sections:
        r, x = run_cpu(args, configs, cpu_sections)
        rows, raw = rows + r, {**raw, **x}
    if "gpu" in sections:
        import gpu_bench
        r, x = gpu_bench.run(args)
        rows, raw = rows + r, {**raw, "gpu": x}
    info["load_average_end"] = os.getloadavg()
    table = markdown(rows)
    print(f"\n{info['date']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"{info.get('gpu') or info['cpu']}, {args.threads} thread(s), {args.clock} clock, "
          f"load average {info['load_average_start'][0]:.1f} -> {info['load_average_end'][0]:.1f}\n")
    print(table)
    if args.out is not None:
        write_json_atomically(args.out, {"machine": info, "command": " ".join(sys.argv),
                                         "rows": [{**vars(r), "ratio": r.ratio, "met": r.met} for r in rows],
                                         "raw": raw, "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
