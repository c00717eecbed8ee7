"""The paper's claims at small scale: SmolLM2-135M-Instruct (GGUF, fp32, CPU), every row a recorded command.

    python experiments/smollm2.py                     # everything; rerun the same line to continue
    python experiments/smollm2.py --tasks truthfulqa:0 --dry-run    # print the commands only
    python experiments/smollm2.py --gguf "$(python scripts/fetch_smollm2.py)"  # without ../shared

For each task (TruthfulQA fold 0 and 1, MQuAKE, CLUTRR) it runs, in this order:
  base    eval.py on the test split, no adapter.
  stage1  train.py --stage 1: A for every head with L1 (the Llama-2-7B row's lr and lambda), then the ranking.
  select  stage 2 on the top K of that ranking for each (K, lr_v) of the grid (--k-grid, --lr-grid), trained
          on the train split and scored on the VALIDATION split (eval.py --split val); the best cell
          (TruthfulQA: mean of MC1 and MC2; the others: accuracy) is the paper's way of choosing.
  lofit   the chosen cell's adapter scored on the test split.
  random  stage 2 on K seeded random heads (--head-selection random), the chosen K and lr_v.
  iti     (TruthfulQA) iti.py with ITI's own settings (K 48, alpha 15), not tuned here.
  other   stage 2 on the top K heads of ANOTHER task's stage-1 ranking (TruthfulQA <- MQuAKE,
          MQuAKE <- TruthfulQA fold 0, CLUTRR <- MQuAKE), the chosen K and lr_v.
  jola    (with --jola, or alone with --only-jola) JoLA (examples/jola.py): one stage on every head, its
          gates choosing, for each (l0, lr_v) of --jola-l0-grid x --lr-grid scored on the validation
          split; the best cell's adapter scored on the test split.

Every step writes into --out/<task>/<step>/ and is skipped once its result exists; a train.py step
left with a checkpoint is continued with --resume, so the study can be stopped at any time and
continued by running the same command. Each step's command and wall time go to --out/steps.json;
results.json and results.md (one row per task and method: metrics, trainable parameters, wall
time) are rebuilt after every task, for the --tasks of that command (--dry-run rebuilds them for
every finished step without running anything). Two commands with different --tasks may run at once
into the same --out (one per core); each holds its tasks' directories (machinery/rundir.py), so two
commands with the same task are refused instead of writing the same files. Ctrl-C, a failed step or
a damaged steps.json or result file ends the study with one line saying how to continue.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machinery import rundir  # noqa: E402
from model import LofitError  # noqa: E402
from storage.atomic import write_atomically, write_json_atomically  # noqa: E402

GGUF = ROOT.parent / "shared" / "weights" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("truthfulqa:0", "truthfulqa:1", "mquake", "clutrr")
OTHER = {"truthfulqa": "mquake", "mquake": "truthfulqa:0", "clutrr": "mquake"}  # whose stage-1 heads "other" uses
METRICS = {"truthfulqa": ("mc1", "mc2", "mc3"), "mquake": ("accuracy",), "clutrr": ("accuracy",)}


class StudyError(LofitError):
    """A step failed or a file of the study is damaged; the message says how to continue."""


def read_json(path: Path, what: str, remedy: str) -> dict:
    """The JSON object in `path`, or a StudyError naming the damaged file and `remedy`."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); {remedy}") from None
    if not isinstance(content, dict):
        raise StudyError(f"{what} {path} does not hold a JSON object; {remedy}")
    return content


def read_steps(path: Path) -> dict:
    if not path.is_file():
        return {}
    return read_json(path, "the step log", "move it away and rerun the same command (finished steps are found by "
                                           "their results and skipped; only their recorded times are lost)")


def read_result(path: Path) -> dict:
    return read_json(path, "the step result", "delete it and rerun the same command: that step runs again")


class Study:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.log_path = self.out / "steps.json"
        self.steps = read_steps(self.log_path)

    def common(self, task: str, fold: int | None) -> list[str]:
        flags = ["--task", task, "--model", str(self.args.gguf), "--dtype", "float32"]
        flags += ["--fold", str(fold)] if fold is not None else []
        return flags + (["--data-dir", str(Path(self.args.data_dir).resolve())] if self.args.data_dir else [])

    def run(self, name: str, script: str, flags: list[str], result: Path, train_dir: Path | None = None) -> dict | None:
        """Run one step unless its result exists; return the result's JSON (None in a dry run)."""
        if result.is_file():
            return read_result(result)
        if train_dir is not None and (train_dir / "checkpoint.pt").is_file():
            flags = flags + ["--resume"]
        elif train_dir is not None and train_dir.exists():
            flags = flags + ["--overwrite"]  # a run that stopped before its first checkpoint: start it again
        command = [sys.executable, str(ROOT / script), *flags]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
        if self.args.dry_run:
            return None
        log = self.out / "logs" / (name.replace("/", "_") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        began = time.time()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads))
        with open(log, "a") as f:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        seconds = time.time() - began
        if code != 0 or not result.is_file():
            raise StudyError(f"{name} failed (exit {code}); see {log}. Fix it and rerun the same command to continue.")
        record = self.steps.get(name, {"seconds": 0.0})
        with open(self.out / ".steps.json.lock", "a") as lock:  # another study process (other --tasks) may
            fcntl.flock(lock, fcntl.LOCK_EX)                       # log its steps at the same time
            self.steps = {**read_steps(self.log_path), **self.steps}
            self.steps[name] = {"command": command[1:], "seconds": round(record["seconds"] + seconds, 1)}
            write_json_atomically(self.log_path, self.steps)
        return read_result(result)

    def seconds(self, *names: str) -> float:
        return round(sum(self.steps.get(n, {}).get("seconds", 0.0) for n in names), 1)


def split_task(spec: str) -> tuple[str, int | None]:
    task, _, fold = spec.partition(":")
    return task, int(fold) if fold else (0 if task == "truthfulqa" else None)


def score(task: str, summary: dict) -> float:
    return (summary["mc1"] + summary["mc2"]) / 2 if task == "truthfulqa" else summary["accuracy"]


def study_task(s: Study, spec: str, rows: list):
    """Run every step of one task; append its table rows."""
    task, fold = split_task(spec)
    tag, d = spec.replace(":", "_fold"), s.out / spec.replace(":", "_fold")
    common = s.common(task, fold)
    d.mkdir(parents=True, exist_ok=True)
    evaluate = ["--eval-batch-size", str(s.args.eval_batch_size)]
    base = s.run(f"{tag}/base", "eval.py", [*common, *evaluate, "--out", str(d / "base.json")], d / "base.json")
    if base:
        rows.append(row(spec, "base model", base["summary"], 0, s.seconds(f"{tag}/base")))
    stage1 = d / "stage1"
    s.run(f"{tag}/stage1", "train.py", [*common, "--stage", "1", "--out", str(stage1)], stage1 / "heads.json", stage1)
    cells = {}
    for k in s.args.k_grid:
        for lr in s.args.lr_grid:
            cell = d / f"select_k{k}_lr{lr:g}"
            s.run(f"{tag}/select_k{k}_lr{lr:g}/train", "train.py",
                  [*common, "--heads", str(stage1 / "heads.json"), "--k", str(k), "--lr-v", str(lr), "--no-eval",
                   "--out", str(cell)], cell / "metrics.json", cell)
            val = s.run(f"{tag}/select_k{k}_lr{lr:g}/val", "eval.py",
                        [*common, *evaluate, "--split", "val", "--adapter", str(cell / "adapter.safetensors"),
                         "--out", str(d / f"val_k{k}_lr{lr:g}.json")], d / f"val_k{k}_lr{lr:g}.json")
            if val:
                cells[(k, lr)] = (score(task, val["summary"]), cell)
    if len(cells) < len(s.args.k_grid) * len(s.args.lr_grid):
        return
    (k, lr), (_, best) = max(cells.items(), key=lambda kv: kv[1][0])
    chosen = {"k": k, "lr_v": lr, "validation": {f"k{kk}_lr{ll:g}": round(v, 4) for (kk, ll), (v, _) in cells.items()}}
    write_json_atomically(d / "chosen.json", chosen)
    test = s.run(f"{tag}/lofit", "eval.py", [*common, *evaluate, "--adapter", str(best / "adapter.safetensors"),
                                             "--out", str(d / "lofit.json")], d / "lofit.json")
    if test is None:  # a dry run
        return None
    trained = read_result(best / "metrics.json")["trainable_parameters"]
    rows.append(row(spec, f"LoFiT (K {k}, lr_v {lr:g})", test["summary"], trained,
                    s.seconds(f"{tag}/stage1", f"{tag}/select_k{k}_lr{lr:g}/train", f"{tag}/lofit")))
    chosen_flags = ["--k", str(k), "--lr-v", str(lr)]
    random = s.run(f"{tag}/random", "train.py", [*common, "--head-selection", "random", *chosen_flags,
                                                 "--out", str(d / "random")],
                   d / "random" / "metrics.json", d / "random")
    if random is None:
        return None
    rows.append(row(spec, f"stage 2 on random heads (K {k})", random["test"], random["trainable_parameters"],
                    s.seconds(f"{tag}/random")))
    if task == "truthfulqa":
        iti = s.run(f"{tag}/iti", "iti.py", [*common, "--out", str(d / "iti")], d / "iti" / "metrics.json")
        if iti is None:
            return None
        rows.append(row(spec, "ITI (K 48, alpha 15)", iti["test"], iti.get("k", 48) * 64, s.seconds(f"{tag}/iti")))
    return chosen_flags


def study_other(s: Study, spec: str, chosen_flags: list[str], rows: list):
    """Stage 2 on another task's stage-1 heads (after every task's stage 1 exists)."""
    task, fold = split_task(spec)
    tag, d = spec.replace(":", "_fold"), s.out / spec.replace(":", "_fold")
    donor = OTHER[task].replace(":", "_fold")
    heads = s.out / donor / "stage1" / "heads.json"
    if not heads.is_file():
        return
    other = s.run(f"{tag}/other", "train.py", [*s.common(task, fold), "--heads", str(heads), *chosen_flags,
                                               "--out", str(d / "other")], d / "other" / "metrics.json", d / "other")
    if other is None:
        return
    rows.append(row(spec, f"stage 2 on {OTHER[task]}'s heads", other["test"], other["trainable_parameters"],
                    s.seconds(f"{tag}/other")))


def study_jola(s: Study, spec: str, rows: list):
    """JoLA's row: its settings chosen on the validation split as LoFiT's are, then the test split."""
    task, fold = split_task(spec)
    tag, d = spec.replace(":", "_fold"), s.out / spec.replace(":", "_fold")
    common = [*s.common(task, fold), "--intervention", str(ROOT / "examples" / "jola.py")]
    evaluate = ["--eval-batch-size", str(s.args.eval_batch_size)]
    d.mkdir(parents=True, exist_ok=True)
    cells = {}
    for l0 in s.args.jola_l0_grid:
        for lr in s.args.lr_grid:
            name, cell = f"jola_l0{l0:g}_lr{lr:g}", d / f"jola_l0{l0:g}_lr{lr:g}"
            s.run(f"{tag}/{name}/train", "train.py", [*common, "--intervention-arg", f"l0={l0}", "--lr-v", str(lr),
                                                       "--no-eval", "--out", str(cell)], cell / "metrics.json", cell)
            val = s.run(f"{tag}/{name}/val", "eval.py", [*common, *evaluate, "--split", "val", "--adapter",
                                                         str(cell / "adapter.safetensors"),
                                                         "--out", str(d / f"val_{name}.json")], d / f"val_{name}.json")
            if val:
                cells[(l0, lr)] = (score(task, val["summary"]), cell, name)
    if not cells or len(cells) < len(s.args.jola_l0_grid) * len(s.args.lr_grid):
        return
    (l0, lr), (_, best, name) = max(cells.items(), key=lambda kv: kv[1][0])
    write_json_atomically(d / "jola_chosen.json", {"l0": l0, "lr_v": lr, "validation": {
        n: round(v, 4) for v, _, n in cells.values()}})
    test = s.run(f"{tag}/jola", "eval.py", [*common, *evaluate, "--adapter", str(best / "adapter.safetensors"),
                                            "--out", str(d / "jola.json")], d / "jola.json")
    if test is not None:
        trained = json.loads((best / "metrics.json").read_text())["trainable_parameters"]
        rows.append(row(spec, f"JoLA (l0 {l0:g}, lr {lr:g})", test["summary"], trained,
                        s.seconds(f"{tag}/{name}/train", f"{tag}/jola")))


def row(spec: str, method: str, summary: dict, trainable: int, seconds: float) -> dict:
    task, _ = split_task(spec)
    return {"task": spec, "method": method, **{m: round(summary[m], 4) for m in METRICS[task]},
            "trainable_parameters": trainable, "wall_seconds": seconds}


def write_table(s: Study, rows: list):
    write_json_atomically(s.out / "results.json", {"model": str(s.args.gguf), "rows": rows, "steps": s.steps})
    lines = ["| task | method | MC1 / accuracy | MC2 | MC3 | trainable | wall (min) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        first = r.get("mc1", r.get("accuracy"))
        lines.append(f"| {r['task']} | {r['method']} | {first:.3f} | {r.get('mc2', '')} | {r.get('mc3', '')} | "
                     f"{r['trainable_parameters']:,} | {r['wall_seconds'] / 60:.1f} |")
    write_atomically(s.out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def hold(s: Study, spec: str):
    """This command holds the task's directory while it runs the task's steps (none in a dry run)."""
    if s.args.dry_run:
        return contextlib.nullcontext()
    command = rundir.command_line("experiments/smollm2.py", sys.argv[1:])
    return rundir.hold(s.out / spec.replace(":", "_fold"), command=command)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=str(GGUF), help="SmolLM2-135M-Instruct GGUF file")
    p.add_argument("--data-dir", help="datasets directory (default: the project's own copies)")
    p.add_argument("--out", default="runs/smollm2")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--k-grid", nargs="+", type=int, default=[4, 8, 16], help="K values tried on validation")
    p.add_argument("--lr-grid", nargs="+", type=float, default=[1e-2], help="stage-2 learning rates tried")
    p.add_argument("--jola", action="store_true", help="also the JoLA row (examples/jola.py)")
    p.add_argument("--only-jola", action="store_true", help="only the JoLA row of each task")
    p.add_argument("--jola-l0-grid", nargs="+", type=float, default=[1e-3, 1e-2],
                   help="JoLA's expected-L0 penalty weights tried on validation")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per step")
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing: print the commands of the steps still to run, rebuild the table from the rest")
    args = p.parse_args(argv)
    try:
        s, rows, chosen = Study(args), [], {}
        s.out.mkdir(parents=True, exist_ok=True)
        for spec in args.tasks:
            with hold(s, spec):
                if not args.only_jola:
                    chosen[spec] = study_task(s, spec, rows)
                if args.jola or args.only_jola:
                    study_jola(s, spec, rows)
            write_table(s, rows)
        for spec in args.tasks:
            if chosen.get(spec):
                with hold(s, spec):
                    study_other(s, spec, chosen[spec], rows)
                write_table(s, rows)
    except LofitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished steps are kept in {args.out} (a train.py step keeps its last checkpoint); "
              f"rerun the same command to continue", file=sys.stderr)
        return 130
    print(f"results in {s.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
