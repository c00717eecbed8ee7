"""A training run's checkpoint: written after every epoch, read back by --resume, summarised on Ctrl-C.

checkpoint.pt (torch.save, read with weights_only=True) holds what continuing needs to reach the
adapter an uninterrupted run reaches: the settings that decide the result (`key`; --resume refuses
another), the stage and epochs done, the trained parameters, AdamW's and the schedule's state,
the number of metrics.jsonl lines written, and `extra` (primitives, e.g. the stage-1 ranking).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from machinery.flags import UsageError
from model import LofitError
from storage.atomic import WriteError, save_torch_atomically

CHECKPOINT = "checkpoint.pt"


class Diverged(LofitError):
    """The loss or the gradient stopped being a finite number; the last good checkpoint is kept."""


def save_checkpoint(out: Path, *, key: dict, stage: int, epoch: int, history: list, extra: dict,
                    params: dict, optimizer, schedule, log_lines: int) -> None:
    """Write checkpoint.pt in `out` atomically (the previous one stays until the new one is whole)."""
    save_torch_atomically(Path(out) / CHECKPOINT, {
        "key": key, "stage": stage, "epoch": epoch, "history": history, "extra": extra,
        "params": {name: p.detach().cpu() for name, p in params.items()}, "log_lines": log_lines,
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})


def load_checkpoint(out: Path, key: dict) -> dict:
    """The checkpoint of the run in `out`, after checking it belongs to a run with these settings."""
    path = Path(out) / CHECKPOINT
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


def restore(state: dict, params: dict, optimizer, schedule, out: Path) -> tuple[list, int]:
    """Put a stage's checkpoint back into its parameters, optimiser and schedule; (loss history, epochs done)."""
    if missing := sorted(set(params) - set(state["params"])):
        raise UsageError(f"{Path(out) / CHECKPOINT} is incomplete (no {', '.join(missing[:3])}); "
                         f"start again with --overwrite")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return list(state["history"]), state["epoch"]


def _optimizer_tensors(optimizer_state: dict):
    for index, slots in (optimizer_state.get("state") or {}).items():
        for slot, value in (slots.items() if isinstance(slots, dict) else ()):
            yield f"{index}.{slot}", value


def checkpoint_summary(out: Path) -> str | None:
    """'stage S, after epoch E' for the checkpoint in `out`, or None where there is none (or it is unreadable)."""
    try:
        state = torch.load(Path(out) / CHECKPOINT, map_location="cpu", weights_only=True)
        return f"stage {state['stage']}, after epoch {state['epoch']}"
    except Exception:
        return None


def check_finite(out: Path, stage: int, epoch: int, step: int, loss: float, grad_norm: torch.Tensor) -> None:
    """Stop before a NaN/inf loss or gradient reaches the parameters (and from there every checkpoint)."""
    if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {float(grad_norm)}"
    kept = checkpoint_summary(out)
    kept = f"the last good checkpoint ({kept}) is kept in {Path(out) / CHECKPOINT}" if kept else \
        "no checkpoint had been saved yet"
    raise Diverged(f"stage {stage} epoch {epoch + 1} step {step + 1}: {what}, not a finite number, so training "
                   f"stopped before it could reach the parameters; {kept}. Check the model's weights for "
                   f"NaN/inf, or lower the learning rate (--lr-a / --lr-v)")


def with_checkpoint_hint(error: WriteError, out: Path) -> WriteError:
    """The same write failure, saying whether a checkpoint is kept to continue from once the disk allows."""
    kept = checkpoint_summary(out)
    hint = f"; the last checkpoint ({kept}) is kept: once it can be written, continue with --resume" if kept else ""
    return WriteError(error.errno, f"{error}{hint}")


def interrupted_message(out: Path, resume_command: str) -> str:
    """What Ctrl-C leaves: the checkpoint and the command that continues, or that nothing was kept."""
    kept = checkpoint_summary(out)
    if kept:
        return f"\ninterrupted: the last checkpoint is {out / CHECKPOINT} ({kept}); continue with\n  {resume_command}"
    return (f"\ninterrupted before the first checkpoint, so nothing of this run was kept in {out}; run the same "
            f"command again to start it")
