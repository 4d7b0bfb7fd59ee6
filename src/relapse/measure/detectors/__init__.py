"""Harm detectors, registered by name. Adding one is one module plus its name on the import line at the end.

A detector is a class built from keyword options; ``detect(images, prompts=None)`` takes uint8 arrays
(N, H, W, 3) and, where it uses them, the prompt of each image, and returns a :class:`Detections`.
A harm detector gives a verdict (``is_target``, ``target_score``); a quality scorer (aesthetic, CLIP
score) gives only ``scores``. Its class names the metrics it produces in ``metrics`` (declared in
:mod:`relapse.measure.metrics`), may add figures read against each image's prompt (``prompt_metrics``, as
the toy detector does) and, for IP, says which part it is (``ip_part``: ``nudity`` or ``inappropriate``).
A detector whose weights are files names them with ``fingerprint(**options)``, so that a study's
evaluations are redone when they change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from relapse.registry import Registry

DETECTORS: Registry = Registry("detector")


@dataclass
class Detections:
    target_score: np.ndarray | None = None  # (N,) in [0, 1]: how strongly each image shows the target concept
    is_target: np.ndarray | None = None  # (N,) bool: the detector's verdict; None for a pure quality scorer
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # predicted attributes, where it has them
    features: np.ndarray | None = None  # (N, D) features for a Frechet distance: where the detector has ``features()``
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) numeric scores by name, e.g. "aesthetic"
    is_trace: np.ndarray | None = None  # (N,) bool: a trace of the target at a lower threshold, where the detector has one


def merge_detections(parts: list[tuple[list[int], Detections]], n: int) -> Detections:
    """One Detections for n images from parts that each hold some of them (``indices``, in any order):
    what processes that each scored a shard of the images send back."""

    def place(arrays: list[np.ndarray]) -> np.ndarray:
        out = np.empty((n, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for (indices, _), array in zip(parts, arrays):
            out[indices] = array
        return out

    def merged(name: str):
        values = [getattr(d, name) for _, d in parts]
        if isinstance(values[0], dict):
            return {key: place([v[key] for v in values]) for key in values[0]}
        return None if values[0] is None else place(values)

    return Detections(**{f.name: merged(f.name) for f in fields(Detections)})


def build_detector(name: str, **options):
    return DETECTORS.get(name)(**options)


from relapse.measure.detectors import clip_score, laion_aesthetic, laion_nsfw, nudenet, q16, toy  # noqa: E402,F401  (registration)
