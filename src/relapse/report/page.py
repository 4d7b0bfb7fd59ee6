"""The pieces every relapse HTML page shares: one self-contained file in one style, figures inlined as PNG."""

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
    """An image grid (:func:`relapse.report.grid.save_grid`) written to ``path`` and inlined with its caption."""
    from relapse.report.grid import save_grid

    data = base64.b64encode(save_grid(rows, path).read_bytes()).decode()
    return f"<figure>{img(data, 'image grid')}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_page(out: Path, title: str, body: list[str]) -> Path:
    """The page, written atomically."""
    from relapse.io import write_text

    write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    return out
