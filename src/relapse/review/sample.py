"""The blind sample people label: ``per_cell`` images drawn (seeded) from each chosen cell of a study run,
shuffled across cells into one order, each image known on the page only by a token.

A cell is one (defense, scenario, step, seed, prompt set) of the run's results; cells that read the same images
(a scenario's step 0 is its defense before fine-tuning) share them. The images drawn from a cell depend only on
the seed and the cell's images, so a wider choice of cells keeps every image already drawn, and labels are kept
per image: a label counts for every cell that holds its image. The draw is written to ``RUN/review/sample.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from relapse.errors import UserError
from relapse.io import write_json

REVIEW_DIR = "review"
SAMPLE_FILE, LABELS_FILE = "sample.json", "labels.sqlite"
CELL_FIELDS = ("defense", "scenario", "step", "seed", "prompt_set")


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_cell: int = Field(30, gt=0, description="images drawn from each cell (every image of a cell that has fewer)")
    seed: int = Field(0, description="seed of the draw and of the blind order")
    cells: list[str] = Field(default_factory=list, description=(
        "which cells, each KEY=VALUE[|VALUE...] joined by commas (keys: defense, scenario, step: a number or last, seed: the "
        "study's, prompt_set), e.g. 'scenario=malicious,defense=lt|resist'; a cell any one matches is drawn. Default: the "
        "study's first seed, before fine-tuning and at each scenario's last step"))


@dataclass
class RunCell:
    """One cell of a run: its labels, its images (paths relative to the run folder) and each detector's evaluation."""

    labels: dict
    images: list[str]
    evaluations: dict[str, str] = field(default_factory=dict)  # detector -> evaluation JSON, relative to the run folder

    def describe(self) -> str:
        return ", ".join(f"{key} {self.labels[key]}" for key in CELL_FIELDS)


def results_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no results.json; run `relapse study` into it first")
    return json.loads(path.read_text())["rows"]


def run_cells(run_dir: Path, rows: list[dict] | None = None) -> list[RunCell]:
    """Every cell of a run that has images, from its result rows (default: its results.json), in their order."""
    cells: dict[tuple, RunCell] = {}
    for row in results_rows(run_dir) if rows is None else rows:
        if row["metric"] != "target_rate" or row["detector"] == "human" or ";" in row["source"]:
            continue  # human rows are read from labels, IP rows join two evaluations
        key = tuple(row[k] for k in CELL_FIELDS)
        if key not in cells:
            evaluation = json.loads((run_dir / row["source"]).read_text())
            folder = evaluation["images"]
            cells[key] = RunCell(dict(zip(CELL_FIELDS, key)), [f"{folder}/{entry['file']}" for entry in evaluation["per_image"]])
        cells[key].evaluations[row["detector"]] = row["source"]
    return list(cells.values())


def parse_filter(text: str) -> dict[str, set[str]]:
    """'scenario=malicious,defense=lt|resist' -> {'scenario': {'malicious'}, 'defense': {'lt', 'resist'}}."""
    found = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, values = part.partition("=")
        if not sep or key.strip() not in CELL_FIELDS or not values.strip():
            raise UserError(f"cannot read the cell filter {text!r} at {part!r}: write KEY=VALUE[|VALUE...] with KEY one of "
                            f"{', '.join(CELL_FIELDS)}, joined by commas")
        found[key.strip()] = {v.strip() for v in values.split("|")}
    return found


def chosen(cells: list[RunCell], filters: list[str]) -> list[RunCell]:
    """The cells any filter matches (default: the first seed, before fine-tuning and at each scenario's last step)."""
    last = {}
    for cell in cells:
        last[cell.labels["scenario"]] = max(last.get(cell.labels["scenario"], 0), cell.labels["step"])

    def matches(cell: RunCell, wanted: dict[str, set[str]]) -> bool:
        for key, values in wanted.items():
            if key == "step" and "last" in values and cell.labels["step"] == last[cell.labels["scenario"]]:
                continue
            if str(cell.labels[key]) not in values:
                return False
        return True

    parsed = [parse_filter(f) for f in filters] or [{"seed": {str(min(c.labels["seed"] for c in cells))}, "step": {"last"}}]
    picked = [cell for cell in cells if any(matches(cell, wanted) for wanted in parsed)]
    if not picked:
        raise UserError(f"no cell of the run matches {filters}; cells look like: {cells[0].describe()}")
    return picked


def token_of(image: str) -> str:
    """The name an image goes by on the page and on the sheets: it says nothing of the cell."""
    return hashlib.sha256(f"relapse-review:{image}".encode()).hexdigest()[:12]


def _draw(images: list[str], per_cell: int, seed: int) -> list[str]:
    folder_key = int(hashlib.sha256(images[0].rsplit("/", 1)[0].encode()).hexdigest()[:8], 16)
    order = np.random.default_rng([seed, folder_key]).permutation(len(images))
    return [images[i] for i in sorted(order[:per_cell])]


@dataclass
class Sample:
    """The images to label in blind order, each with its token and the cells that hold it."""

    config: SampleConfig
    cells: list[RunCell]
    images: list[str]  # blind order

    @cached_property
    def tokens(self) -> dict[str, str]:
        return {image: token_of(image) for image in self.images}

    @cached_property
    def by_token(self) -> dict[str, str]:
        return {token: image for image, token in self.tokens.items()}

    def record(self) -> dict:
        holders = {}
        for index, cell in enumerate(self.cells):
            for image in cell.images:
                holders.setdefault(image, []).append(index)
        return {"config": self.config.model_dump(), "cells": [c.labels | {"n_drawn": len(c.images)} for c in self.cells],
                "items": [{"token": self.tokens[image], "image": image, "cells": holders[image]} for image in self.images]}


def draw_sample(run_dir: Path, config: SampleConfig) -> Sample:
    """Draw the sample, write it to RUN/review/sample.json (the run's record of what was shown), return it."""
    cells = chosen(run_cells(run_dir), config.cells)
    drawn = {image for cell in cells for image in _draw(cell.images, config.per_cell, config.seed)}
    blind = sorted(drawn, key=lambda image: hashlib.sha256(f"{config.seed}:{image}".encode()).hexdigest())
    sample = Sample(config, [RunCell(c.labels, [i for i in c.images if i in drawn], c.evaluations) for c in cells], blind)
    (run_dir / REVIEW_DIR).mkdir(exist_ok=True)
    write_json(run_dir / REVIEW_DIR / SAMPLE_FILE, sample.record())
    return sample
