"""One run per output directory, and nothing in it lost: the --out of train.py, iti.py and eval.py, the study's.

    with claim(out, OUTPUT_FILES, overwrite=args.overwrite, resume=args.resume, checkpoint="checkpoint.pt",
               command=command_line("train.py", argv)):
        ...                       # write outputs and checkpoints into `out`
        commit(out)               # the run is complete

- Lock: `out/.lock` is held with flock for the whole run. The kernel releases it when the process
  ends, however it ends (kill -9 included), so nothing is ever left stuck. A second run into the
  same directory is refused with the holder's pid, host, start time and command.
- Started vs finished: `out/.unfinished.json` exists from the start of a run until commit() is
  done, and says which step the run is in (replacing, running, committing; each change is one
  atomic write, so a kill -9 at any moment leaves a state the next run can finish or undo). A
  directory with outputs and no marker holds a finished run; with the marker and a checkpoint, an
  unfinished one that --resume continues; with the marker and no checkpoint, a run that died
  before saving anything worth keeping: the next run removes its files, so the same command
  simply runs again.
- --overwrite never deletes a finished run before its replacement exists: the old outputs are
  moved into `out/.previous-run/` and deleted at commit(). If the new run fails before its first
  checkpoint, they are moved back byte-identical (also by the next run in the directory when the
  new one was killed); if it fails later, they stay in .previous-run while its checkpoint is kept
  for --resume.
- Temporary files of atomic writes that a killed process left behind (`.NAME.xxxxxxxx.tmp`) are
  removed when the directory is claimed, which is safe because the lock is held.
- Every kind of run is known here (RUNS: train.py with its checkpoint.pt, iti.py), so a command
  never mistakes another command's run for its own: a directory holding another command's
  unfinished run (its checkpoint) is refused, naming the command that continues it; --overwrite
  replaces a finished run of any kind whole (every file any kind writes goes to .previous-run).
- A marker is trusted only together with what it describes: a directory whose config.json records
  a complete run ("seconds", written last) holds a finished run, and a marker in the "running"
  phase beside it (a directory copied or restored mid-run) is dropped; nothing else is touched.
- A model's directory (model.safetensors, tokenizer files) is never an --out.
- eval.py's results file is held the same way (claim_file): `.NAME.lock` beside it, checked and
  written under the lock, so a second writer is refused instead of silently winning.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from machinery.flags import UsageError, check_out_file
from storage.atomic import WriteError, remove_temporaries, write_error, write_json_atomically

LOCK = ".lock"
MARKER = ".unfinished.json"
PREVIOUS = ".previous-run"


@dataclass(frozen=True)
class RunKind:
    """What one command writes into its --out directory, and the file --resume continues from."""
    outputs: tuple[str, ...]
    checkpoint: str | None


RUNS = {
    "train.py": RunKind(("config.json", "heads.json", "adapter.safetensors", "metrics.json", "metrics.jsonl",
                         "eval_details.json", "heads.png", "loss.png", "summary.md", "checkpoint.pt"), "checkpoint.pt"),
    "iti.py": RunKind(("config.json", "heads.json", "adapter.safetensors", "metrics.json", "eval_details.json"),
                      None),
}
ALL_OUTPUTS = tuple(dict.fromkeys(name for kind in RUNS.values() for name in kind.outputs))
CHECKPOINTS = {kind.checkpoint: script for script, kind in RUNS.items() if kind.checkpoint}
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.model",
               "tokenizer.json")


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet)"


def _holder_info(command: str) -> dict:
    """What a lock file says about its holder: pid, host, start time and command."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command}


def _why(path: Path, error: OSError) -> str:
    """The reason part of write_error's message ("cannot write PATH: reason")."""
    return str(write_error(path, error)).split(": ", 1)[1]


def _lock(out: Path, info: dict, path: Path | None = None) -> int:
    """flock `path` (default `out/.lock`; created if needed); return its descriptor, or refuse naming the holder."""
    path = out / LOCK if path is None else path
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the run before us removed the directory it had created
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--out {out} is in use by another run ({_holder(path)}); wait for it to end "
                             f"or choose another --out") from None
        try:  # the holder before us may have removed the file it locked: lock the one now at `path`
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _present(out: Path, names) -> list[str]:
    return [n for n in dict.fromkeys(names) if (out / n).exists()]


def _marker(out: Path) -> dict | None:
    """The run marker's content; None where there is none (a finished run, or no run)."""
    try:
        info = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"phase": "running"}
    return info if isinstance(info, dict) else {"phase": "running"}


def _set_phase(out: Path, info: dict, phase: str) -> None:
    write_json_atomically(out / MARKER, {**info, "phase": phase})


def _started(out: Path) -> str:
    info = _marker(out) or {}
    if {"started", "pid", "host"} <= set(info):
        return f"started {info['started']} by pid {info['pid']} on {info['host']}"
    return "started earlier"


def _remove(out: Path, names) -> None:
    for name in dict.fromkeys(names):
        (out / name).unlink(missing_ok=True)


def _restore_previous(out: Path) -> list[str]:
    """Move the outputs kept in .previous-run back into `out`; return their names."""
    previous = out / PREVIOUS
    if not previous.is_dir():
        return []
    names = sorted(p.name for p in previous.iterdir())
    for name in names:
        os.replace(previous / name, out / name)
    previous.rmdir()
    return names


def _checkpoints(out: Path, checkpoint: str | None) -> list[str]:
    """The checkpoint files (of any kind of run, and `checkpoint`) that `out` holds."""
    return _present(out, [*([checkpoint] if checkpoint else []), *CHECKPOINTS])


def _complete(out: Path) -> bool:
    """Whether out/config.json records a complete run ("seconds" is written into it last, before commit)."""
    try:
        record = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "seconds" in record


def state(out, outputs, checkpoint: str | None = None) -> str:
    """'empty', 'finished', 'unfinished' (a checkpoint to resume from) or 'failed' (started, no checkpoint)."""
    out = Path(out)
    if _checkpoints(out, checkpoint):  # (also a run stopped by code older than the marker)
        return "unfinished"
    if _marker(out) is not None:
        return "failed"
    return "finished" if _present(out, [*outputs, *ALL_OUTPUTS]) else "empty"


def _undo(out: Path, outputs) -> list[str]:
    """Leave `out` as it was before the run that the marker names: its files gone, the replaced run back."""
    if (_marker(out) or {}).get("phase") != "replacing":  # replacing: nothing of the new run exists yet
        _remove(out, [*outputs, *ALL_OUTPUTS])
    restored = _restore_previous(out)
    (out / MARKER).unlink(missing_ok=True)
    return restored


def _finish_commit(out: Path, checkpoint: str | None) -> None:
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    if checkpoint:
        (out / checkpoint).unlink(missing_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # from here on the directory holds a finished run


def _recover(out: Path, outputs, checkpoint: str | None) -> None:
    """Finish or undo what a killed run left half done; remove temporary files."""
    remove_temporaries(out)
    phase = (_marker(out) or {}).get("phase")
    if phase == "committing":  # killed while tidying up after a complete run (of whichever command)
        kind = RUNS.get(_script((_marker(out) or {}).get("command", "")))
        _finish_commit(out, kind.checkpoint if kind else checkpoint)
    elif phase == "running" and _complete(out) and not _checkpoints(out, checkpoint):
        # The outputs say the run is complete; the marker says it is not: trust the outputs, never delete them.
        (out / MARKER).unlink()
        kept = f"; {out / PREVIOUS} was left as it is" if (out / PREVIOUS).exists() else ""
        print(f"note: {out} holds a complete run (its config.json records its time) beside a stale "
              f"{MARKER} (a directory copied or restored mid-run?); the marker was removed and the run kept{kept}",
              flush=True)
    elif phase is not None and state(out, outputs, checkpoint) == "failed":
        started = _started(out)
        restored = _undo(out, outputs)
        print(f"note: {out} held a run that {started} and ended before its first checkpoint; its files "
              f"were removed" + (f" and the outputs of the run it was replacing were put back "
                                 f"({', '.join(restored)})" if restored else ""), flush=True)


def command_line(script: str, argv) -> str:
    return " ".join(shlex.quote(str(a)) for a in ["python", script, *argv])


def resume_command(script: str, argv) -> str:
    """The command line that continues a run: the same flags with --resume (and no --overwrite)."""
    kept = [str(a) for a in argv if a not in ("--overwrite", "--resume")]
    return command_line(script, [*kept, "--resume"])


def _script(command: str) -> str | None:
    """The script a recorded command line runs ("train.py"), or None where it names none."""
    try:
        words = shlex.split(command or "")
    except ValueError:
        return None
    return next((Path(w).name for w in words[:3] if w.endswith(".py")), None)


def _other_run(out: Path, checkpoint: str | None) -> str | None:
    """Why `out` holds another command's unfinished run (its checkpoint), with the command that continues it."""
    theirs = [name for name in _checkpoints(out, checkpoint) if name != checkpoint]
    if not theirs:
        return None
    script = CHECKPOINTS.get(theirs[0], "another command")
    recorded = (_marker(out) or {}).get("command", "")
    if _script(recorded) == script:
        words = shlex.split(recorded)
        start = next(i for i, w in enumerate(words) if w.endswith(".py"))
        how = f"continue it with `{resume_command(words[start], words[start + 1:])}`"
    else:
        how = f"continue it with the {script} command that started it plus --resume"
    return (f"{out} holds an unfinished {script} run ({_started(out)}; it has the checkpoint {theirs[0]}), which "
            f"this command does not know how to continue or replace: {how}, or choose another --out")


@contextmanager
def claim(out, outputs, *, overwrite: bool = False, resume: bool = False, checkpoint: str | None = None,
          command: str = ""):
    """Hold `out` for one run; check what it holds against --overwrite / --resume; undo a failed start.

    Args:
        out: The --out directory (created if needed).
        outputs: Every file name the run writes there (the checkpoint included).
        overwrite, resume: The flags.
        checkpoint: The name of the file --resume continues from (None: the script keeps none).
        command: The command line, shown to a second run that finds the directory busy.

    Raises:
        UsageError: `out` cannot be created, is busy, is a model's directory, holds another command's
            unfinished run, or holds a run the flags do not allow to touch.
    """
    out = Path(out)
    try:
        is_file = out.exists() and not out.is_dir()
        model = _present(out, MODEL_FILES) if out.is_dir() else []
    except OSError as e:  # e.g. a name longer than the filesystem allows
        raise UsageError(f"--out {out} cannot be used: {_why(out, e)}") from None
    if is_file:
        raise UsageError(f"--out {out} is a file; pass a directory")
    if model:
        raise UsageError(f"--out {out} holds a model ({', '.join(model)}), not a run's outputs; pass another --out "
                         f"(a run never writes into a model's directory)")
    created = not out.exists()
    info = _holder_info(command)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out, info)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created or written: {_why(out, e)}") from None
    try:
        _recover(out, outputs, checkpoint)
        other = _other_run(out, checkpoint)
        if other:
            raise UsageError(other)
        now = state(out, outputs, checkpoint)
        if resume and now != "unfinished":
            raise UsageError(f"--resume: {out} has no {checkpoint or 'checkpoint'} to continue from " +
                             ("(the run there finished; finished runs keep none)" if now == "finished" else
                              "(no run was started there); run the same command without --resume"))
        if now == "unfinished" and not resume:
            if not overwrite:
                raise UsageError(f"{out} holds an unfinished run ({_started(out)}; it has a checkpoint): pass "
                                 f"--resume to continue it, --overwrite to discard it and start again, or "
                                 f"choose another --out")
            _remove(out, [*outputs, *ALL_OUTPUTS])  # the unfinished run's files; a finished run it replaced
            # stays in .previous-run
        if now == "finished":
            found = _present(out, [*outputs, *ALL_OUTPUTS])  # every file of the run, whichever command wrote it
            if not overwrite:
                raise UsageError(f"{out} already holds another run's outputs ({', '.join(found)}); pass "
                                 f"--overwrite to replace them, or choose another --out")
            if (out / PREVIOUS).exists():  # not left by this module's steps: never overwrite what it holds
                raise UsageError(f"{out / PREVIOUS} holds files of an earlier run; move it away, then run again")
            _set_phase(out, info, "replacing")
            (out / PREVIOUS).mkdir()
            for name in found:  # kept until the new run has finished
                os.replace(out / name, out / PREVIOUS / name)
        _set_phase(out, info, "running")
    except BaseException as e:
        if (_marker(out) or {}).get("phase") == "replacing":
            _undo(out, outputs)
        _release(out, fd, created)
        if isinstance(e, OSError) and not isinstance(e, WriteError):  # moving files aside failed
            raise write_error(out, e) from e
        raise
    try:
        yield out
    except BaseException:
        phase = (_marker(out) or {}).get("phase")
        if phase == "running" and not (checkpoint and (out / checkpoint).is_file()):
            try:  # nothing worth keeping: leave the directory as it was before this run
                _undo(out, outputs)
            except OSError:
                pass
        elif phase == "running" and (out / PREVIOUS).is_dir():
            print(f"note: the outputs of the run this one replaces are kept in {out / PREVIOUS} until it "
                  f"finishes (--resume) or is discarded (--overwrite)", file=sys.stderr)
        raise
    finally:
        _release(out, fd, created)


def _release(out: Path, fd: int, created: bool, lock: Path | None = None) -> None:
    """Remove the lock file while still holding it (so nobody locks a removed file), then unlock."""
    try:
        (out / LOCK if lock is None else lock).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a refused or failed first run leaves no empty directory behind
    except OSError:
        pass
    os.close(fd)


def commit(out, checkpoint: str | None = "checkpoint.pt") -> None:
    """The run in `out` is complete: drop the run it replaced and its checkpoint, then mark it finished."""
    out = Path(out)
    info = _marker(out)
    if info is not None:
        _set_phase(out, info, "committing")
    _finish_commit(out, checkpoint)


@contextmanager
def claim_file(path, *, overwrite: bool = False, command: str = ""):
    """Hold one results file (eval.py's --out) while it is computed and written: `.NAME.lock` beside it.

    Under the lock, the file must not exist (unless `overwrite`); a second run into the same file is
    refused naming the holder. write the file with storage.atomic.write_json_atomically(..., replace=overwrite),
    so a writer that does not take the lock cannot be silently replaced either.

    Raises:
        UsageError: the file's directory is missing or not writable, the file exists (without
            `overwrite`), or another run holds it.
    """
    check_out_file(path, overwrite=overwrite)  # (an empty name is refused before it becomes ".")
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    info = _holder_info(command)
    try:
        fd = _lock(path, info, lock)
    except OSError as e:
        raise UsageError(f"--out {path} cannot be written: {_why(lock, e)}") from None
    try:
        check_out_file(path, overwrite=overwrite)  # again, now that nobody else can be writing it
        yield path
    finally:
        _release(path.parent, fd, False, lock)


@contextmanager
def hold(directory, *, command: str = ""):
    """Hold `directory` (created if needed) with its `.lock` only, for a driver whose steps claim their own
    run directories inside it (experiments/smollm2.py holds each task's directory)."""
    directory = Path(directory)
    info = _holder_info(command)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _lock(directory, info)
    except OSError as e:
        raise UsageError(f"{directory} cannot be created or written: {_why(directory, e)}") from None
    try:
        yield directory
    finally:
        _release(directory, fd, False)
