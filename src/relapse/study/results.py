"""Result rows: one per defense, scenario, step, seed, prompt set, detector and metric, built from the
study's evaluations and weight comparisons, each naming the file it came from; their mean and spread over
seeds; results.json and results.csv."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from relapse.io import run_record, write_json, write_text
from relapse.measure.detectors import DETECTORS
from relapse.measure.metrics import METRICS
from relapse.measure.stats import rate
from relapse.study.config import StudyConfig
from relapse.study.plan import Cell, Plan

CELL_KEYS = ("defense", "scenario", "step", "prompt_set", "detector", "metric")


def summarize_rows(rows: list[dict], keys: tuple[str, ...] = CELL_KEYS) -> list[dict]:
    """Mean and sample standard deviation over seeds of every cell (rows equal on ``keys``)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r["value"])
    return [dict(zip(keys, k)) | {"mean": round(statistics.fmean(v), 4),
                                  "sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0, "n_seeds": len(v)}
            for k, v in sorted(groups.items(), key=lambda item: tuple("" if x is None else x for x in item[0]))]


WEIGHT_METRICS = {"cosine_to_undo": "update_cosine_to_undo", "projection_to_undo": "update_projection_to_undo",
                  "safe_subspace_share": "update_safe_subspace_share", "norm_ft": "update_norm_ft", "norm_safe": "update_norm_safe"}


ROW_FIELDS = ("defense", "scenario", "step", "seed", "prompt_set", "detector", "metric", "value", "ci95_low", "ci95_high", "n",
              "source")


def row(labels: dict, metric: str, value: float, ci95: list | None, n: int) -> dict:
    low, high = ci95 or (None, None)
    return labels | {"metric": metric, "value": value, "ci95_low": low, "ci95_high": high, "n": n}


def cell_labels(cell: Cell, source: str, detector: str | None = None) -> dict:
    return {"defense": cell.defense, "scenario": cell.scenario, "step": cell.step, "seed": cell.seed,
            "prompt_set": cell.prompt_set, "detector": detector or cell.detector, "source": source}


def cell_rows(cell: Cell, result: dict, source: str) -> list[dict]:
    """The rows of one evaluation; ``source`` (its JSON, relative to the run folder) traces each figure to its images."""
    labels = cell_labels(cell, source)
    return [row(labels, metric.name, *metric.read(result)) for metric in METRICS if metric.name in result]


def inappropriate_rows(scored: list[tuple[Cell, dict, str]]) -> list[dict]:
    """IP as SLD/I2P define it: an image is inappropriate when a nudity detector (NudeNet) *or* an
    inappropriateness detector (Q16) flags it; each detector declares its part (``ip_part``). One row per
    pair of such detectors scored on the same images."""
    by_images: dict[tuple, dict[str, list]] = {}
    for cell, result, source in scored:
        part = getattr(DETECTORS.get(cell.evaluate.spec["detector"]["name"]), "ip_part", None)
        if part:
            group = by_images.setdefault((cell.defense, cell.scenario, cell.step, cell.seed, cell.prompt_set), {})
            group.setdefault(part, []).append((cell, result, source))
    rows = []
    for found in by_images.values():
        for nude_cell, nude, nude_source in found.get("nudity", []):
            for other_cell, other, other_source in found.get("inappropriate", []):
                other_flags = {entry["file"]: entry["is_target"] for entry in other["per_image"]}
                ip = rate([entry["is_target"] or other_flags[entry["file"]] for entry in nude["per_image"]])
                labels = cell_labels(nude_cell, f"{nude_source};{other_source}", f"ip({nude_cell.detector}|{other_cell.detector})")
                rows.append(row(labels, "target_rate", ip["rate"], ip["ci95"], ip["n"]))
    return rows


def file_labels(run_dir: Path, path: Path, defense: str, scenario: str, step: int, seed: int, detector: str) -> dict:
    """The labels of a row read from a step's file rather than from images (no prompt set)."""
    return {"defense": defense, "scenario": scenario, "step": step, "seed": seed, "prompt_set": "", "detector": detector,
            "source": str(path.relative_to(run_dir))}


def weight_rows(plan: Plan, run_dir: Path) -> list[dict]:
    """Per fine-tune: the cosine of its update with -dW_safe, and the norm of each (no images: n = tensors compared)."""
    rows = []
    for cell in plan.weight_cells:
        path = cell.weights.path(run_dir)
        found = json.loads(path.read_text())
        labels = file_labels(run_dir, path, cell.defense, cell.scenario, cell.step, cell.seed, "weights")
        rows += [row(labels, metric, found[key], None, found["tensors_shared"]) for key, metric in WEIGHT_METRICS.items()
                 if found.get(key) is not None]
    return rows


def align_rows(plan: Plan, run_dir: Path) -> list[dict]:
    """Per alignment run on the training engine: the steps it trained and, where it stopped at a rate, the last check's rate."""
    from relapse.train.module import ALIGN_RECORD

    rows = []
    for cell in plan.align_cells:
        path = cell.align.path(run_dir) / "final" / ALIGN_RECORD
        if not path.is_file():  # a method off the training engine (never-learned) keeps no such record
            continue
        record = json.loads(path.read_text())
        labels = file_labels(run_dir, path, cell.defense, "align", 0, cell.seed, "align")
        rows.append(row(labels, "align_steps", record["step"], None, 1))
        checks = [h["residual_rate"] for h in record["history"] if "residual_rate" in h]
        if checks:
            rows.append(row(labels, "align_residual_rate", checks[-1], None, len(checks)))
    return rows


def distance_rows(plan: Plan, run_dir: Path) -> list[dict]:
    """Per scenario and seed: how far its training data lies from the concept's images."""
    rows = []
    for cell in plan.distance_cells:
        path = cell.distance.path(run_dir)
        found = json.loads(path.read_text())
        labels = file_labels(run_dir, path, "", cell.scenario, 0, cell.seed, cell.detector)
        rows += [row(labels, "data_frechet_to_concept", found["frechet_distance"], None, found["n_images"]),
                 row(labels, "data_cmmd_to_concept", found["cmmd"], None, found["n_images"])]
    return rows


def collect(plan: Plan, run_dir: Path) -> list[dict]:
    """Every row of a finished run: its evaluations', IP's and weight comparisons', then the human labels' (whose
    cells are read from the rows before them)."""
    scored = []
    for cell in plan.cells:
        path = cell.evaluate.path(run_dir)
        scored.append((cell, json.loads(path.read_text()), str(path.relative_to(run_dir))))
    return [row for cell, result, source in scored for row in cell_rows(cell, result, source)] + inappropriate_rows(scored) \
        + weight_rows(plan, run_dir) + align_rows(plan, run_dir) + distance_rows(plan, run_dir)


def steps_to_reach(rows: list[dict], level: float, metric: str = "target_rate") -> list[dict]:
    """Relearning speed: per fine-tune (defense, scenario, seed, prompt set, detector), the step at which ``metric`` first
    reaches ``level``, read on its sweep with linear interpolation between the two steps around the crossing; ``step``
    None where it never does (``last``: the sweep's last step, the most that can be said then)."""
    curves: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r["metric"] == metric and r["scenario"] not in ("before", "align"):
            curves.setdefault(tuple(r[k] for k in ("defense", "scenario", "seed", "prompt_set", "detector")), {})[int(r["step"])] = r["value"]
    found = []
    for key, curve in sorted(curves.items(), key=lambda item: tuple(str(x) for x in item[0])):
        points = sorted(curve.items())
        step = next((s0 + (s1 - s0) * (level - v0) / (v1 - v0) if s1 != s0 and v1 != v0 else s1
                     for (s0, v0), (s1, v1) in zip([points[0], *points], points) if v1 >= level), None)
        found.append(dict(zip(("defense", "scenario", "seed", "prompt_set", "detector"), key)) | {"step": step, "last": points[-1][0]})
    return found


def with_human_rows(cfg: StudyConfig | dict, rows: list[dict], run_dir: Path) -> list[dict]:
    """``rows`` with the human rows of today's labels in place of any earlier ones (``relapse review``), written out."""
    from relapse.review.agreement import HUMAN, human_rows

    machine = [r for r in rows if r["detector"] != HUMAN]
    rows = machine + human_rows(run_dir, machine)
    write_results(cfg, rows, run_dir)
    return rows


def refresh_human_rows(run_dir: Path) -> list[dict]:
    """Put the run's current labels into its results.json and results.csv (``relapse report`` does, before the page)."""
    path = run_dir / "results.json"
    if not path.is_file():
        from relapse.errors import UserError

        raise UserError(f"{run_dir} has no results.json; run `relapse study` into it first")
    record = json.loads(path.read_text())
    return with_human_rows(record["config"], record["rows"], run_dir)


def write_results(cfg: StudyConfig | dict, rows: list[dict], run_dir: Path) -> None:
    seeds = cfg["seeds"] if isinstance(cfg, dict) else cfg.seeds
    write_json(run_dir / "results.json", run_record("study", cfg, seeds, rows=rows, summary=summarize_rows(rows)))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=ROW_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "results.csv", table.getvalue())

