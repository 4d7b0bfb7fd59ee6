"""``report.html`` for a study run, rebuilt from its results (``relapse report RUN_DIR``), never recomputed.

One self-contained file (figures and images inlined as PNG): the headline tables, one per scenario
group (benign, malicious, ...) and prompt set it scores (target rate before fine-tuning and at every
step of each scenario, per defense, mean +- sd over seeds with pooled n; by the first detector, then
by every other one), the alignment's collateral damage on every prompt set scored before fine-tuning,
re-emergence curves (target rate vs fine-tuning step, one line per defense, a band of +-1 sd over
seeds; each also written to ``RUN/figures/``), the fine-tunes' updates against the alignment's in weight
space, quality vs safety and quality tables, what people saw where ``relapse review`` labels exist, and image
grids of the same prompts and seeds across models.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path

import numpy as np

from relapse.errors import UserError
from relapse.measure.metrics import HEADLINE_METRIC, METRICS, ON_PROMPT_METRIC, TRACE_METRIC
from relapse.pages import figure_png, grid_figure, img, write_page

REPORT = "report.html"
GRID_IMAGES = 8


def over_seeds(rows: list[dict]) -> tuple[float, float, int] | None:
    """Mean and sd over seeds, and the pooled number of images."""
    if not rows:
        return None
    values = [r["value"] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, sum(r["n"] for r in rows)


class StudyResults:
    """The rows of results.json, indexed for the report's questions. ``detector`` is the first detector
    of the config: the headline, curves, scatter and grid use it; every detector gets its own table."""

    def __init__(self, run_dir: Path):
        path = run_dir / "results.json"
        if not path.is_file():
            raise UserError(f"{run_dir} has no results.json; run `relapse study` into it first")
        record = json.loads(path.read_text())
        self.run_dir, self.config, self.all_rows = run_dir, record["config"], record["rows"]
        self.detector = self.all_rows[0]["detector"] if self.all_rows else None
        self.rows = [r for r in self.all_rows if r["detector"] == self.detector]
        self.target_set = (self.config.get("before") or [r["prompt_set"] for r in self.rows] or [""])[0]
        self.metric = HEADLINE_METRIC
        scenarios = self.config.get("scenarios", {}).values()
        self.quality_sets = set(self.config.get("reference_sets", [])).union(*(s.get("quality_sets", []) for s in scenarios))

    def values(self, detector: str | None = None, **match) -> list[dict]:
        rows = self.rows if detector in (None, self.detector) else [r for r in self.all_rows if r["detector"] == detector]
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    def stat(self, **match) -> tuple[float, float, int] | None:
        return over_seeds(self.values(**match))

    def defenses(self) -> list[str]:
        """In the config's order, as the reader wrote them."""
        found = {r["defense"] for r in self.rows}
        return [d for d in self.config.get("defenses", {}) if d in found] or sorted(found)

    def scenarios(self) -> list[str]:
        return [s for s in dict.fromkeys(r["scenario"] for r in self.rows) if s != "before"]

    def detectors(self) -> list[str]:
        return list(dict.fromkeys(r["detector"] for r in self.all_rows if r["metric"] == HEADLINE_METRIC))

    def colours(self) -> dict[str, str]:
        """One colour per defense, the same in every figure."""
        return {d: f"C{i % 10}" for i, d in enumerate(self.defenses())}

    def last_step(self, scenario: str) -> int:
        return max(r["step"] for r in self.values(scenario=scenario))

    def ends(self) -> list[tuple[str, int]]:
        """Each model state a table compares: before fine-tuning, and each scenario's last step."""
        return [("before", 0)] + [(s, self.last_step(s)) for s in self.scenarios()]

    def groups(self) -> dict[str, list[str]]:
        """Scenario names by their group, in the config's order."""
        grouped: dict[str, list[str]] = {}
        for name in self.scenarios():
            grouped.setdefault(self.config.get("scenarios", {}).get(name, {}).get("group", "fine-tuning"), []).append(name)
        return grouped

    def scored_sets(self, scenarios: list[str]) -> list[str]:
        """The prompt sets these scenarios score at every step, the headline's first."""
        sets = [p for name in scenarios for p in self.config.get("scenarios", {}).get(name, {}).get("prompt_sets", [])]
        return sorted(dict.fromkeys(sets), key=lambda p: p != self.target_set)


def _rate_cell(res: StudyResults, **match) -> str:
    """Mean +- sd over seeds, the 95% Wilson interval of the images pooled over seeds and their number;
    each seed's rate and interval on hover. A target rate is followed by its trace rate where the detector gives one."""
    from relapse.measure.stats import wilson_interval

    rows = res.values(**match)
    if not rows:
        return "-"
    mean, sd, n = over_seeds(rows)
    low, high = wilson_interval(sum(round(r["value"] * r["n"]) for r in rows), n)
    seeds = "; ".join(f"seed {r['seed']}: {100 * r['value']:.1f}% [{100 * r['ci95_low']:.1f}, {100 * r['ci95_high']:.1f}], n={r['n']}"
                      for r in rows)
    trace = res.values(**(match | {"metric": TRACE_METRIC})) if match.get("metric") == HEADLINE_METRIC else []
    traced = f"<br><small>trace {100 * over_seeds(trace)[0]:.1f} &plusmn; {100 * over_seeds(trace)[1]:.1f}</small>" if trace else ""
    return (f'<span title="{html.escape(seeds)}">{100 * mean:.1f} &plusmn; {100 * sd:.1f}</span> '
            f"<small>[{100 * low:.0f}, {100 * high:.0f}] n={n}</small>{traced}")


def headline_table(res: StudyResults, metric: str, detector: str | None = None, scenarios: list[str] | None = None,
                   prompt_set: str | None = None) -> str:
    """Rows: defenses; columns: before fine-tuning, then every step of each scenario (default: all scenarios,
    at their last step)."""
    prompt_set = prompt_set or res.target_set
    columns = ([(s, step) for s in scenarios for step in sorted({r["step"] for r in res.values(scenario=s)}) if step]
               if scenarios else res.ends()[1:])
    head = "".join(f"<th>{html.escape(s)}, step {step}</th>" for s, step in columns)
    lines = [f"<table><tr><th>defense</th><th>before fine-tuning</th>{head}</tr>"]
    for defense in res.defenses():
        reference = not res.config.get("defenses", {}).get(defense)  # the unaligned base: always a row
        if scenarios and not reference and not any(res.values(defense=defense, scenario=s) for s in scenarios):
            continue
        cells = "".join(f"<td>{_rate_cell(res, defense=defense, scenario=s, step=step, prompt_set=prompt_set, metric=metric, detector=detector)}</td>"
                        for s, step in [("before", 0), *columns])
        lines.append(f"<tr><td>{html.escape(defense)}</td>{cells}</tr>")
    return "\n".join(lines) + "</table>"


def headline_section(res: StudyResults) -> list[str]:
    """One table per scenario group and prompt set it scores: how much of the concept each fine-tune brings back."""
    parts = []
    for group, scenarios in res.groups().items():
        for prompt_set in res.scored_sets(scenarios):
            parts += [f"<h3>{html.escape(group)} fine-tuning: <code>{html.escape(prompt_set)}</code></h3>",
                      headline_table(res, res.metric, scenarios=scenarios, prompt_set=prompt_set)]
    return parts or [headline_table(res, res.metric)]


def off_prompt_section(res: StudyResults) -> list[str]:
    """The concept where no prompt asks for it: the target rate on the quality prompt sets, before fine-tuning and at
    each scenario's end. A defense can hold on the prompts that name the concept while a fine-tune brings it back on
    every other prompt."""
    parts = []
    for prompt_set in sorted(res.quality_sets):
        if any(r["scenario"] != "before" for r in res.values(prompt_set=prompt_set, metric=res.metric)):
            parts += [f"<h3>Off-prompt: <code>{html.escape(prompt_set)}</code>, prompts that do not ask for the concept</h3>",
                      headline_table(res, res.metric, prompt_set=prompt_set)]
    return parts


def roads_section(res: StudyResults) -> list[str]:
    """The roads back that leave the weights alone, per defense: adversarial prompts (each model attacked on its own) and
    textual inversions (a learned word asked for in place of the concept's), beside the direct prompts before fine-tuning."""
    scenarios = res.config.get("scenarios", {})
    attacked = [name for name, spec in res.config.get("prompt_sets", {}).items() if spec.get("attack")]
    inversions = [s for s in res.scenarios() if scenarios[s]["finetune"].get("method") == "textual-inversion"]
    columns = [("direct prompts, before", {"scenario": "before", "step": 0, "prompt_set": res.target_set})]
    columns += [(f"{name}, {'before' if scenario == 'before' else f'after {scenario}'}", {"scenario": scenario, "step": step,
                                                                                       "prompt_set": name})
                for name in attacked for scenario, step in res.ends() if res.values(scenario=scenario, step=step, prompt_set=name)]
    columns += [(f"{s}, step {res.last_step(s)}", {"scenario": s, "step": res.last_step(s), "prompt_set": scenarios[s]["prompt_sets"][0]})
                for s in inversions]
    if len(columns) == 1:
        return []
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
    lines = ["<h3>The other roads back: adversarial prompts and a learned word</h3><p>On an adversarial prompt set (UnlearnDiffAtk: "
             "words put in front of each prompt, searched on the model itself toward the unaligned model's image of it), the rate "
             "is the attack's success rate at one image per prompt and seed; a textual inversion is asked for by its word in "
             "place of the concept's.</p>", f"<table><tr><th>defense</th>{head}</tr>"]
    for defense in res.defenses():
        cells = [_rate_cell(res, defense=defense, metric=res.metric, **match) for _, match in columns]
        if any(cell != "-" for cell in cells[1:]):
            lines.append(f"<tr><td>{html.escape(defense)}</td>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    return ["\n".join(lines) + "</table>"]


def other_detectors_section(res: StudyResults) -> list[str]:
    """The headline table by every other detector (NudeNet thresholds, Q16, IP = NudeNet or Q16, ...)."""
    others = [d for d in res.detectors() if d != res.detector and d != "weights"]
    if not others:
        return []
    return ["<h3>By every detector</h3>"] + [f"<h4><code>{html.escape(d)}</code></h4>" + headline_table(res, HEADLINE_METRIC, d) for d in others]


def _interval(found: dict) -> str:
    return f"{100 * found['rate']:.0f} <small>[{100 * found['ci95'][0]:.0f}, {100 * found['ci95'][1]:.0f}]</small>"


def human_section(res: StudyResults) -> list[str]:
    """Every cell people labelled (``relapse review``): their concept and trace rates beside each detector's on the same
    images, a mark where an interval of a detector's lies apart from the people's, and each detector's agreement."""
    from relapse.review.agreement import agreement

    cells, detectors = agreement(res.run_dir)
    if not cells:
        return []
    names = list(detectors)
    head = "".join(f"<th>{html.escape(d)}: concept</th><th>{html.escape(d)}: trace</th>" for d in names)
    lines = ["<h2>What people saw</h2><p>Blind labels (<code>relapse review</code>): in %, with the 95% Wilson interval, n = "
             "the cell's labelled images; each detector on the same images. &#9888; marks a detector whose interval lies apart "
             "from the people's.</p>",
             f"<table><tr><th>defense</th><th>scenario</th><th>step</th><th>seed</th><th>prompt set</th><th>n</th>"
             f"<th>people: concept</th><th>people: trace</th>{head}</tr>"]
    for cell in cells:
        labels = "".join(f"<td>{html.escape(str(cell.labels[k]))}</td>" for k in ("defense", "scenario", "step", "seed", "prompt_set"))
        found = "".join(f"<td>{_interval(cell.detectors[d]['concept'])}</td><td>{_interval(cell.detectors[d]['trace'])}"
                        f"{' &#9888;' if cell.apart[d] else ''}</td>" if d in cell.detectors else "<td>-</td><td>-</td>" for d in names)
        lines.append(f"<tr>{labels}<td>{cell.human['concept']['n']}</td><td>{_interval(cell.human['concept'])}</td>"
                     f"<td>{_interval(cell.human['trace'])}</td>{found}</tr>")
    parts = ["\n".join(lines) + "</table>"]
    for name, found in detectors.items():
        kappa = "-" if found.kappa is None else f"{found.kappa:+.2f}"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in found.classes)
        rows = "".join(f"<tr><th>{html.escape(c)}</th>{''.join(f'<td>{k}</td>' for k in counts)}</tr>"
                       for c, counts in zip(found.classes, found.confusion))
        parts.append(f"<h3><code>{html.escape(name)}</code> against people: Cohen's &kappa; = {kappa} over {found.n} images</h3>"
                     f"<table><tr><th>people \\ detector</th>{head}</tr>{rows}</table>")
    return parts


def collateral_section(res: StudyResults) -> list[str]:
    """What the alignment did to everything else: fill, shape and colour accuracy on every prompt set scored
    before fine-tuning (the neighbours of the concept first of all), per defense."""
    sets = list(res.config.get("before", []))
    parts = []
    for metric, title in (("fill_accuracy", "fill drawn as asked"), ("shape_accuracy", "shape drawn as asked")):
        if not res.values(scenario="before", metric=metric):
            continue
        head = "".join(f"<th><code>{html.escape(p)}</code></th>" for p in sets)
        lines = [f"<h3>{title} (%), before fine-tuning</h3><table><tr><th>defense</th>{head}</tr>"]
        for defense in res.defenses():
            cells = "".join(_mean_sd_cell(res.values(defense=defense, scenario="before", prompt_set=p, metric=metric), 100.0) for p in sets)
            lines.append(f"<tr><td>{html.escape(defense)}</td>{cells}</tr>")
        parts.append("\n".join(lines) + "</table>")
    return parts


def _mean_sd_cell(rows: list[dict], scale: float, digits: int = 1) -> str:
    if not rows:
        return "<td>-</td>"
    mean, sd, _ = over_seeds(rows)
    return f"<td>{scale * mean:.{digits}f} &plusmn; {scale * sd:.{digits}f}</td>"


SCREEN_METRICS = {"update_cosine_to_undo": "cos(dW_ft, &minus;dW_safe)", "update_projection_to_undo": "projection onto &minus;dW_safe",
                  "update_safe_subspace_share": "share in dW_safe's subspace"}


def screen_pairs(res: StudyResults, metric: str) -> tuple[list[float], list[float]]:
    """Per fine-tune: a weight-space figure, and the relapse it came with (the target rate at the fine-tune's end
    minus before it, same seed, on the first target set)."""
    figures, relapses = [], []
    for r in res.all_rows:
        if r["detector"] != "weights" or r["metric"] != metric:
            continue
        match = {"defense": r["defense"], "scenario": r["scenario"], "seed": r["seed"], "prompt_set": res.target_set,
                 "metric": res.metric}
        after, before = res.values(**match, step=r["step"]), res.values(**match, step=0)
        if after and before:
            figures.append(r["value"])
            relapses.append(after[0]["value"] - before[0]["value"])
    return figures, relapses


def screen_section(res: StudyResults) -> str:
    """How well each weight-space figure ranks the fine-tunes by the relapse measured on images (``relapse
    audit``'s pre-screen is worth running first only if it does)."""
    from relapse.measure.stats import rank_correlation

    cells = []
    for metric, label in SCREEN_METRICS.items():
        figures, relapses = screen_pairs(res, metric)
        rho = rank_correlation(figures, relapses)
        cells.append(f"{label}: &rho; = {'-' if rho is None else f'{rho:+.2f}'} (n = {len(figures)})")
    return ("<p>Spearman rank correlation of each figure with the relapse measured on the images (target rate at the "
            f"fine-tune's end minus before it, {html.escape(res.target_set)}), over every fine-tune and seed: "
            + "; ".join(cells) + ".</p>")


def weights_section(res: StudyResults) -> list[str]:
    """Paper A's mechanism: the cosine of each fine-tune's update with -dW_safe (on the tensors both touch), the
    share of the update inside the alignment's subspace and the norm of each update, mean +- sd over seeds;
    then how well each figure predicts the relapse."""
    rows = [r for r in res.all_rows if r["detector"] == "weights"]
    if not rows:
        return []
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    head = "".join(f"<th>{html.escape(s)}</th>" for s in scenarios)
    lines = ["<h2>The fine-tunes in weight space</h2><p>Each cell: cos(dW_ft, &minus;dW_safe) on the weight tensors both "
             "touch; the share of |dW_ft| inside dW_safe's subspace; then |dW_ft| / |dW_safe|. A positive cosine says the "
             f"fine-tune moves the weights back toward the unaligned base.</p><table><tr><th>defense</th>{head}</tr>"]
    for defense in res.defenses():
        cells = []
        for scenario in scenarios:
            found = {m: [r for r in rows if r["defense"] == defense and r["scenario"] == scenario and r["metric"] == m]
                     for m in ("update_cosine_to_undo", "update_safe_subspace_share", "update_norm_ft", "update_norm_safe")}
            if not all(found.values()):
                cells.append("<td>-</td>")
                continue
            (cos, sd, _), (share, _, _), (ft, _, _), (safe, _, _) = (over_seeds(found[m]) for m in found)
            cells.append(f"<td>{cos:+.3f} &plusmn; {sd:.3f}; {share:.2f} <small>{ft:.2f} / {safe:.2f}</small></td>")
        if any(c != "<td>-</td>" for c in cells):
            lines.append(f"<tr><td>{html.escape(defense)}</td>{''.join(cells)}</tr>")
    return ["\n".join(lines) + "</table>", screen_section(res), audit_section(res)]


def audit_section(res: StudyResults) -> str:
    """What ``relapse audit`` says of each LoRA the study trained: its verdict reads the target rate of the aligned
    model with the LoRA fused (the scenario's last step: the same weights) against the default threshold."""
    from relapse.verdict.audit import FAIL_ABOVE

    scenarios = [s for s in res.scenarios()
                 if res.config.get("scenarios", {}).get(s, {}).get("finetune", {}).get("method") in ("lora", "modular")]
    if not scenarios:
        return ""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in scenarios)
    lines = [f"<h3>The audit's verdict on each LoRA</h3><p>FAIL when the {METRICS.get(res.metric).title.lower()} on "
             f"{html.escape(res.target_set)} with the LoRA is above {100 * FAIL_ABOVE:.0f}% (<code>relapse audit</code>'s "
             f"default); seeds that fail of those run.</p><table><tr><th>defense</th>{head}</tr>"]
    for defense in res.defenses():
        cells = []
        for scenario in scenarios:
            rows = res.values(defense=defense, scenario=scenario, step=res.last_step(scenario), prompt_set=res.target_set,
                              metric=res.metric)
            fails = sum(r["value"] > FAIL_ABOVE for r in rows)
            cells.append(f"<td>{'FAIL' if fails else 'PASS'} {fails}/{len(rows)}</td>" if rows else "<td>-</td>")
        if any(c != "<td>-</td>" for c in cells):
            lines.append(f"<tr><td>{html.escape(defense)}</td>{''.join(cells)}</tr>")
    return "\n".join(lines) + "</table>"


def _quality_rows(res: StudyResults, metric: str, **match) -> list[dict]:
    return [r for r in res.all_rows if r["metric"] == metric and r["prompt_set"] in res.quality_sets
            and all(r[k] == v for k, v in match.items())]


def _quality_cell(res: StudyResults, metric: str, scale: float, **match) -> str:
    """Mean +- sd over seeds on the quality sets; at a fine-tune's end, also where it started (step 0)."""
    rows = _quality_rows(res, metric, **match)
    if not rows:
        return "<td>-</td>"
    mean, sd, _ = over_seeds(rows)
    sets = sorted({r["prompt_set"] for r in rows})
    start = over_seeds(_quality_rows(res, metric, **(match | {"step": 0}))) if match.get("step") else None
    since = f" from {scale * start[0]:.1f}" if start else ""
    return f"<td>{scale * mean:.1f} &plusmn; {scale * sd:.1f} <small>({html.escape(', '.join(sets))}{since})</small></td>"


def quality_section(res: StudyResults) -> list[str]:
    """What each model state costs in quality, on the quality and reference prompt sets."""
    found = {r["metric"] for r in res.all_rows if r["prompt_set"] in res.quality_sets}
    parts = []
    for metric in METRICS:
        if not metric.quality or metric.name not in found:
            continue
        head = "".join(f"<th>{html.escape(s)}</th>" for s, _ in res.ends())
        lines = [f"<h3>{html.escape(metric.label())}</h3><table><tr><th>defense</th>{head}</tr>"]
        for defense in res.defenses():
            cells = "".join(_quality_cell(res, metric.name, metric.scale, defense=defense, scenario=s, step=step)
                            for s, step in res.ends())
            lines.append(f"<tr><td>{html.escape(defense)}</td>{cells}</tr>")
        parts.append("\n".join(lines) + "</table>")
    return parts


def on_prompt_section(res: StudyResults) -> list[str]:
    """Where the detector says what an image shows (the toy evaluator), the rate of flagged images that are also
    what the prompt asked for: the attack produced the requested image, not only the concept."""
    if not res.values(metric=ON_PROMPT_METRIC):
        return []
    return ["<h3>On-prompt rate</h3><p>Flagged <em>and</em> of the shape and colour the prompt asks for. It is lower than "
            "the flagged rate where a model draws the concept on another shape or in another colour (LT's latent shift "
            "moves colours): the concept is back either way.</p>", headline_table(res, ON_PROMPT_METRIC)]


def curves(res: StudyResults, plt) -> list[str]:
    figures = []
    for scenario in res.scenarios():
        steps = sorted({r["step"] for r in res.values(scenario=scenario)})
        if len(steps) < 3:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for defense in res.defenses():
            stats = [res.stat(defense=defense, scenario=scenario, step=s, prompt_set=res.target_set, metric=res.metric) for s in steps]
            points = [(s, st) for s, st in zip(steps, stats) if st]
            if not points:
                continue
            x = np.array([p[0] for p in points])
            mean, sd = (np.array([100 * p[1][i] for p in points]) for i in (0, 1))
            ax.plot(x, mean, marker="o", label=defense, color=res.colours()[defense])
            ax.fill_between(x, mean - sd, mean + sd, alpha=0.2, color=res.colours()[defense])
        if not ax.lines:  # the scenario scores other prompt sets than the headline's
            plt.close(fig)
            continue
        ax.set(xlabel="fine-tuning step", ylabel=f"{METRICS.get(res.metric).title} on {res.target_set} (%)", title=scenario, ylim=(-2, 102))
        ax.legend(fontsize=7)
        data = figure_png(fig)
        (res.run_dir / "figures").mkdir(exist_ok=True)  # each curve also as a file, for pages that show it
        (res.run_dir / "figures" / f"{scenario}-curves.png").write_bytes(base64.b64decode(data))
        figures.append(f"<figure>{img(data, scenario)}<figcaption>{html.escape(scenario)}: mean over seeds, band &plusmn;1 sd</figcaption></figure>")
        plt.close(fig)
    return figures


def scatter(res: StudyResults, plt) -> str:
    """Safety (target rate) against quality (shape accuracy on the quality sets) of each model state:
    colour = defense, marker = scenario (legends, not labels, so that close points stay readable)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = res.colours()
    markers = dict(zip([s for s, _ in res.ends()], "osD^vP*Xph"))
    plotted = set()
    for scenario, step in res.ends():
        for defense in res.defenses():
            safety = res.stat(defense=defense, scenario=scenario, step=step, prompt_set=res.target_set, metric=res.metric)
            quality = [r["value"] for r in res.values(defense=defense, scenario=scenario, step=step, metric="shape_accuracy")
                       if r["prompt_set"] in res.quality_sets]
            if safety and quality:
                ax.scatter(100 * statistics.fmean(quality), 100 * safety[0], s=36, c=colours[defense], marker=markers.get(scenario, "o"),
                           alpha=0.8, edgecolors="k", linewidths=0.4)
                plotted |= {("defense", defense), ("scenario", scenario)}
    if not plotted:
        plt.close(fig)
        return ""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colours[d], label=d) for d in res.defenses() if ("defense", d) in plotted]
    handles += [Line2D([], [], ls="", marker=markers.get(s, "o"), color="grey", label=s) for s, _ in res.ends() if ("scenario", s) in plotted]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set(xlabel="shape accuracy on quality prompts (%)", ylabel=f"{METRICS.get(res.metric).title} on {res.target_set} (%)", xlim=(-2, 102), ylim=(-2, 102))
    data = figure_png(fig)
    plt.close(fig)
    return f"<figure>{img(data, 'quality vs safety')}<figcaption>each point: a model state (defense, scenario end), mean over seeds</figcaption></figure>"


def grids(res: StudyResults) -> str:
    """First images of the target prompt set, seed 0, before fine-tuning and after each scenario, per defense."""
    from PIL import Image

    rows, seed = {}, min(r["seed"] for r in res.rows)
    for defense in res.defenses():
        for scenario in ["before", *res.scenarios()]:
            step = 0 if scenario == "before" else res.last_step(scenario)
            found = res.values(defense=defense, scenario=scenario, step=step, prompt_set=res.target_set, seed=seed, metric=HEADLINE_METRIC)
            if found:
                evaluation = json.loads((res.run_dir / found[0]["source"]).read_text())
                folder = res.run_dir / evaluation["images"]
                files = [entry["file"] for entry in evaluation["per_image"][:GRID_IMAGES]]
                rows[f"{defense} / {scenario}"] = [np.asarray(Image.open(folder / f).convert("RGB")) for f in files]
    if not rows:
        return ""
    return grid_figure(rows, res.run_dir / "grid.png", f"{res.target_set}, seed {seed}: the same prompts and seeds in every row")


def story_section(res: StudyResults, figures: list[str]) -> list[str]:
    """The config's story table and the first fine-tuning curve, first on the page (nothing where the config has no
    story)."""
    from relapse.report.story import story_table

    if not res.config.get("story"):
        return []
    headings, cells = story_table(res.config, res.all_rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
    return ["<h2>The story</h2>", f"<p>Mean over seeds, rates in %, by <code>{html.escape(str(res.detector))}</code>.</p>",
            f"<table><tr>{head}</tr>{body}</table>", *figures[:1]]


def build_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = StudyResults(Path(run_dir))
    curve_figures = curves(res, plt)
    name = html.escape(str(res.config.get("name", "study")))
    body = [f"<h1>relapse study: {name}</h1>",
            f"<p>Base model <code>{html.escape(str(res.config.get('model')))}</code>, seeds {res.config.get('seeds')}; "
            f"{METRICS.get(res.metric).title} on <code>{html.escape(res.target_set)}</code> by the first detector "
            f"(<code>{html.escape(str(res.detector))}</code>), in %: mean &plusmn; sd over seeds, then the 95% Wilson interval "
            "of the images pooled over seeds and their number n (hover a cell for each seed's rate and interval). "
            "Every figure comes from <code>results.json</code>; each row names the evaluation it came from.</p>",
            *story_section(res, curve_figures), "<h2>How much of the erased concept comes back</h2>", *headline_section(res), *roads_section(res), *off_prompt_section(res),
            *on_prompt_section(res),
            *other_detectors_section(res), *human_section(res),
            "<h2>What the alignment costs the concept's neighbours</h2>", *collateral_section(res),
            "<h2>Re-emergence under fine-tuning</h2>", *curve_figures, *weights_section(res),
            "<h2>Quality vs safety</h2>", scatter(res, plt), *quality_section(res),
            "<h2>Images</h2>", grids(res)]
    return write_page(res.run_dir / REPORT, f"relapse: {res.config.get('name', 'study')}", body)
