"""heads.json and heads.png: which heads stage 2 tunes, and how they were ranked.

heads.json holds the full ranking, best first, with scores where the method has them (stage 1:
||A||_2; ITI: probe accuracy; random: none), and the K selected heads. train.py and iti.py write it
(write_heads_file); train.py --heads reads it back, or a plain JSON list of [layer, head] pairs
(read_heads_file). random_ranking is the paper's random-heads ablation.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from machinery.flags import UsageError
from storage.atomic import write_atomically, write_json_atomically


def write_heads_file(path: Path, ranking, selected, *, task: str, model: str, source: str, config) -> None:
    """heads.json: the full ranking [(layer, head, score or None)], best first, and the selected heads."""
    write_json_atomically(path, {
        "task": task, "model": model, "source": source, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "k": len(selected), "selected": [list(h) for h in selected],
        "ranking": [{"layer": layer, "head": h, "score": s} for layer, h, s in ranking]})


def read_heads_file(path, config) -> list[tuple[int, int, float | None]]:
    """The ranking in a heads.json (write_heads_file), or a plain JSON list of [layer, head] pairs, best first.

    Raises:
        UsageError: no such file, not such a file, a head listed twice, or heads `config`'s model lacks.
    """
    if not Path(path).is_file():
        raise UsageError(f"--heads {path}: no such file")
    try:
        content = json.loads(Path(path).read_text())
        rows = content["ranking"] if isinstance(content, dict) else \
            [{"layer": layer, "head": h} for layer, h in content]
        ranking = [(r["layer"], r["head"], r.get("score")) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--heads {path}: not a heads.json from train.py nor a list of [layer, head] pairs ({e})")
    fractional = [(layer, h) for layer, h, _ in ranking
                  if not all(isinstance(n, int) and not isinstance(n, bool) for n in (layer, h))]
    if fractional:
        raise UsageError(f"--heads {path} names heads {fractional[:4]} whose layer or head is not a whole number; "
                         f"layers and heads are counted 0, 1, 2, ...")
    if isinstance(content, dict) and (content.get("n_layers"), content.get("n_heads")) not in \
            ((None, None), (config.n_layers, config.n_heads)):
        raise UsageError(f"--heads {path} ranks the heads of a {content['n_layers']} x {content['n_heads']} model "
                         f"({content.get('model')}); this model has {config.n_layers} layers x {config.n_heads} heads")
    repeated = sorted(head for head, n in Counter((layer, h) for layer, h, _ in ranking).items() if n > 1)
    if repeated:
        raise UsageError(f"--heads {path} lists heads {repeated[:4]} more than once; each head may appear once")
    bad = [(layer, h) for layer, h, _ in ranking if not (0 <= layer < config.n_layers and 0 <= h < config.n_heads)]
    if bad:
        raise UsageError(f"--heads {path} names heads {bad[:4]} that this model ({config.n_layers} layers x "
                         f"{config.n_heads} heads) does not have; was it made for another model?")
    return ranking


def random_ranking(n_layers: int, n_heads: int, seed: int) -> list[tuple[int, int, None]]:
    """Every head once, in an order drawn from a CPU generator seeded with `seed` (no scores).

    The paper's random-heads ablation: stage 2 then tunes the first K of this order.
    """
    order = torch.randperm(n_layers * n_heads, generator=torch.Generator().manual_seed(seed)).tolist()
    return [(i // n_heads, i % n_heads, None) for i in order]


def score_meaning(source: str) -> str:
    """What a ranking's scores are, from its source (heads.json's "source")."""
    if "stage 1" in source:
        return "stage-1 ||A||_2"
    if "ITI" in source:
        return "ITI probe accuracy"
    return "score"


def heads_file_source(path) -> str:
    """' (<the source recorded in a heads.json>)', or '' for a plain list of heads."""
    try:
        content = json.loads(Path(path).read_text())
        return f" ({content['source']})" if isinstance(content, dict) and content.get("source") else ""
    except (OSError, ValueError):
        return ""


def plot_heads(path: Path, ranking, selected, config, source: str = "stage 1 of this run"):
    """A layers x heads heatmap of the ranking's scores, the K selected heads outlined.

    The title says what the scores are (stage-1 ||A||_2, ITI probe accuracy, ...) and where the
    ranking came from (`source`, as in heads.json; a --heads file's own source in brackets).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.patches
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path.name} was not drawn (pip install matplotlib)")
        return
    if any(score is None for _, _, score in ranking):
        print(f"note: this ranking has no scores, so {path.name} was not drawn")
        return
    grid = torch.zeros(config.n_layers, config.n_heads)  # (L, H)
    for layer, head, score in ranking:
        grid[layer, head] = score
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.2 * config.n_heads), max(3.0, 1.2 + 0.15 * config.n_layers)))
    image = ax.imshow(grid.numpy(), origin="lower", aspect="auto", cmap="viridis")
    for layer, head in selected:
        ax.add_patch(matplotlib.patches.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    where = source if len(source) <= 60 else "..." + source[-57:]
    ax.set(xlabel="head", ylabel="layer",
           title=f"{score_meaning(source)} per head\n{where}\nK = {len(selected)} selected (red)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
