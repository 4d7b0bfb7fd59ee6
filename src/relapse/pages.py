"""The pieces every relapse HTML page shares (the study report, the audit page): one self-contained file in one
style, figures inlined as PNG, and image grids (rows of images with a label per row, the same prompts and seeds across
rows)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"""


def figure_png(fig) -> str:
    """A matplotlib figure as base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def grid_figure(rows: dict[str, list[np.ndarray]], path: Path, caption: str) -> str:
    """An image grid (:func:`save_grid`) written to ``path`` and inlined with its caption."""
    data = base64.b64encode(save_grid(rows, path).read_bytes()).decode()
    return f"<figure>{img(data, 'image grid')}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_page(out: Path, title: str, body: list[str]) -> Path:
    """The page, written atomically."""
    from relapse.io import write_text

    write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return out


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
