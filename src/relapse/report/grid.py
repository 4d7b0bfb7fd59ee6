"""Image grids: rows of images with a label per row (same prompts and seeds across rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_grid(rows: dict[str, list[np.ndarray]], out: str | Path, titles: dict[str, list[str]] | None = None) -> Path:
    """One labelled row per entry of ``rows`` (uint8 HxWx3 images), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols + 1.6, 1.25 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
                if titles and label in titles:
                    ax.set_title(titles[label][c], fontsize=6)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)
    return out
