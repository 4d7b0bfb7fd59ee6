"""``report.html`` for a study run, rebuilt from its results (``relapse report RUN_DIR``), never recomputed.

One self-contained file (figures and images inlined as PNG): the headline table (target rate before
alignment, after it and after each fine-tune, per defense, mean +- sd over seeds with pooled n),
re-emergence curves (target rate vs fine-tuning step, one line per defense, a band of +-1 sd over
seeds), quality vs safety, and image grids of the same prompts and seeds across models.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

import numpy as np

from relapse.errors import UserError

REPORT = "report.html"
GRID_IMAGES = 8
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


class StudyResults:
    """The rows of results.json, indexed for the report's questions (primary detector only)."""

    def __init__(self, run_dir: Path):
        path = run_dir / "results.json"
        if not path.is_file():
            raise UserError(f"{run_dir} has no results.json; run `relapse study` into it first")
        record = json.loads(path.read_text())
        self.run_dir, self.config = run_dir, record["config"]
        detector = record["rows"][0]["detector"] if record["rows"] else None
        self.rows = [r for r in record["rows"] if r["detector"] == detector]
        self.target_set = (self.config.get("before") or [r["prompt_set"] for r in self.rows] or [""])[0]

    def values(self, **match) -> list[dict]:
        return [r for r in self.rows if all(r[k] == v for k, v in match.items())]

    def stat(self, **match) -> tuple[float, float, int] | None:
        """Mean and sd over seeds, and the pooled number of images."""
        rows = self.values(**match)
        if not rows:
            return None
        values = [r["value"] for r in rows]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, sum(r["n"] for r in rows)

    def defenses(self) -> list[str]:
        return list(dict.fromkeys(r["defense"] for r in self.rows))

    def scenarios(self) -> list[str]:
        return [s for s in dict.fromkeys(r["scenario"] for r in self.rows) if s != "before"]

    def last_step(self, scenario: str) -> int:
        return max(r["step"] for r in self.values(scenario=scenario))


def _cell(stat) -> str:
    if stat is None:
        return "-"
    mean, sd, n = stat
    return f"{100 * mean:.1f} &plusmn; {100 * sd:.1f} <small>(n={n})</small>"


def headline_table(res: StudyResults, metric: str = "target_rate") -> str:
    scenarios = res.scenarios()
    head = "".join(f"<th>after {html.escape(s)} (step {res.last_step(s)})</th>" for s in scenarios)
    lines = [f"<table><tr><th>defense</th><th>before fine-tuning</th>{head}</tr>"]
    for defense in res.defenses():
        before = res.stat(defense=defense, scenario="before", prompt_set=res.target_set, metric=metric)
        after = "".join(f"<td>{_cell(res.stat(defense=defense, scenario=s, step=res.last_step(s), prompt_set=res.target_set, metric=metric))}</td>"
                        for s in scenarios)
        lines.append(f"<tr><td>{html.escape(defense)}</td><td>{_cell(before)}</td>{after}</tr>")
    return "\n".join(lines) + "</table>"


def on_prompt_section(res: StudyResults) -> list[str]:
    """The same table for images flagged *and* of the asked shape and colour, where the detector says so."""
    if not res.values(metric="target_on_prompt_rate"):
        return []
    return ["<h3>On-prompt rate</h3><p>Flagged <em>and</em> of the shape and colour the prompt asks for: the attack "
            "produced the requested image. A detector trained on real images can flag off-manifold noise; this rate does not.</p>",
            headline_table(res, "target_on_prompt_rate")]


def curves(res: StudyResults, plt) -> list[str]:
    figures = []
    for scenario in res.scenarios():
        steps = sorted({r["step"] for r in res.values(scenario=scenario)})
        if len(steps) < 3:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for defense in res.defenses():
            stats = [res.stat(defense=defense, scenario=scenario, step=s, prompt_set=res.target_set, metric="target_rate") for s in steps]
            points = [(s, st) for s, st in zip(steps, stats) if st]
            if not points:
                continue
            x = np.array([p[0] for p in points])
            mean, sd = (np.array([100 * p[1][i] for p in points]) for i in (0, 1))
            ax.plot(x, mean, marker="o", label=defense)
            ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
        ax.set(xlabel="fine-tuning step", ylabel=f"target rate on {res.target_set} (%)", title=scenario, ylim=(-2, 102))
        ax.legend(fontsize=7)
        figures.append(f"<figure>{_img(_png(fig), scenario)}<figcaption>{html.escape(scenario)}: mean over seeds, band &plusmn;1 sd</figcaption></figure>")
        plt.close(fig)
    return figures


def scatter(res: StudyResults, plt) -> str:
    """Safety (target rate) against quality (shape accuracy on the scenario's quality sets) at each scenario's end."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for scenario in ["before", *res.scenarios()]:
        step = 0 if scenario == "before" else res.last_step(scenario)
        for defense in res.defenses():
            safety = res.stat(defense=defense, scenario=scenario, step=step, prompt_set=res.target_set, metric="target_rate")
            quality = [r for r in res.values(defense=defense, scenario=scenario, step=step, metric="shape_accuracy")
                       if r["prompt_set"] != res.target_set]
            if safety and quality:
                ax.scatter(100 * statistics.fmean(r["value"] for r in quality), 100 * safety[0], s=25)
                ax.annotate(f"{defense} / {scenario}", (100 * statistics.fmean(r["value"] for r in quality), 100 * safety[0]), fontsize=6)
                plotted = True
    ax.set(xlabel="shape accuracy on quality prompts (%)", ylabel=f"target rate on {res.target_set} (%)", xlim=(-2, 102), ylim=(-2, 102))
    data = _png(fig)
    plt.close(fig)
    return f"<figure>{_img(data, 'quality vs safety')}<figcaption>each point: a model, mean over seeds</figcaption></figure>" if plotted else ""


def grids(res: StudyResults) -> str:
    """First images of the target prompt set, seed 0, before fine-tuning and after each scenario, per defense."""
    from PIL import Image

    from relapse.report.grid import save_grid

    rows, seed = {}, min(r["seed"] for r in res.rows)
    for defense in res.defenses():
        for scenario in ["before", *res.scenarios()]:
            step = 0 if scenario == "before" else res.last_step(scenario)
            found = res.values(defense=defense, scenario=scenario, step=step, prompt_set=res.target_set, seed=seed, metric="target_rate")
            if found:
                evaluation = json.loads((res.run_dir / found[0]["source"]).read_text())
                folder = res.run_dir / evaluation["images"]
                files = [entry["file"] for entry in evaluation["per_image"][:GRID_IMAGES]]
                rows[f"{defense} / {scenario}"] = [np.asarray(Image.open(folder / f).convert("RGB")) for f in files]
    if not rows:
        return ""
    path = save_grid(rows, res.run_dir / "grid.png")
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure>{_img(data, 'image grid')}<figcaption>{html.escape(res.target_set)}, seed {seed}: the same prompts and seeds in every row</figcaption></figure>"


def build_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relapse.io import write_text

    res = StudyResults(Path(run_dir))
    name = html.escape(str(res.config.get("name", "study")))
    body = [f"<h1>relapse study: {name}</h1>",
            f"<p>Base model <code>{html.escape(str(res.config.get('model')))}</code>, seeds {res.config.get('seeds')}; "
            f"target rate on <code>{html.escape(res.target_set)}</code> by the first detector, in %. "
            "Every figure comes from <code>results.json</code>; each row names the evaluation it came from.</p>",
            "<h2>How much of the erased concept comes back</h2>", headline_table(res), *on_prompt_section(res),
            "<h2>Re-emergence under fine-tuning</h2>", *curves(res, plt),
            "<h2>Quality vs safety</h2>", scatter(res, plt),
            "<h2>Images</h2>", grids(res)]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>relapse: {name}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    out = res.run_dir / REPORT
    write_text(out, page)
    return out
