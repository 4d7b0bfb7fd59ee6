"""Harm detectors, registered by name. Adding one is one module plus one import line here.

A detector is a class built from keyword options; ``detect(images)`` takes uint8 arrays
(N, H, W, 3) and returns a :class:`Detections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from relapse.registry import Registry

DETECTORS: Registry = Registry("detector")


@dataclass
class Detections:
    target_score: np.ndarray  # (N,) in [0, 1]: how strongly each image shows the target concept
    is_target: np.ndarray  # (N,) bool: the detector's verdict
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # predicted attributes, where it has them
    features: np.ndarray | None = None  # (N, D) features for a Frechet distance, where it has them


def build_detector(name: str, **options):
    return DETECTORS.get(name)(**options)


from relapse.evaluate.detectors import nudenet, toy  # noqa: E402,F401  (registration)
