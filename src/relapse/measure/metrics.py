"""Every figure relapse reports, declared once (lm-evaluation-harness's metric registry): its name, its kind,
which direction is better, a title and a unit. A detector names the metrics it produces; result rows, the
CSV, the report's tables and plots and the terminal summary are generated from these declarations.

Kinds: a **rate** is a share of images (an evaluation holds ``{"rate", "ci95", "n"}``; shown in %), a
**score** a per-image number averaged (``{"mean", "ci95", "n"}``), a **distance** one number per image set.
Adding a metric is one ``declare`` line here and its name in the detectors that produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relapse.registry import Registry


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["rate", "score", "distance"]
    title: str
    higher_is_better: bool | None = None  # None: neither (a verdict rate measures; it is not a quality)
    quality: bool = False  # a quality figure: it joins the report's quality tables

    @property
    def scale(self) -> float:
        """Shown as: rates in %, the rest as they are."""
        return 100.0 if self.kind == "rate" else 1.0

    @property
    def unit(self) -> str:
        return "%" if self.kind == "rate" else ""

    def label(self) -> str:
        """The title with its unit and direction, for a table or an axis."""
        unit = f" ({self.unit})" if self.unit else ""
        direction = {True: ", higher is better", False: ", lower is better"}.get(self.higher_is_better, "") if self.quality else ""
        return f"{self.title}{unit}{direction}"

    def read(self, result: dict) -> tuple[float, list | None, int]:
        """(value, 95% interval or None, n) of this metric in an evaluation's result."""
        found = result[self.name]
        if self.kind == "rate":
            return found["rate"], found["ci95"], found["n"]
        if self.kind == "score":
            return found["mean"], found["ci95"], found["n"]
        return found, None, result["n_images"]


METRICS: Registry[Metric] = Registry("metric")
HEADLINE_METRIC = "target_rate"  # what every headline table shows: how much of the concept comes back (all flags)
TRACE_METRIC = "trace_rate"  # the concept's trace: a lower threshold on the same score, where a detector has one
ON_PROMPT_METRIC = "target_on_prompt_rate"  # flagged *and* of the shape and colour asked for, where the detector says


def declare(*metrics: Metric) -> None:
    for metric in metrics:
        METRICS.register(metric.name)(metric)


declare(
    Metric("target_rate", "rate", "target rate"),
    Metric("trace_rate", "rate", "trace rate"),
    Metric("target_on_prompt_rate", "rate", "on-prompt target rate"),
    Metric("patterned_rate", "rate", "patterned rate"),
    Metric("shape_accuracy", "rate", "shape accuracy", higher_is_better=True, quality=True),
    Metric("color_accuracy", "rate", "colour accuracy", higher_is_better=True, quality=True),
    Metric("background_accuracy", "rate", "background accuracy", higher_is_better=True),
    Metric("style_accuracy", "rate", "style accuracy", higher_is_better=True, quality=True),
    Metric("fill_accuracy", "rate", "fill accuracy", higher_is_better=True, quality=True),
    Metric("nsfw_score", "score", "LAION NSFW score"),
    Metric("aesthetic", "score", "LAION aesthetic score", higher_is_better=True, quality=True),
    Metric("clip_score", "score", "CLIP score", higher_is_better=True, quality=True),
    Metric("frechet_distance", "distance", "Frechet distance to the reference", higher_is_better=False, quality=True),
    Metric("cmmd", "distance", "CMMD to the reference", higher_is_better=False, quality=True),
    Metric("update_cosine_to_undo", "score", "cos(dW_ft, -dW_safe)"),
    Metric("update_projection_to_undo", "score", "projection of dW_ft onto -dW_safe, in |dW_safe|"),
    Metric("update_safe_subspace_share", "score", "share of |dW_ft| in dW_safe's subspace"),
    Metric("update_norm_ft", "score", "|dW_ft|"),
    Metric("update_norm_safe", "score", "|dW_safe|"),
    Metric("align_steps", "score", "alignment steps trained"),
    Metric("align_residual_rate", "rate", "concept rate at the alignment's last stop check"),
    Metric("data_frechet_to_concept", "distance", "Frechet distance of the training data to the concept's images"),
    Metric("data_cmmd_to_concept", "distance", "CMMD of the training data to the concept's images"),
)
