"""Run train.py's main() with each phase timed: `python timed_train.py PHASES.json -- TRAIN FLAGS...`.

vs_original.py runs this project's whole TruthfulQA command through here, in a process of its
own, so the phases can be timed from inside without changing train.py: the DPO reference pass,
stage 1, stage 2 and the test-set evaluation, each with its wall time and the process's peak
resident memory while it ran (Linux: /proc/self/clear_refs resets the peak, VmHWM reads it).
The whole command's time and peak are measured by the parent, from outside.

`python timed_train.py PHASES.json --data-files DIR -- TRAIN FLAGS...` (DIR laid out like
../shared/datasets, passed to train.py as --data-dir too): the data files found in DIR are
registered with their own sha256 and record counts in place of the official ones, so train.py
reads and verifies them as it would the official files. vs_original.py uses it to run both sides
on the same truncated copies of the TruthfulQA splits (a reduced workload).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from storage.atomic import write_text_atomically  # noqa: E402  (after the sys.path line above)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux 4.0+); a no-op where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The process's peak resident set size since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(phases: list, name, fn):
    """fn, recording each call as {"phase", "seconds", "peak_rss_bytes"} in `phases`."""
    def wrapper(*args, **kwargs):
        reset_peak_rss()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            label = name(args) if callable(name) else name
            phases.append({"phase": label, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()})
    return wrapper


def register_data_files(data_dir: Path) -> None:
    """Let data/ accept the files in data_dir: their sha256 and record counts replace the official ones."""
    import dataclasses
    import hashlib

    from data.files import FILES
    from data.readers import read_csv, read_json_list, read_jsonl, read_lines
    readers = {".json": read_json_list, ".jsonl": read_jsonl, ".csv": read_csv, ".txt": read_lines}
    for relpath, spec in list(FILES.items()):
        path = data_dir / relpath
        if path.is_file():
            FILES[relpath] = dataclasses.replace(spec, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                                 records=len(readers[path.suffix](path)))


def main(argv: list[str]) -> int:
    out, rest = Path(argv[0]), argv[argv.index("--") + 1:]
    if "--data-files" in argv[:argv.index("--")]:
        register_data_files(Path(argv[argv.index("--data-files") + 1]))
    import train
    phases: list = []
    train.reference_logprobs = timed(phases, "reference", train.reference_logprobs)
    train.train_stage = timed(phases, lambda args: f"stage{args[1]}", train.train_stage)
    for name in ("evaluate_split", "evaluate"):  # whichever train.py calls for the test-set evaluation
        if hasattr(train, name):
            setattr(train, name, timed(phases, "eval", getattr(train, name)))
    try:
        return train.main(rest)
    finally:
        write_text_atomically(out, json.dumps({"phases": phases}, indent=1))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
