"""The run log: one JSON line per optimiser step in metrics.jsonl, and Weights & Biases when asked.

Each line: stage, step (within the stage, from 1), epoch, loss (the global batch's mean), lr (the
step's learning rate), grad_norm (of the trained parameters, before clipping) and tokens_per_s (the
global batch's tokens over the step's wall time). wandb is imported only for --wandb PROJECT, as
the original code logged its runs there.
"""
from __future__ import annotations

import json
from pathlib import Path

from storage.atomic import json_text, write_atomically, write_error


class StepLog:
    """metrics.jsonl in `out`, written by the main process only; also to wandb `project` if given.

    A resumed run first cuts the file back to the steps its checkpoint holds (cut), so a resumed
    run's log has the same steps as an uninterrupted one's.
    """

    def __init__(self, out: Path, main: bool, project: str | None = None, config: dict | None = None):
        self.path, self.main, self.lines = Path(out) / "metrics.jsonl", main, 0
        self.wandb = None
        if self.main and project:
            import wandb
            self.wandb = wandb.init(project=project, config=config)

    @staticmethod
    def wandb_installed() -> bool:
        """Whether --wandb can work here (wandb is optional: imported only for --wandb PROJECT)."""
        try:
            import wandb  # noqa: F401
        except ImportError:
            return False
        return True

    def cut(self, lines: int) -> None:
        """Keep the first `lines` lines (the steps a checkpoint holds)."""
        self.lines = lines
        if self.main and self.path.exists():
            kept = self.path.read_text().splitlines(keepends=True)[:lines]
            write_atomically(self.path, lambda tmp: Path(tmp).write_text("".join(kept)))

    def step(self, **row) -> None:
        self.lines += 1
        if self.main:
            try:
                with open(self.path, "a") as f:
                    f.write(json_text(row, name=str(self.path), indent=None) + "\n")  # strict JSON
            except OSError as e:
                raise write_error(self.path, e) from e
            if self.wandb is not None:
                self.wandb.log({f"stage{row['stage']}/{k}": v for k, v in row.items() if k != "stage"})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss(log: Path, path: Path) -> None:
    """loss.png: each stage's loss per optimiser step from metrics.jsonl (drawn only where matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # heads.png's note already says matplotlib is missing
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()] \
        if Path(log).is_file() else []
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage in sorted({r["stage"] for r in rows}):
        steps = [r for r in rows if r["stage"] == stage]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], marker=".", label=f"stage {stage}")
    ax.set(xlabel="optimiser step (within the stage)", ylabel="loss (global batch mean)", title="training loss")
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
