"""The MAMoE routing heatmap as a PNG: token shares per layer x expert, one panel per modality.

numpy and matplotlib only (no package import), so the training loop runs it as a script by
path in a process of its own: a figure costs about 0.3 s of Python, which in the training
process would hold the interpreter the step needs (measured: 2-3% of a tiny-preset CPU step
at a 50-step stats interval).

    python .../moe/heatmap_png.py ROUTING.npz OUT.png "TITLE"

ROUTING.npz holds `tokens` [layers, modality, experts], `layers` and `names` (what
`moe.stats.save_counts` writes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def draw(tokens: np.ndarray, layers: list[int], names: list[str], path: str | Path, title: str) -> Path:
    """Render the shares of `tokens` [layers, modality, experts] to `path` (matplotlib's object
    API: no pyplot, no process-wide backend)."""
    share = tokens / np.maximum(tokens.sum(-1, keepdims=True), 1)
    fig = Figure(figsize=(12, 1.5 + 0.35 * len(layers)))
    axes = fig.subplots(1, len(names), squeeze=False)
    for m, name in enumerate(names):
        ax = axes[0, m]
        image = ax.imshow(share[:, m], aspect="auto", cmap="viridis", vmin=0)
        slots = int(tokens[:, m].sum() / max(1, len(layers)))
        ax.set_title(f"{name}: {slots} routed slots / layer")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax, label="share of routed slots")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str]) -> None:
    counts, out, title = argv
    with np.load(counts) as data:
        draw(data["tokens"], data["layers"].tolist(), data["names"].tolist(), out, title)


if __name__ == "__main__":
    main(sys.argv[1:])
