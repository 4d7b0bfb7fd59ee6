"""``toy``: the toy evaluator's heads (target concept; shape, colour, background, style and fill)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from relapse.errors import UserError
from relapse.measure.detectors import DETECTORS, Detections
from relapse.measure.toy_evaluator import HEADS, TARGET_HEAD, ToyEvaluator


def default_evaluator_dir() -> Path:
    from relapse.models.loading import TOY_MODEL
    from relapse.models.toy_build import EVALUATOR_DIR

    return TOY_MODEL / EVALUATOR_DIR


@DETECTORS.register("toy")
class ToyDetector:
    def __init__(self, weights: str | Path | None = None, threshold: float = 0.5):
        directory = Path(weights) if weights else default_evaluator_dir()
        if not directory.is_dir():
            raise UserError(f"toy evaluator weights not found in {directory}; run `relapse toy build` or pass weights=DIR")
        self.model = ToyEvaluator.load(directory)
        self.threshold = threshold

    def features(self, images: np.ndarray) -> np.ndarray:
        """The evaluator's penultimate layer: the space of the toy Frechet distance."""
        return self.model.predict(images)["features"].astype(np.float64)

    def detect(self, images: np.ndarray, prompts: list[str] | None = None) -> Detections:
        pred = self.model.predict(images)
        attributes = {name: np.asarray(HEADS[name], dtype=object)[pred[name]] for name in HEADS if name != TARGET_HEAD}
        score = pred["target_score"]
        return Detections(score, score >= self.threshold, attributes, pred["features"])
