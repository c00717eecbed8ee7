"""One run per output directory, and nothing in it lost: the --out directory of train.py and iti.py.

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
from pathlib import Path

from machinery.flags import UsageError
from storage.atomic import WriteError, remove_temporaries, write_error, write_json_atomically

LOCK = ".lock"
MARKER = ".unfinished.json"
PREVIOUS = ".previous-run"


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its details yet)"


def _lock(out: Path, info: dict) -> int:
    """flock `out/.lock` (created if needed); return its descriptor, or refuse naming the holder."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the run before us removed the directory it had created
            out.mkdir(parents=True, exist_ok=True)
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
    return [n for n in names if (out / n).exists()]


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
    for name in names:
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


def state(out, outputs, checkpoint: str | None = None) -> str:
    """'empty', 'finished', 'unfinished' (a checkpoint to resume from) or 'failed' (started, no checkpoint)."""
    out = Path(out)
    if checkpoint and (out / checkpoint).is_file():  # (also a run stopped by code older than the marker)
        return "unfinished"
    if _marker(out) is not None:
        return "failed"
    return "finished" if _present(out, outputs) else "empty"


def _undo(out: Path, outputs) -> list[str]:
    """Leave `out` as it was before the run that the marker names: its files gone, the replaced run back."""
    if (_marker(out) or {}).get("phase") != "replacing":  # replacing: nothing of the new run exists yet
        _remove(out, outputs)
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
    if phase == "committing":  # killed while tidying up after a complete run
        _finish_commit(out, checkpoint)
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
        UsageError: `out` cannot be created, is busy, or holds a run the flags do not allow to touch.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory")
    created = not out.exists()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command}
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out, info)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created or written: {str(write_error(out, e)).split(': ', 1)[1]}") \
            from None
    try:
        _recover(out, outputs, checkpoint)
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
            _remove(out, outputs)  # the unfinished run's files; a finished run it replaced stays in .previous-run
        if now == "finished":
            found = _present(out, outputs)
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


def _release(out: Path, fd: int, created: bool) -> None:
    """Remove the lock file while still holding it (so nobody locks a removed file), then unlock."""
    try:
        (out / LOCK).unlink(missing_ok=True)
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
