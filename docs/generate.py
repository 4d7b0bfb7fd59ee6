"""Every generated table of README.md and docs/, from the committed results files, and the figures drawn from code.

    python docs/generate.py            # rewrite each table between its markers
    python docs/generate.py --check    # exit 1, naming the table, where a page differs from what its results give
    python docs/generate.py --figures  # also draw docs/evaluator-strength.png (the shipped evaluator reading the toy families)

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in a page; NAME is one of TABLES
below, which says which results file it reads and which rows and columns it shows. The test suite runs
``--check``, so a page cannot drift from its data.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/toy-study.md", "docs/toy-world.md")
DEMO = "docs/results/toy-study/results.csv"
EVALUATOR_BUILD = "src/relapse/assets/toy/evaluator/relapse_build.json"


@cache
def rows_of(results: str) -> tuple[dict, ...]:
    with open(ROOT / results, newline="") as handle:
        return tuple({**r, "value": float(r["value"]), "n": int(r["n"])} for r in csv.DictReader(handle))


def matching(results: str, **match) -> list[dict]:
    return [r for r in rows_of(results) if all(r[k] == str(v) for k, v in match.items())]


def mean_sd(rows: list[dict], scale: float = 100.0) -> str:
    """Mean +- sd over seeds (rates in %); the sd left out where the seeds agree."""
    values = [scale * r["value"] for r in rows]
    mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f}" if sd < 0.05 else f"{mean:.1f} ± {sd:.1f}"


def interval(row: dict) -> str:
    return f"{100 * row['value']:.1f} [{100 * float(row['ci95_low']):.0f}, {100 * float(row['ci95_high']):.0f}]"


DISTANCES = ("frechet_distance", "cmmd")  # shown as they are, not in %


@dataclass(frozen=True)
class Column:
    title: str
    match: dict  # scenario, step, prompt_set the column reads
    metric: str = "target_rate"


@dataclass(frozen=True)
class RateTable:
    """Defenses as rows, model states as columns; each cell the concept rate over seeds, its trace rate in brackets."""

    results: str
    rows: tuple[tuple[str, str], ...]  # (shown name, defense)
    columns: tuple[Column, ...]
    detector: str = "toy"
    second: str = "trace_rate"  # the figure in brackets ("" for none)

    def cell(self, defense: str, column: Column) -> str:
        match = {"defense": defense, "detector": self.detector, "metric": column.metric} | column.match
        found = matching(self.results, **match)
        if not found:
            return ""
        text = mean_sd(found, 1.0 if column.metric in DISTANCES else 100.0)
        if self.second and column.metric == "target_rate":
            text += f" [{mean_sd(matching(self.results, **(match | {'metric': self.second})))}]"
        return text

    def markdown(self) -> list[str]:
        lines = ["| defense | " + " | ".join(c.title for c in self.columns) + " |", "|" + " --- |" * (len(self.columns) + 1)]
        for shown, defense in self.rows:
            cells = [self.cell(defense, c) for c in self.columns]
            if any(cells):  # a defense the table's scenarios never ran is left out
                lines.append(f"| {shown} | " + " | ".join(cells) + " |")
        return lines


@dataclass(frozen=True)
class HumanTable:
    """Each cell people labelled (seed ``seed``): their concept and trace rates beside the detector's on the same images
    (every image of the cell was labelled), with 95% Wilson intervals; ≠ where two intervals lie apart."""

    results: str
    cells: tuple[tuple[str, dict], ...]  # (shown name, match)
    seed: int = 0
    detector: str = "toy"

    def markdown(self) -> list[str]:
        lines = ["| cell (seed 0) | n | people: concept | evaluator: concept | people: trace | evaluator: trace |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for shown, match in self.cells:
            figures = []
            for metric in ("target_rate", "trace_rate"):
                people, = matching(self.results, detector="human", metric=metric, seed=self.seed, **match)
                machine, = matching(self.results, detector=self.detector, metric=metric, seed=self.seed, **match)
                apart = float(people["ci95_high"]) < float(machine["ci95_low"]) or float(machine["ci95_high"]) < float(people["ci95_low"])
                figures += [interval(people), interval(machine) + (" ≠" if apart else "")]
            lines.append(f"| {shown} | {people['n']} | " + " | ".join(figures) + " |")
        return lines


@dataclass(frozen=True)
class EvaluatorTable:
    """The evaluator's held-out report per family: share at the concept and trace thresholds, strength read, and for
    a degraded family the rank correlation of the strength read with the strength drawn."""

    record: str
    roles: tuple[str, ...]

    def markdown(self) -> list[str]:
        report = json.loads((ROOT / self.record).read_text())["heldout"]
        lines = ["| family | n | concept | trace | mean strength | rank correlation |", "| --- | --- | --- | --- | --- | --- |"]
        for name, f in report["families"].items():
            if f["role"] in self.roles:
                rho = f.get("rank_correlation")
                lines.append(f"| {name.replace('_', ' ')} | {f['n']} | {100 * f['concept']:.1f} | {100 * f['trace']:.1f} | "
                             f"{f['strength_mean']:.2f} | {'' if rho is None else f'{rho:+.2f}'} |")
        return lines


DEFENSES = (("none (the base)", "none"), ("ESD-u", "esd"), ("SDD", "sdd"), ("LT", "lt"), ("NG", "ng"), ("ESD-u + LT", "esd+lt"),
            ("Resist", "resist"))


def _col(title: str, scenario: str, step: int, prompt_set: str = "target_direct", metric: str = "target_rate") -> Column:
    return Column(title, {"scenario": scenario, "step": step, "prompt_set": prompt_set}, metric)


TABLES: dict[str, Callable[[], object]] = {
    "demo-headline": lambda: RateTable(DEMO, DEFENSES, (
        _col("before", "before", 0), _col("benign adjacent LoRA", "adjacent-lora", 200),
        _col("malicious LoRA, 200 steps", "malicious", 200), _col("malicious full, 200", "malicious-full", 200),
        _col("malicious LoRA, 500", "malicious-500", 500), _col("malicious, Modular LoRA", "malicious-modular", 200),
        _col("adversarial prompts", "before", 0, "adversarial_direct"), _col("a learned word, 200 steps", "textual-inversion", 200))),
    "demo-off-prompt": lambda: RateTable(DEMO, DEFENSES, (
        _col("before", "before", 0, "clean"), _col("after the malicious LoRA", "malicious", 200, "clean"),
        _col("after the malicious full fine-tune", "malicious-full", 200, "clean"),
        _col("after the LoRA, 500 steps", "malicious-500", 500, "clean"))),
    "demo-malicious-steps": lambda: RateTable(DEMO, DEFENSES[1:], tuple(
        _col(f"{step} steps" if step else "before", "malicious", step) for step in (0, 20, 100, 200))),
    "demo-full-steps": lambda: RateTable(DEMO, (("LT", "lt"), ("Resist", "resist")), tuple(
        _col(f"{step} steps" if step else "before", "malicious-full", step) for step in (0, 20, 100, 200))),
    "demo-unsimulated": lambda: RateTable(DEMO, (("Resist", "resist"),), (
        _col("LoRA, 200 steps", "malicious", 200), _col("LoRA at lr 9e-3", "malicious-lr3x", 200),
        _col("LoRA of rank 32", "malicious-rank32", 200), _col("LoRA, 500 steps", "malicious-500", 500))),
    "demo-roads": lambda: RateTable(DEMO, DEFENSES, (
        _col("adversarial prompts, before", "before", 0, "adversarial_direct"),
        _col("after the benign LoRA", "adjacent-lora", 200, "adversarial_direct"),
        *(_col(f"learned word, {step} steps", "textual-inversion", step) for step in (50, 100, 200)))),
    "demo-quality": lambda: RateTable(DEMO, DEFENSES, (
        _col("shape", "before", 0, "clean", "shape_accuracy"), _col("colour", "before", 0, "clean", "color_accuracy"),
        _col("Frechet distance", "before", 0, "clean", "frechet_distance"),
        _col("FD after the malicious LoRA", "malicious", 200, "clean", "frechet_distance"),
        _col("FD after the malicious full fine-tune", "malicious-full", 200, "clean", "frechet_distance"))),
    "demo-neighbours": lambda: RateTable(DEMO, DEFENSES, tuple(
        _col(fill, "before", 0, f"fill_{fill}", "fill_accuracy") for fill in ("striped", "dotted", "gridded", "gradient"))
        + (_col("clean (plain)", "before", 0, "clean", "fill_accuracy"),)),
    "demo-human": lambda: HumanTable(DEMO, (
        ("unaligned base, direct prompts", {"defense": "none", "scenario": "before", "step": 0, "prompt_set": "target_direct"}),
        *((f"{shown}, malicious LoRA 200", {"defense": d, "scenario": "malicious", "step": 200, "prompt_set": "target_direct"})
          for shown, d in (("ESD-u", "esd"), ("LT", "lt"), ("ESD-u + LT", "esd+lt"), ("Resist", "resist"))),
        *((f"{shown}, malicious full 200, {prompts}", {"defense": d, "scenario": "malicious-full", "step": 200, "prompt_set": ps})
          for shown, d in (("LT", "lt"), ("Resist", "resist")) for prompts, ps in (("direct", "target_direct"), ("clean", "clean"))),
        *((f"{shown}, learned word 200", {"defense": d, "scenario": "textual-inversion", "step": 200, "prompt_set": "target_direct"})
          for shown, d in DEFENSES if d not in ("none", "ng")),
        *((f"{shown}, adversarial prompts", {"defense": d, "scenario": "before", "step": 0, "prompt_set": "adversarial_direct"})
          for shown, d in DEFENSES))),
    "evaluator-positives": lambda: EvaluatorTable(EVALUATOR_BUILD, ("clear", "degraded", "reported")),
    "evaluator-negatives": lambda: EvaluatorTable(EVALUATOR_BUILD, ("negative",)),
}


@dataclass
class Page:
    path: Path
    text: str = field(init=False)

    def __post_init__(self):
        self.text = self.path.read_text()

    def regenerate(self) -> tuple[str, list[str]]:
        """The page with every table written anew, and the names of the tables that changed."""
        changed = []

        def fill(found: re.Match) -> str:
            name = found.group(1)
            if name not in TABLES:
                raise SystemExit(f"{self.path.relative_to(ROOT)}: no table named {name!r}; known: {', '.join(TABLES)}")
            body = "\n".join(TABLES[name]().markdown())
            if found.group(2).strip() != body:
                changed.append(name)
            return f"<!-- table:{name} -->\n{body}\n<!-- /table:{name} -->"

        text = re.sub(r"<!-- table:([\w-]+) -->\n(.*?)<!-- /table:\1 -->", fill, self.text, flags=re.DOTALL)
        return text, changed


STRENGTH_BANDS = ((0.0, 0.0, "0: none"), (0.2, 0.35, "0.2-0.35: a trace"), (0.35, 0.5, "0.35-0.5: degraded"),
                  (0.5, 0.75, "0.5-0.75: degraded, still clear"), (0.75, 1.0, "0.75-1: clear"))


def strength_strip(out: Path, per_band: int = 12, seed: int = 30_000) -> None:
    """A row of images per strength band, drawn from the toy families with seeds no build uses, each with the strength
    it was drawn at and (below it) the shipped evaluator's reading."""
    import numpy as np
    from PIL import Image, ImageDraw

    from relapse.data.toy_families import RENDERED
    from relapse.measure.detectors.toy import default_evaluator_dir
    from relapse.measure.toy_evaluator import ToyEvaluator

    rng = np.random.default_rng(seed)
    pool = [RENDERED[name].draw(rng, 40) for name in RENDERED if RENDERED[name].role in ("clear", "degraded", "negative")]
    images = np.concatenate([b.images for b in pool])
    drawn = np.concatenate([b.strength for b in pool])
    read = ToyEvaluator.load(default_evaluator_dir()).predict(images)["target_score"]
    zoom, label_w = 3, 190
    sheet = Image.new("RGB", (label_w + per_band * (32 * zoom + 4), len(STRENGTH_BANDS) * (32 * zoom + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (low, high, title) in enumerate(STRENGTH_BANDS):
        y = row * (32 * zoom + 30)
        draw.text((4, y + 40), title, fill=(0, 0, 0))
        chosen = np.flatnonzero((drawn >= low) & (drawn <= high))
        for k, i in enumerate(rng.choice(chosen, size=per_band, replace=False)):
            x = label_w + k * (32 * zoom + 4)
            sheet.paste(Image.fromarray(images[i]).resize((32 * zoom, 32 * zoom), Image.NEAREST), (x, y))
            draw.text((x, y + 32 * zoom + 2), f"drawn {drawn[i]:.2f}", fill=(0, 0, 0))
            draw.text((x, y + 32 * zoom + 14), f"read {read[i]:.2f}", fill=(0, 0, 160))
    sheet.save(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page differs from its data")
    parser.add_argument("--figures", action="store_true", help="also draw the figures made from code")
    args = parser.parse_args()
    if args.figures:
        strength_strip(ROOT / "docs" / "evaluator-strength.png")
    stale = []
    for name in PAGES:
        page = Page(ROOT / name)
        text, changed = page.regenerate()
        stale += [f"{name}: {table}" for table in changed]
        if changed and not args.check:
            page.path.write_text(text)
    if stale:
        print(("out of date: " if args.check else "rewrote: ") + "; ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
