"""People's labels beside the detectors': the human rates of each labelled cell, and how far each detector agrees.

An image's human label is its labellers' consensus (:func:`relapse.review.labels.consensus`). A cell's **human
concept rate** is the share of its labelled images labelled ``concept``; its **human trace rate** the share
labelled ``concept`` or ``trace`` (each with a 95% Wilson interval, n = its usable labelled images). Against a
detector, on the same images: its concept and trace rates, a mark where the two intervals of either rate do not
overlap, and over every labelled image Cohen's kappa and the confusion of (none, trace, concept); a detector with
one verdict (no trace threshold) is compared on concept or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from relapse.measure.stats import rate
from relapse.review.labels import ORDER, LabelStore, consensus
from relapse.review.sample import LABELS_FILE, REVIEW_DIR, run_cells

HUMAN = "human"  # the detector column of human rows in results
CLASSES = tuple(ORDER)  # none, trace, concept


def labels_path(run_dir: Path) -> Path:
    return run_dir / REVIEW_DIR / LABELS_FILE


def human_labels(run_dir: Path) -> dict[str, str]:
    """image -> consensus label, for every image with a usable one."""
    if not labels_path(run_dir).is_file():
        return {}
    return {image: label for image, by in LabelStore(labels_path(run_dir)).current().items() if (label := consensus(by))}


def _rates(verdicts: list[str]) -> dict[str, dict]:
    return {"concept": rate([v == "concept" for v in verdicts]), "trace": rate([v != "none" for v in verdicts])}


def human_rows(run_dir: Path, rows: list[dict]) -> list[dict]:
    """Result rows of every cell of ``rows`` with labels: detector ``human``, metrics target_rate (concept) and trace_rate."""
    labels = human_labels(run_dir)
    found = []
    for cell in run_cells(run_dir, rows) if labels else []:
        verdicts = [labels[image] for image in cell.images if image in labels]
        if verdicts:
            for metric, figure in zip(("target_rate", "trace_rate"), _rates(verdicts).values()):
                low, high = figure["ci95"]
                found.append(cell.labels | {"detector": HUMAN, "metric": metric, "value": figure["rate"], "ci95_low": low,
                                            "ci95_high": high, "n": figure["n"], "source": f"{REVIEW_DIR}/{LABELS_FILE}"})
    return found


def detector_verdicts(run_dir: Path, evaluation: str) -> tuple[dict[str, str], bool]:
    """image -> none, trace or concept, as an evaluation's per-image verdicts say, and whether the detector gives a
    trace verdict at all (without one: none or concept)."""
    found = json.loads((run_dir / evaluation).read_text())
    verdicts = {f"{found['images']}/{entry['file']}": "concept" if entry["is_target"] else "trace" if entry.get("is_trace") else "none"
                for entry in found["per_image"]}
    return verdicts, "trace_rate" in found


def _apart(a: dict, b: dict) -> bool:
    return a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0]


@dataclass
class CellAgreement:
    labels: dict
    human: dict[str, dict]  # concept, trace -> rate
    detectors: dict[str, dict[str, dict]] = field(default_factory=dict)  # detector -> concept, trace -> rate on the same images
    apart: dict[str, bool] = field(default_factory=dict)  # detector -> an interval of its apart from the human one


@dataclass
class DetectorAgreement:
    kappa: float | None
    confusion: list[list[int]]  # rows: human none, trace, concept; columns: the detector's
    n: int
    classes: tuple[str, ...]


def _detector_agreement(pairs: list[tuple[str, str]], has_trace: bool) -> DetectorAgreement:
    """Kappa and confusion (torchmetrics) over (human, detector) pairs; a detector without a trace verdict on concept or
    not. Kappa is None where both sides say one class only: agreement beyond chance is not defined."""
    import torch
    from torchmetrics.functional.classification import multiclass_cohen_kappa, multiclass_confusion_matrix

    classes = CLASSES if has_trace else ("not concept", "concept")
    fold = (lambda v: v) if has_trace else (lambda v: "concept" if v == "concept" else "not concept")
    index = {c: i for i, c in enumerate(classes)}
    target, preds = (torch.tensor([index[fold(pair[side])] for pair in pairs]) for side in (0, 1))
    confusion = multiclass_confusion_matrix(preds, target, num_classes=len(classes)).tolist()  # rows: people
    defined = len(pairs) > 1 and len(set(target.tolist()) | set(preds.tolist())) > 1
    kappa = round(float(multiclass_cohen_kappa(preds, target, num_classes=len(classes))), 4) if defined else None
    return DetectorAgreement(kappa, confusion, len(pairs), classes)


def agreement(run_dir: Path) -> tuple[list[CellAgreement], dict[str, DetectorAgreement]]:
    """Every labelled cell against every detector, and each detector over all labelled images."""
    labels = human_labels(run_dir)
    cells, pairs, has_trace = [], {}, {}
    seen: dict[str, set[str]] = {}
    for cell in run_cells(run_dir) if labels else []:
        labelled = [image for image in cell.images if image in labels]
        if not labelled:
            continue
        found = CellAgreement(cell.labels, _rates([labels[i] for i in labelled]))
        for detector, evaluation in cell.evaluations.items():
            verdicts, has_trace[detector] = detector_verdicts(run_dir, evaluation)
            found.detectors[detector] = _rates([verdicts[i] for i in labelled])
            compared = ("concept", "trace") if has_trace[detector] else ("concept",)
            found.apart[detector] = any(_apart(found.human[k], found.detectors[detector][k]) for k in compared)
            for image in labelled:  # an image several cells hold counts once
                if image not in seen.setdefault(detector, set()):
                    seen[detector].add(image)
                    pairs.setdefault(detector, []).append((labels[image], verdicts[image]))
        cells.append(found)
    return cells, {d: _detector_agreement(p, has_trace[d]) for d, p in pairs.items()}
