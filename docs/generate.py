"""Every generated table of README.md and docs/, from the committed results files, and the figures drawn from code.

    python docs/generate.py            # rewrite each table between its markers
    python docs/generate.py --check    # exit 1, naming the table, where a page differs from what its results give
    python docs/generate.py --figures  # also draw the figures made from code and results: docs/evaluator-strength.png (the
                                       # shipped evaluator reading the toy families), docs/every-method-*.png
    python docs/generate.py --grid runs/benign-relapse  # also draw docs/benign-relapse-grid.png from that run's images
    python docs/generate.py --grid-hypotheses runs/benign-relapse-hypotheses  # and the second part's

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
PAGES = ("README.md", "docs/toy-study.md", "docs/toy-world.md", "docs/benign-relapse.md", "docs/methods.md", "docs/every-method.md")
DEMO = "docs/results/toy-study/results.csv"
BENIGN = "docs/results/benign-relapse/results.csv"
# the same config's second part (relapse study configs/benign-relapse.yaml --scenario ...: its run.json names them), with
# the main run's rows: the alignments both share must give the same rows (rows_of checks it)
BENIGN_ALL = (BENIGN, "docs/results/benign-relapse-hypotheses/results.csv")
EVERY_METHOD_BEFORE = "docs/results/every-method-before/results.csv"
EVERY_METHOD_MALICIOUS = "docs/results/every-method-malicious/results.csv"
# every part of configs/every-method.yaml (the before and malicious parts, the other roads back, SLD's defenses, MACE's
# and AdvUnlearn's), and the benign-relapse study's never-learned model under the same malicious LoRA
EVERY_METHOD_SLD = "docs/results/every-method-sld/results.csv"
EVERY_METHOD_NEW = "docs/results/every-method-mace-advunlearn/results.csv"
EVERY_METHOD = (EVERY_METHOD_BEFORE, EVERY_METHOD_MALICIOUS, "docs/results/every-method-roads/results.csv", EVERY_METHOD_SLD,
                EVERY_METHOD_NEW)
EVALUATOR_BUILD = "src/relapse/assets/toy/evaluator/relapse_build.json"


LABELS = ("defense", "scenario", "step", "seed", "prompt_set", "detector", "metric")


@cache
def rows_of(results: str | tuple[str, ...]) -> tuple[dict, ...]:
    """The rows of a results file, or of several runs of one config, each row once: a row two runs share (the same
    aligned model scored the same way) must have one value in both, else the runs disagree and no table is drawn."""
    if isinstance(results, str):
        with open(ROOT / results, newline="") as handle:
            return tuple({**r, "value": float(r["value"]), "n": int(r["n"])} for r in csv.DictReader(handle))
    kept: list[dict] = []
    for part in results:
        earlier = {tuple(r[k] for k in LABELS): r["value"] for r in kept}
        for row in rows_of(part):
            label = tuple(row[k] for k in LABELS)
            if label not in earlier:
                kept.append(row)
            elif earlier[label] != row["value"]:
                raise SystemExit(f"{part} disagrees with an earlier run on {dict(zip(LABELS, label))}: "
                                 f"{earlier[label]} against {row['value']}")
    return tuple(kept)


def matching(results: str | tuple[str, ...], **match) -> list[dict]:
    """Rows equal to ``match`` on each key (a tuple: any of its values)."""
    wanted = {k: tuple(map(str, v)) if isinstance(v, tuple) else (str(v),) for k, v in match.items()}
    return [r for r in rows_of(results) if all(r[k] in values for k, values in wanted.items())]


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

    results: str | tuple[str, ...]
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
    """Each cell people labelled (seed ``seed``): their concept and trace rates (on the images they labelled, all of the
    cell's or a sample) beside the detector's on the whole cell, with 95% Wilson intervals; ≠ where two intervals lie
    apart."""

    results: str | tuple[str, ...]
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


def runs(results: str | tuple[str, ...], defense: str | None = None, **match) -> list[dict]:
    """The rows of one figure, one per run; a defense written ``NAME@*`` pools every alignment of it (NAME@0, NAME@1, ...)."""
    found = matching(results, **match)
    if defense is None:
        return found
    if defense.endswith("@*"):
        return [r for r in found if r["defense"].startswith(defense[:-1])]
    return [r for r in found if r["defense"] == defense]


def over_runs(rows: list[dict], scale: float = 100.0, digits: int = 1) -> str:
    """Mean over runs with its Student-t 95% interval (rates in %, clipped to what a rate can be)."""
    from relapse.measure.stats import seed_interval

    found = seed_interval([r["value"] for r in rows])
    low, high = (scale * x for x in found["ci95"])
    if scale == 100.0:
        low, high = max(low, 0.0), min(high, 100.0)
    mean = f"{scale * found['mean']:.{digits}f}"
    return mean if found["n"] < 2 or high - low < 0.05 else f"{mean} [{low:.{digits}f}, {high:.{digits}f}]"


@dataclass(frozen=True)
class Figure:
    title: str
    match: dict
    scale: float = 100.0  # 100: a rate shown in %; 1: a value as it is
    digits: int = 1


@dataclass(frozen=True)
class RunsTable:
    """Rows and columns that each add to a match; each cell the mean over its runs with a 95% interval over them."""

    results: str | tuple[str, ...]
    corner: str
    rows: tuple[tuple[str, dict], ...]
    columns: tuple[Figure, ...]

    def markdown(self) -> list[str]:
        lines = [f"| {self.corner} | " + " | ".join(c.title for c in self.columns) + " |", "|" + " --- |" * (len(self.columns) + 1)]
        for shown, match in self.rows:
            cells = []
            for column in self.columns:
                found = runs(self.results, **(match | column.match))
                cells.append(over_runs(found, column.scale, column.digits) if found else "")
            if any(cells):
                lines.append(f"| {shown} | " + " | ".join(cells) + " |")
        return lines


@dataclass(frozen=True)
class CellsTable:
    """Each row names its own cell under each column (a sequence of fine-tunes, defenses whose scenarios differ);
    each cell the mean over its runs with a 95% interval over them, empty where the row has none."""

    results: str | tuple[str, ...]
    corner: str
    titles: tuple[str, ...]
    rows: tuple[tuple[str, tuple[dict | None, ...]], ...]
    figure: dict = field(default_factory=lambda: DIRECT)
    scales: tuple[float, ...] = ()  # per column: 100 (a rate in %, the default) or 1 (a value as it is)

    def markdown(self) -> list[str]:
        lines = [f"| {self.corner} | " + " | ".join(self.titles) + " |", "|" + " --- |" * (len(self.titles) + 1)]
        scales = self.scales or (100.0,) * len(self.titles)
        for shown, matches in self.rows:
            cells = [over_runs(found, scale) if match is not None and (found := runs(self.results, **(self.figure | match))) else ""
                     for match, scale in zip(matches, scales)]
            if any(cells):
                lines.append(f"| {shown} | " + " | ".join(cells) + " |")
        return lines


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    found = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            found[k] = (i + j) / 2 + 1
        i = j + 1
    return found


def spearman(x: list[float], y: list[float]) -> float:
    return statistics.correlation(ranks(x), ranks(y))


@dataclass(frozen=True)
class RankTable:
    """How well closeness orders relapse: over the domains, the Spearman correlation of each domain's rise in the concept
    rate (after ``step`` fine-tune steps, minus before; mean over runs) with its closeness to the concept (the negated
    distance of its data to the concept's images, by each measure)."""

    results: str | tuple[str, ...]
    domains: tuple[str, ...]  # scenarios
    defense: str
    step: int
    measures: tuple[tuple[str, str], ...] = (("Frechet distance", "data_frechet_to_concept"), ("CMMD", "data_cmmd_to_concept"))

    def markdown(self) -> list[str]:
        def mean(**match) -> float:
            return statistics.fmean(r["value"] for r in runs(self.results, self.defense if "defense" not in match else None, **match))

        rises = [mean(**DIRECT, scenario=d, step=self.step) - mean(**DIRECT, scenario=d, step=0) for d in self.domains]
        lines = ["| closeness by | Spearman correlation with the rise | domains |", "| --- | --- | --- |"]
        for title, metric in self.measures:
            closeness = [-statistics.fmean(r["value"] for r in runs(self.results, metric=metric, scenario=d)) for d in self.domains]
            lines.append(f"| {title} | {spearman(closeness, rises):+.2f} | {len(self.domains)} |")
        return lines


@dataclass(frozen=True)
class RelearningTable:
    """Relearning speed: the step at which each run's concept rate first reaches ``level`` on its sweep (linear between
    the two points around it); the median and range over the runs that reach it, and how many do."""

    results: str | tuple[str, ...]
    scenario: str | tuple[str, ...]  # a tuple: whichever of them a model ran
    models: tuple[tuple[str, str], ...]  # (shown name, defense)
    level: float = 0.5
    at: tuple[int, ...] = (20, 60, 100, 400)

    def markdown(self) -> list[str]:
        from relapse.study.results import steps_to_reach

        lines = [f"| model | steps to {100 * self.level:.0f}%: median [range] | runs that reach it | "
                 + " | ".join(f"concept at {s} steps" for s in self.at) + " |", "|" + " --- |" * (3 + len(self.at))]
        for shown, defense in self.models:
            mine = runs(self.results, defense, scenario=self.scenario, prompt_set="target_direct", detector="toy")
            crossings = steps_to_reach(mine, self.level)
            if not crossings:  # a model the study did not attack
                continue
            reached = sorted(c["step"] for c in crossings if c["step"] is not None)
            median = f"{statistics.median(reached):.0f} [{reached[0]:.0f}, {reached[-1]:.0f}]" if reached else \
                f"not by {crossings[0]['last']}"
            at = [[r for r in mine if r["metric"] == "target_rate" and int(r["step"]) == s] for s in self.at]
            at = [over_runs(found) if found else "" for found in at]
            lines.append(f"| {shown} | {median} | {len(reached)} of {len(crossings)} | " + " | ".join(at) + " |")
        return lines


LEVELS = ((0.10, "🟩"), (0.50, "🟨"), (float("inf"), "🟥"))  # a cell's mark: under 10%, under 50%, 50% or more


@dataclass(frozen=True)
class RoadsTable:
    """Methods as rows, roads back as columns; each cell the mean concept rate over the runs (%), marked by its level
    (LEVELS). ``instead`` gives a method's own cell where a column's match does not find it: (defense, title) -> match."""

    results: str | tuple[str, ...]
    rows: tuple[tuple[str, str], ...]  # (shown name, defense)
    columns: tuple[Figure, ...]
    instead: dict = field(default_factory=dict)

    def value(self, defense: str, column: Figure) -> float | None:
        match = self.instead.get((defense, column.title), column.match)
        found = runs(self.results, defense, **(DIRECT | match))
        return statistics.fmean(r["value"] for r in found) if found else None

    def values(self) -> list[tuple[str, list[float | None]]]:
        found = [(shown, [self.value(defense, c) for c in self.columns]) for shown, defense in self.rows]
        return [(shown, cells) for shown, cells in found if any(v is not None for v in cells)]

    def markdown(self) -> list[str]:
        lines = ["| method | " + " | ".join(c.title for c in self.columns) + " |", "|" + " --- |" * (len(self.columns) + 1)]
        for shown, cells in self.values():
            marked = ["" if v is None else next(mark for bound, mark in LEVELS if v < bound) + f" {100 * v:.0f}" for v in cells]
            lines.append(f"| {shown} | " + " | ".join(marked) + " |")
        return lines


@dataclass(frozen=True)
class AlignTimes:
    """Each method's alignment time on the toy model and its ratio to ESD-u's in the same run
    (benchmarks/align_methods.py): the same machine and load, so the ratio carries to another machine where the seconds
    do not."""

    record: str
    rows: tuple[tuple[str, str], ...]  # (shown name, defense)

    def markdown(self) -> list[str]:
        found = {r["defense"]: r for r in json.loads((ROOT / self.record).read_text())["rows"]}
        lines = ["| method | alignment, s | ratio to ESD-u |", "| --- | --- | --- |"]
        return lines + [f"| {shown} | {found[d]['seconds']:.1f} | {found[d]['ratio_to_esd']:.2g} |"
                        for shown, d in self.rows if d in found]


@dataclass(frozen=True)
class StoryTable:
    """A study's story table (its config's ``story``), as `relapse study` prints it last and its report shows it first,
    from the committed results folder (its config.yaml and results.csv)."""

    folder: str
    names: dict = field(default_factory=dict)  # defense -> the name shown

    def markdown(self) -> list[str]:
        import yaml

        from relapse.report.story import story_table

        config = yaml.safe_load((ROOT / self.folder / "config.yaml").read_text())  # as the run saved it
        rows = [r | {"step": int(r["step"])} for r in rows_of(f"{self.folder}/results.csv")]
        headings, cells = story_table(config, rows)
        lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
        return lines + ["| " + " | ".join([self.names.get(line[0], line[0]), *line[1:]]) + " |" for line in cells]


DEFENSES = (("none (the base)", "none"), ("ESD-u", "esd"), ("SDD", "sdd"), ("LT", "lt"), ("NG", "ng"), ("ESD-u + LT", "esd+lt"),
            ("Resist", "resist"))


BEFORE = {"scenario": "before", "step": 0, "detector": "toy"}
DIRECT = {"prompt_set": "target_direct", "detector": "toy", "metric": "target_rate"}
FILL_SETS = ("fill_striped", "fill_dotted", "fill_gridded", "fill_gradient")
BENIGN_FINETUNES = (("adjacent LoRA, 200 steps", "adjacent-lora", 200), ("adjacent LoRA, 1000 steps", "adjacent-lora", 1000),
                    ("far LoRA, 200", "far-lora", 200), ("own-generations LoRA, 200", "own-lora", 200),
                    ("adjacent full, 200", "adjacent-full", 200), ("far full, 200", "far-full", 200),
                    ("own-generations full, 200", "own-full", 200), ("adjacent Modular LoRA, 200", "adjacent-modular", 200),
                    ("far Modular, 200", "far-modular", 200), ("own-generations Modular, 200", "own-modular", 200))


H2_TITLES = ("far: new shapes", "far: sketches", "the base's own generations", "gradient new shapes", "striped new shapes",
             "dotted new shapes", "gridded new shapes", "striped and dotted (adjacent)")
H2_DOMAINS = ("far-lora", "sketch-lora", "own-lora", "gradient-lora", "striped-lora", "dotted-lora", "gridded-lora", "adjacent-lora")


def _col(title: str, scenario: str, step: int, prompt_set: str = "target_direct", metric: str = "target_rate") -> Column:
    return Column(title, {"scenario": scenario, "step": step, "prompt_set": prompt_set}, metric)


METHODS = (("none (the base)", "none"), ("never-learned", "never-learned"), ("ESD-u", "esd"), ("ESD-u at 20%", "esd-r20"),
           ("SDD", "sdd"), ("UCE", "uce"), ("RECE", "rece"), ("CA", "ca"), ("FMN", "fmn"), ("FMN at 88%", "fmn-r88"),
           ("SalUn", "salun"), ("MACE", "mace"), ("AdvUnlearn", "advunlearn"), ("SLD-Medium", "sld-medium"), ("SLD-Max", "sld-max"))
EVERY_METHOD_ROADS = RoadsTable((*EVERY_METHOD, BENIGN), METHODS, (
    Figure("before", BEFORE), Figure("adversarial prompts", BEFORE | {"prompt_set": "adversarial_direct"}),
    Figure("benign LoRA", {"scenario": "benign-lora", "step": 200}),
    Figure("benign, Modular", {"scenario": "benign-modular", "step": 200}),
    *(Figure(f"malicious LoRA {n}", {"scenario": "malicious", "step": n}) for n in (20, 100, 200)),
    Figure("malicious full", {"scenario": "malicious-full", "step": 200}),
    Figure("malicious, Modular", {"scenario": "malicious-modular", "step": 200}),
    Figure("learned word", {"scenario": "textual-inversion", "step": 200})),
    instead={("never-learned", "before"): {"scenario": "benign-lora", "step": 0}})  # never-learned had no before part

EVERY_METHOD_LABELLED = (("benign LoRA 200", "benign-lora", 200), ("benign, Modular 200", "benign-modular", 200),
                         ("malicious LoRA 400", "malicious", 400), ("malicious full 200", "malicious-full", 200),
                         ("malicious, Modular 200", "malicious-modular", 200), ("learned word 200", "textual-inversion", 200))

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
    "benign-alignments": lambda: RunsTable(BENIGN, "model", (
        ("ESD-u, stopped at 20%", {"defense": "esd@*"}), ("SDD, stopped at 20%", {"defense": "sdd@*"}),
        ("ESD-u, stopped at 40%", {"defense": "esd-r40"}), ("ESD-u, stopped at 5%", {"defense": "esd-r05"}),
        ("ESD-u, 100 steps (the demo's)", {"defense": "esd-complete"}), ("never-learned", {"defense": "never-learned"}),
        ("the unaligned base", {"defense": "none"})), (
        Figure("steps trained", {"scenario": "align", "metric": "align_steps"}, 1.0, 0),
        Figure("rate at the last check (held-out prompts)", {"scenario": "align", "metric": "align_residual_rate"}),
        *(Figure(title, BEFORE | {"prompt_set": prompts, "metric": metric}, scale, digits) for title, prompts, metric, scale, digits in (
            ("concept, direct prompts", "target_direct", "target_rate", 100.0, 1), ("trace", "target_direct", "trace_rate", 100.0, 1),
            ("shape, clean prompts", "clean", "shape_accuracy", 100.0, 1), ("FD, clean", "clean", "frechet_distance", 1.0, 1))))),
    "benign-headline": lambda: RunsTable(BENIGN, "fine-tune", (
        ("none: the aligned model", {"scenario": "before", "step": 0}),
        *((title, {"scenario": scenario, "step": step}) for title, scenario, step in BENIGN_FINETUNES)), tuple(
        Figure(f"{method}: {title}", {"defense": defense} | match, scale, digits) for method, defense in (("ESD-u", "esd@*"), ("SDD", "sdd@*"))
        for title, match, scale, digits in (("concept", DIRECT, 100.0, 1), ("trace", DIRECT | {"metric": "trace_rate"}, 100.0, 1),
                                            ("cos(dW_ft, -dW_safe)", {"detector": "weights", "metric": "update_cosine_to_undo"}, 1.0, 3)))),
    "benign-curve": lambda: RunsTable(BENIGN, "adjacent LoRA on", (
        ("ESD-u at 20%", {"defense": "esd@*"}), ("SDD at 20%", {"defense": "sdd@*"}), ("never-learned", {"defense": "never-learned"})),
        tuple(Figure(f"{step} steps" if step else "before", DIRECT | {"scenario": "adjacent-lora", "step": step})
              for step in (0, 20, 100, 200, 600, 1000))),
    "benign-h1": lambda: RunsTable(BENIGN, "ESD-u stopped at", (
        ("40%", {"defense": "esd-r40", "scenario": "adjacent-lora-200"}), ("20%", {"defense": "esd@*", "scenario": "adjacent-lora"}),
        ("5%", {"defense": "esd-r05", "scenario": "adjacent-lora-200"}),
        ("0% (100 steps)", {"defense": "esd-complete", "scenario": "adjacent-lora-200"})), (
        Figure("|dW_safe|", {"detector": "weights", "metric": "update_norm_safe"}, 1.0, 2),
        Figure("concept before", DIRECT | {"step": 0}), Figure("concept after 200 steps", DIRECT | {"step": 200}),
        Figure("trace after 200 steps", DIRECT | {"step": 200, "metric": "trace_rate"}))),
    "benign-domains": lambda: RunsTable(BENIGN, "benign data", (
        ("far: new shapes", {"scenario": "far-lora"}), ("adjacent: striped and dotted new shapes", {"scenario": "adjacent-lora"}),
        ("the base's own generations", {"scenario": "own-lora"})), (
        Figure("FD to the concept's images", {"metric": "data_frechet_to_concept"}, 1.0),
        *(Figure(f"{method}: concept after 200 steps", DIRECT | {"defense": defense, "step": 200})
          for method, defense in (("ESD-u", "esd@*"), ("SDD", "sdd@*"), ("never-learned", "never-learned"))))),
    "benign-quality": lambda: RunsTable(BENIGN, "adjacent LoRA on", (
        ("ESD-u at 20%", {"defense": "esd@*", "scenario": "adjacent-lora"}),
        ("SDD at 20%", {"defense": "sdd@*", "scenario": "adjacent-lora"}),
        ("never-learned", {"defense": "never-learned", "scenario": "adjacent-lora"})), tuple(
        Figure(f"{title}, {when}", {"step": step, "prompt_set": prompts, "metric": metric, "detector": "toy"}, scale)
        for title, prompts, metric, scale in (("shape", "clean", "shape_accuracy", 100.0), ("FD", "clean", "frechet_distance", 1.0),
                                              ("neighbours as asked", FILL_SETS, "fill_accuracy", 100.0))
        for when, step in (("before", 0), ("after 1000", 1000)))),
    "never-learned": lambda: RunsTable(BENIGN, "model", (
        ("never-learned", {"defense": "never-learned"}), ("the shipped toy model", {"defense": "none"})), tuple(
        Figure(title, BEFORE | {"prompt_set": prompts, "metric": metric}, scale) for title, prompts, metric, scale in (
            ("concept, direct prompts", "target_direct", "target_rate", 100.0), ("trace", "target_direct", "trace_rate", 100.0),
            ("shape, clean", "clean", "shape_accuracy", 100.0), ("colour, clean", "clean", "color_accuracy", 100.0),
            ("neighbours as asked", FILL_SETS, "fill_accuracy", 100.0), ("FD, clean", "clean", "frechet_distance", 1.0)))),
    "benign-human": lambda: HumanTable(BENIGN, tuple(
        (f"{shown}, {title}", {"defense": defense, "scenario": scenario, "step": step, "prompt_set": "target_direct"})
        for shown, defense in (("ESD-u@0", "esd@0"), ("SDD@0", "sdd@0"), ("never-learned", "never-learned"))
        for title, scenario, step in (("aligned", "before", 0), *BENIGN_FINETUNES[:2], BENIGN_FINETUNES[2], BENIGN_FINETUNES[3],
                                      BENIGN_FINETUNES[4], BENIGN_FINETUNES[7])
        if defense != "never-learned" or scenario in ("before", "adjacent-lora", "far-lora", "own-lora"))),
    "relearning": lambda: RelearningTable(BENIGN_ALL, ("malicious", "malicious-defended"), (
        ("the unaligned base", "none"), ("never-learned", "never-learned"), ("ESD-u at 20%", "esd@*"), ("SDD at 20%", "sdd@*"),
        ("ESD-u, 100 steps (0%)", "esd-complete"), ("ESD-u at 20% + LT", "esd+lt"),
        ("Resist (asked for 20%, at 5% on its first check)", "resist"))),
    "benign-h2": lambda: RunsTable(BENIGN_ALL, "benign data (LoRA, 200 steps)", tuple(
        (title, {"scenario": scenario}) for title, scenario in zip(H2_TITLES, H2_DOMAINS)), (
        Figure("FD to the concept's images", {"metric": "data_frechet_to_concept"}, 1.0),
        Figure("CMMD to them", {"metric": "data_cmmd_to_concept"}, 1.0, 2),
        Figure("ESD-u: concept after 200", DIRECT | {"defense": "esd@*", "step": 200}),
        Figure("ESD-u: trace", DIRECT | {"defense": "esd@*", "step": 200, "metric": "trace_rate"}),
        Figure("ESD-u: concept before", DIRECT | {"defense": "esd@*", "step": 0}))),
    "benign-h3": lambda: CellsTable(BENIGN_ALL, "ESD-u at 20%, LoRA on", ("200 steps", "400", "600"), (
        ("shapes, then sketches, then patterns", ({"defense": "esd@*", "scenario": "sequence-1-shapes", "step": 200},
                                                  {"defense": "esd@*", "scenario": "sequence-2-sketch", "step": 200},
                                                  {"defense": "esd@*", "scenario": "sequence-3-patterns", "step": 200})),
        ("patterns alone", ({"defense": "esd@*", "scenario": "adjacent-lora", "step": 200}, None,
                            {"defense": "esd@*", "scenario": "adjacent-lora", "step": 600})),
        ("sketches alone", ({"defense": "esd@*", "scenario": "sketch-lora", "step": 200}, None,
                            {"defense": "esd@*", "scenario": "sketch-lora", "step": 600})),
        ("shapes alone", ({"defense": "esd@*", "scenario": "far-lora", "step": 200}, None, None)))),
    "benign-h4": lambda: RunsTable(BENIGN_ALL, "ResAlign's protocol on", (
        ("ESD-u at 20%", {"defense": "esd@*"}), ("SDD at 20%", {"defense": "sdd@*"})), (
        Figure("aligned", DIRECT | {"scenario": "before", "step": 0}),
        Figure("adjacent, 200 steps", DIRECT | {"scenario": "resalign-adjacent", "step": 200}),
        Figure("far, 200 steps", DIRECT | {"scenario": "resalign-far", "step": 200}),
        Figure("trace, adjacent", DIRECT | {"scenario": "resalign-adjacent", "step": 200, "metric": "trace_rate"}),
        Figure("cos, adjacent", {"scenario": "resalign-adjacent", "detector": "weights", "metric": "update_cosine_to_undo"}, 1.0, 3))),
    "benign-defenses": lambda: CellsTable(BENIGN_ALL, "at a 20% residual", ("aligned", "adjacent LoRA 200", "trace after", "clean FD"), tuple(
        (shown, ({"defense": d, "scenario": "before", "step": 0}, {"defense": d, "scenario": sc, "step": 200},
                 {"defense": d, "scenario": sc, "step": 200, "metric": "trace_rate"},
                 {"defense": d, "scenario": "before", "step": 0, "prompt_set": "clean", "metric": "frechet_distance"}))
        for shown, d, sc in (("ESD-u", "esd@*", "adjacent-lora"), ("ESD-u + LT", "esd+lt", "adjacent-lora-defended"),
                             ("Resist", "resist", "adjacent-lora-defended"))), scales=(100.0, 100.0, 100.0, 1.0)),
    "benign-h2-rank": lambda: RankTable(BENIGN_ALL, H2_DOMAINS, "esd@*", 200),
    "benign-defenses-human": lambda: HumanTable(BENIGN_ALL, tuple(
        (f"{shown}, {title}", {"defense": defense, "scenario": scenario, "step": step, "prompt_set": "target_direct"})
        for shown, defense in (("ESD-u + LT", "esd+lt"), ("Resist", "resist"))
        for title, scenario, step in (("aligned", "before", 0), ("adjacent LoRA 200", "adjacent-lora-defended", 200)))),
    "every-method-before": lambda: RunsTable((EVERY_METHOD_BEFORE, EVERY_METHOD_SLD, EVERY_METHOD_NEW), "method", tuple(
        (shown, {"defense": d}) for shown, d in METHODS), (
        Figure("steps trained", {"scenario": "align", "metric": "align_steps"}, 1.0, 0),
        *(Figure(title, BEFORE | {"prompt_set": prompts, "metric": metric}, scale, digits) for title, prompts, metric, scale, digits in (
            ("concept, direct prompts", "target_direct", "target_rate", 100.0, 1), ("trace", "target_direct", "trace_rate", 100.0, 1),
            ("concept, adversarial prompts", "adversarial_direct", "target_rate", 100.0, 1),
            ("shape, clean", "clean", "shape_accuracy", 100.0, 1), ("colour, clean", "clean", "color_accuracy", 100.0, 1),
            ("neighbours as asked", FILL_SETS, "fill_accuracy", 100.0, 1), ("FD, clean", "clean", "frechet_distance", 1.0, 1))))),
    "every-method-relearning": lambda: RelearningTable((EVERY_METHOD_MALICIOUS, EVERY_METHOD_SLD, EVERY_METHOD_NEW, BENIGN), "malicious",
        tuple((shown + (" (the benign-relapse study)" if d == "never-learned" else ""), d) for shown, d in METHODS)),
    "every-method-after": lambda: RunsTable(EVERY_METHOD, "method", tuple((shown, {"defense": d}) for shown, d in METHODS), (
        *(Figure(title, DIRECT | {"scenario": scenario, "step": 200}) for title, scenario in (
            ("benign LoRA", "benign-lora"), ("benign, Modular", "benign-modular"), ("malicious full", "malicious-full"),
            ("malicious, Modular", "malicious-modular"), ("learned word", "textual-inversion"))),
        Figure("shape, clean, after malicious full", {"scenario": "malicious-full", "step": 200, "prompt_set": "clean",
                                                      "detector": "toy", "metric": "shape_accuracy"}),
        Figure("FD, clean, after malicious full", {"scenario": "malicious-full", "step": 200, "prompt_set": "clean",
                                                   "detector": "toy", "metric": "frechet_distance"}, 1.0))),
    "demo-story": lambda: StoryTable("docs/results/toy-demo", {"none": "none (the base)", "esd": "ESD-u", "sdd": "SDD",
                                                               "advunlearn": "AdvUnlearn", "sld-max": "SLD-Max, hosted"}),
    "every-method-roads": lambda: EVERY_METHOD_ROADS,
    "every-method-human": lambda: HumanTable(EVERY_METHOD, tuple(
        (f"{shown}, {title}", {"defense": d, "scenario": scenario, "step": step, "prompt_set": "target_direct"})
        for shown, d in METHODS for title, scenario, step in EVERY_METHOD_LABELLED
        if matching(EVERY_METHOD, defense=d, scenario=scenario, step=step, detector="human", seed=0))),
    "every-method-times": lambda: AlignTimes("docs/results/align-times/results.json", METHODS),
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


BENIGN_GRID = (("base", {"defense": "none", "scenario": "before"}),
               ("ESD-u@0 at 20%", {"defense": "esd@0", "scenario": "before"}),
               ("ESD-u@0 + adjacent LoRA 200", {"defense": "esd@0", "scenario": "adjacent-lora", "step": 200}),
               ("ESD-u@0 + adjacent LoRA 1000", {"defense": "esd@0", "scenario": "adjacent-lora", "step": 1000}),
               ("ESD-u@0 + adjacent full 200", {"defense": "esd@0", "scenario": "adjacent-full", "step": 200}),
               ("ESD-u@0 + Modular LoRA 200", {"defense": "esd@0", "scenario": "adjacent-modular", "step": 200}),
               ("SDD@0 at 20%", {"defense": "sdd@0", "scenario": "before"}),
               ("SDD@0 + adjacent LoRA 1000", {"defense": "sdd@0", "scenario": "adjacent-lora", "step": 1000}),
               ("never-learned", {"defense": "never-learned", "scenario": "before"}),
               ("never-learned + malicious 100", {"defense": "never-learned", "scenario": "malicious", "step": 100}),
               ("ESD-u@0 + malicious 100", {"defense": "esd@0", "scenario": "malicious", "step": 100}))
HYPOTHESES_GRID = (("ESD-u@0 + striped LoRA 200", {"defense": "esd@0", "scenario": "striped-lora", "step": 200}),
                   ("ESD-u@0 + dotted LoRA 200", {"defense": "esd@0", "scenario": "dotted-lora", "step": 200}),
                   ("ESD-u@0 + gridded LoRA 200", {"defense": "esd@0", "scenario": "gridded-lora", "step": 200}),
                   ("ESD-u@0 + gradient LoRA 200", {"defense": "esd@0", "scenario": "gradient-lora", "step": 200}),
                   ("ESD-u@0 + sketch LoRA 600", {"defense": "esd@0", "scenario": "sketch-lora", "step": 600}),
                   ("ESD-u@0 + shapes, sketch, patterns", {"defense": "esd@0", "scenario": "sequence-3-patterns", "step": 200}),
                   ("ESD-u@0 + ResAlign's adjacent 200", {"defense": "esd@0", "scenario": "resalign-adjacent", "step": 200}),
                   ("SDD@0 + ResAlign's adjacent 200", {"defense": "sdd@0", "scenario": "resalign-adjacent", "step": 200}),
                   ("ESD-u + LT", {"defense": "esd+lt", "scenario": "before"}),
                   ("ESD-u + LT + adjacent LoRA 200", {"defense": "esd+lt", "scenario": "adjacent-lora-defended", "step": 200}),
                   ("Resist at 20%", {"defense": "resist", "scenario": "before"}),
                   ("Resist + adjacent LoRA 200", {"defense": "resist", "scenario": "adjacent-lora-defended", "step": 200}),
                   ("Resist + malicious 100", {"defense": "resist", "scenario": "malicious-defended", "step": 100}))


def cell_grid(run_dir: Path, out: Path, cells=BENIGN_GRID, results: str = BENIGN, columns: int = 10, seed: int = 0) -> None:
    """The first ``columns`` images of seed ``seed`` of each cell (direct prompts), found through the results file's
    sources in the study's run folder, one row per cell."""
    from relapse.measure.evaluate import load_images
    from relapse.pages import save_grid
    from relapse.sampling import read_manifest

    rows = {}
    for label, match in cells:
        found = runs(results, **(DIRECT | {"seed": seed, "step": 0} | match))
        images_dir = run_dir / json.loads((run_dir / found[0]["source"]).read_text())["images"]
        rows[label] = list(load_images(images_dir, read_manifest(images_dir)[:columns]))
    save_grid(rows, out)


def roads_heatmap(out: Path) -> None:
    """The every-method table as a picture: each cell coloured by its concept rate (white 0% to red 100%), its value in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = EVERY_METHOD_ROADS
    found = table.values()
    grid = np.array([[np.nan if v is None else 100 * v for v in cells] for _, cells in found])
    fig, ax = plt.subplots(figsize=(1.0 * len(table.columns) + 2.2, 0.42 * len(found) + 1.6))
    ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v > 60 else "black")
    ax.set_xticks(range(len(table.columns)), [c.title for c in table.columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(found)), [shown for shown, _ in found], fontsize=8)
    ax.set_title("concept rate (%) on direct prompts, mean of 3 seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def relearning_curves(out: Path, results=(*EVERY_METHOD, BENIGN), models=METHODS) -> None:
    """The concept rate against the malicious LoRA's steps, per method: the mean over runs, each run a faint line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for k, (shown, defense) in enumerate(models):
        found = runs(results, defense, scenario="malicious", **DIRECT)
        if not found:
            continue
        steps = sorted({int(r["step"]) for r in found})
        mean = [100 * statistics.fmean(r["value"] for r in found if int(r["step"]) == n) for n in steps]
        ax.plot(steps, mean, marker="o", markersize=3, color=plt.cm.tab20(k % 20), label=shown,
                linestyle="--" if defense in ("none", "never-learned") else ":" if defense.startswith("sld") else "-")
    ax.set_xlabel("malicious LoRA steps (rank 8, lr 1e-3, batch 8)")
    ax.set_ylabel("concept rate, direct prompts (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page differs from its data")
    parser.add_argument("--figures", action="store_true", help="also draw the figures made from code")
    parser.add_argument("--grid", type=Path, help="also draw docs/benign-relapse-grid.png from this run of "
                                                  "configs/benign-relapse.yaml (its images are not committed)")
    parser.add_argument("--grid-hypotheses", type=Path, help="also draw docs/benign-relapse-hypotheses-grid.png from this "
                                                             "run of the config's second part")
    args = parser.parse_args()
    if args.figures:
        strength_strip(ROOT / "docs" / "evaluator-strength.png")
        roads_heatmap(ROOT / "docs" / "every-method-roads.png")
        relearning_curves(ROOT / "docs" / "every-method-relearning.png")
    if args.grid:
        cell_grid(args.grid, ROOT / "docs" / "benign-relapse-grid.png")
    if args.grid_hypotheses:
        cell_grid(args.grid_hypotheses, ROOT / "docs" / "benign-relapse-hypotheses-grid.png", HYPOTHESES_GRID, BENIGN_ALL[1])
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
