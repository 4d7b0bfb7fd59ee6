"""``audit.html``: the verdict on one LoRA, in the study report's style, from the audit's own record."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from relapse.measure.metrics import HEADLINE_METRIC, METRICS
from relapse.pages import grid_figure, write_page

AUDIT_PAGE = "audit.html"
MEASURED = {"aligned": "the aligned model", "with_lora": "the aligned model + the LoRA", "lora_quality": "+ the LoRA, its own prompts"}
GRID_IMAGES = 8
TOP_TENSORS = 10


def _rate(entry: dict | None) -> str:
    if not entry:
        return "<td>-</td>"
    low, high = entry["ci95"]
    return f"<td>{100 * entry['rate']:.1f}% <small>[{100 * low:.0f}-{100 * high:.0f}], n = {entry['n']}</small></td>"


def measurements_table(record: dict) -> str:
    shown = [m for m in METRICS if any(isinstance(record.get(key, {}).get(m.name), dict) and "rate" in record[key][m.name]
                                       for key in MEASURED)]
    head = "".join(f"<th>{html.escape(m.label())}</th>" for m in shown)
    lines = [f"<table><tr><th>model</th><th>prompts</th>{head}</tr>"]
    for key, label in MEASURED.items():
        if key in record:
            prompts = record["config"]["lora_prompts" if key == "lora_quality" else "prompts"]
            cells = "".join(_rate(record[key].get(m.name)) for m in shown)
            lines.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(prompts))}</td>{cells}</tr>")
    return "\n".join(lines) + "</table>"


def screen_part(screen: dict | None) -> str:
    if screen is None:
        return ("<p>No pre-screen: the model came without a safety LoRA or an unaligned base (--safety, --base), so there "
                "is no alignment update to compare the LoRA with.</p>")
    figures = ", ".join(f"{label} {screen[key]:+.3f}" for key, label in (
        ("cosine_to_undo", "cos(dW_lora, &minus;dW_safe)"), ("projection_to_undo", "projection onto &minus;dW_safe"),
        ("safe_subspace_share", "share of |dW_lora| in dW_safe's subspace")) if screen.get(key) is not None)
    rows = sorted(screen.get("tensors", []), key=lambda t: -(t["projection_to_undo"] or 0))[:TOP_TENSORS]
    table = "".join(f"<tr><td>{html.escape(t['tensor'])}</td><td>{t['cosine_to_undo']:+.3f}</td><td>{t['projection_to_undo']:+.3f}</td>"
                    f"<td>{t['safe_subspace_share']:.3f}</td><td>{t['norm_ft']:.3g} / {t['norm_safe']:.3g}</td></tr>" for t in rows)
    return (f"<p>Over the {screen['tensors_shared']} tensors both updates touch (of {screen['tensors_ft']} the LoRA changes): "
            f"{figures or 'none'}.</p><table><tr><th>tensor (most undoing first)</th><th>cosine</th><th>projection</th>"
            f"<th>subspace share</th><th>|dW_lora| / |dW_safe|</th></tr>{table}</table>")


def image_grid(folder: Path, record: dict) -> str:
    from PIL import Image

    rows = {}
    for key, label in MEASURED.items():
        if key in record:
            files = [entry["file"] for entry in record[key]["per_image"][:GRID_IMAGES]]
            rows[label] = [np.asarray(Image.open(folder / record[key]["images"] / f).convert("RGB")) for f in files]
    if not rows:
        return ""
    return grid_figure(rows, folder / "grid.png", "the same prompts and seeds in every row")


def write_audit_page(folder: Path, record: dict) -> Path:
    verdict = record["verdict"] or "screened (no verdict: no images)"
    colour = {"PASS": "#1a7f37", "FAIL": "#cf222e"}.get(record["verdict"], "#555")
    metric = METRICS.get(HEADLINE_METRIC).title
    body = [f"<h1>relapse audit: <span style='color:{colour}'>{html.escape(verdict)}</span></h1>",
            f"<p>LoRA <code>{html.escape(record['lora'])}</code> on <code>{html.escape(record['config']['model'])}</code>"
            f" with safety {html.escape(', '.join(record['safety']) or 'none')}. FAIL when the {metric.lower()} with the LoRA "
            f"is above {100 * record['fail_above']:.1f}%. Rates with their 95% Wilson interval and n.</p>",
            "<h2>Measured</h2>", measurements_table(record),
            "<h2>Pre-screen: the LoRA in weight space</h2>", screen_part(record["screen"]),
            "<h2>Images</h2>", image_grid(folder, record)]
    return write_page(folder / AUDIT_PAGE, f"relapse audit: {verdict}", body)
