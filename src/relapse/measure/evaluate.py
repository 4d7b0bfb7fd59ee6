"""Score images with a detector: :func:`evaluate` in memory, ``relapse evaluate`` on a folder written by ``relapse generate``.

The result holds ``n_images``, ``target_rate`` (95% Wilson interval), ``trace_rate`` where the detector gives a
second verdict at a lower threshold (the toy evaluator: a trace of the concept), ``target_score_mean``, the figures
a detector reads against each image's prompt (the toy detector: attribute accuracies and the on-prompt
rate, :mod:`relapse.measure.detectors.toy`), and for each of its ``scores`` the mean, sd, a normal 95%
interval and n; every figure is a metric the detector declares (:mod:`relapse.measure.metrics`). A quality
scorer (laion_aesthetic, clip_score) gives no verdict, so no target figures. ``per_image`` keeps every
verdict and score, so each figure can be traced to its images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from relapse.data.datasets import load_dataset
from relapse.errors import UserError
from relapse.io import write_json
from relapse.measure.detectors import DETECTORS, Detections, build_detector
from relapse.measure.metrics import METRICS
from relapse.measure.stats import mean_ci, rate
from relapse.sampling import asked, read_manifest


class EvaluateConfig(BaseModel):
    """How images are scored (:func:`evaluate`, in memory)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    detector: str = Field("toy", description="a registered detector: toy, nudenet, q16, laion_nsfw, laion_aesthetic or "
                                             "clip_score (weights paths go in detector_options)")
    detector_options: dict = Field(default_factory=dict, description="keyword options of the detector (weights paths, "
                                                                     "threshold)")
    threshold: float | None = Field(None, description="the detector's threshold, added to detector_options (nudenet: 0.45, "
                                                      "0.5 or 0.6 are usual)")
    reference: str | None = Field(None, description="real images for a Frechet distance: imagefolder or toy:DOMAIN[:N]")

    def options(self) -> dict:
        return self.detector_options | ({"threshold": self.threshold} if self.threshold is not None else {})


class EvaluateRunConfig(EvaluateConfig):
    """``relapse evaluate``: the scoring, and the folder it reads and the file it writes."""

    images: Path = Field(description="a folder written by `relapse generate`")
    json_out: Path | None = Field(None, alias="json", description="also write the result here as JSON")


class Rate(BaseModel):
    """A rate with its 95% Wilson interval: ``k`` of ``n`` images."""

    model_config = ConfigDict(frozen=True)

    rate: float
    ci95: list[float]
    n: int
    k: int

    @property
    def interval(self) -> tuple[float, float]:
        return self.ci95[0], self.ci95[1]


class Evaluation(BaseModel):
    """What :func:`evaluate` finds in a set of images: ``target_rate`` and ``trace_rate`` (:class:`Rate`: ``.rate``,
    ``.interval``, ``.n``), and every other figure the detector declares as an attribute of the same name
    (``shape_accuracy``, ``frechet_distance``, a score's ``{"mean", "sd", "ci95", "n"}``); ``per_image`` keeps each
    image's verdicts. :meth:`to_json` is what ``relapse evaluate`` writes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    detector: str
    n_images: int
    target_rate: Rate | None = None
    trace_rate: Rate | None = None
    per_image: list[dict] = Field(default_factory=list)

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


def load_images(images_dir: Path, rows: list[dict]) -> np.ndarray:
    arrays = []
    for row in rows:
        path = images_dir / row["file"]
        try:
            arrays.append(np.asarray(Image.open(path).convert("RGB")))
        except (OSError, ValueError):
            raise UserError(f"image {path} listed in the manifest is missing or unreadable") from None
    return np.stack(arrays)


def summarize(rows: list[dict], detections: Detections, detector: str) -> dict:
    """The figures of one set of images: the verdicts' rate, the figures the detector reads against each image's
    prompt (:meth:`prompt_metrics`, e.g. the toy detector's attribute accuracy), and the mean of each score."""
    verdict = detections.is_target is not None
    result = {"detector": detector, "n_images": len(rows)}
    if verdict:
        result["target_rate"] = rate(list(map(bool, detections.is_target)))
    if detections.is_trace is not None:
        result["trace_rate"] = rate(list(map(bool, detections.is_trace)))
    if detections.target_score is not None:
        result["target_score_mean"] = round(float(np.mean(detections.target_score)), 4)
    detector_class = DETECTORS.get(detector)
    if hasattr(detector_class, "prompt_metrics"):
        result.update(detector_class.prompt_metrics([asked(row) for row in rows], detections))
    for name, values in detections.scores.items():
        if name in result:
            raise ValueError(f"detector {detector} names a score {name!r}, which is already a figure of the result")
        result[name] = mean_ci(values)
    undeclared = {name for name in result if name in METRICS} - set(detector_class.metrics)
    if undeclared:
        raise ValueError(f"detector {detector} produced {sorted(undeclared)}, which it does not declare in its `metrics`")
    per_image = []
    for i, row in enumerate(rows):
        entry = {"file": row["file"], "prompt": row["prompt"], "seed": row["seed"]} | ({"asks": row["asks"]} if "asks" in row else {})
        if detections.target_score is not None:
            entry["target_score"] = round(float(detections.target_score[i]), 4)
        if verdict:
            entry["is_target"] = bool(detections.is_target[i])
        if detections.is_trace is not None:
            entry["is_trace"] = bool(detections.is_trace[i])
        entry.update({name: str(values[i]) for name, values in detections.attributes.items()})
        entry.update({name: round(float(values[i]), 4) for name, values in detections.scores.items()})
        per_image.append(entry)
    result["per_image"] = per_image
    return result


def reference_features(detector, reference: np.ndarray) -> np.ndarray:
    """The reference images in the detector's feature space (the toy evaluator's, or a CLIP's)."""
    if not hasattr(detector, "features"):
        raise UserError("a Frechet distance needs a detector with image features: toy, q16, laion_nsfw, laion_aesthetic or "
                        "clip_score (Inception features need torchvision, which does not install beside the CPU torch wheel)")
    return detector.features(reference)


def reference_distances(features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The Frechet distance and CMMD of generated images' features to the reference's, in the same space."""
    from relapse.measure.cmmd import cmmd
    from relapse.measure.fid import frechet_distance

    if min(len(features), len(reference)) < 2:
        raise UserError(f"a Frechet distance needs at least 2 images on each side (got {len(features)} generated, "
                        f"{len(reference)} reference); generate more images per prompt")
    return {"frechet_distance": round(frechet_distance(reference, features), 4), "cmmd": round(cmmd(reference, features), 4)}


def evaluation(rows: list[dict], detections: Detections, name: str, reference: tuple[np.ndarray, str] | None = None) -> dict:
    """The evaluation of one set of images, whoever scored them (``relapse evaluate``, :func:`evaluate`, a study's
    step): :func:`summarize`'s figures, and with ``reference`` (its features, and its source) the Frechet distance and
    CMMD to it and what it was."""
    result = summarize(rows, detections, name)
    if reference is not None:
        features, source = reference
        result |= reference_distances(detections.features, features) | {"reference": {"source": source, "n_images": len(features)}}
    return result


def score(images: np.ndarray, rows: list[dict], detector, name: str, reference=None) -> dict:
    """:func:`evaluation` of ``images`` (N, H, W, 3 uint8) and their manifest rows, against ``reference`` (a dataset
    from :func:`load_dataset`) when given."""
    reference_feats = reference_features(detector, reference.images) if reference is not None else None
    detections = detector.detect(images, [asked(row) for row in rows])
    return evaluation(rows, detections, name, (reference_feats, reference.source) if reference is not None else None)


def as_array(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def evaluate(images, config: EvaluateConfig | None = None, *, prompts: list[str] | None = None) -> Evaluation:
    """Score images with a detector, in memory.

    Args:
        images: a :class:`relapse.sampling.Generation` (its prompts and seeds come along), a list of PIL images,
            or an (N, H, W, 3) uint8 array.
        config: the detector and its options, and a reference for a Frechet distance; default :class:`EvaluateConfig`'s
            (the toy detector).
        prompts: the prompt of each image (not needed for a Generation); attribute accuracy and the on-prompt
            rate compare the detector's reading of each image with what its prompt asks for.

    Returns:
        An :class:`Evaluation`: ``target_rate`` (``.rate``, its 95% Wilson ``.interval``, ``.n``), attribute accuracies,
        ``target_on_prompt_rate``, score means, ``frechet_distance`` when a reference is given, ``per_image`` verdicts.

    Example:
        >>> images = relapse.generate(pipe, relapse.SamplerConfig(steps=8, images_per_prompt=1), prompts="toy:target_direct")
        >>> relapse.evaluate(images).target_rate.rate
        1.0
    """
    config = config or EvaluateConfig()
    if hasattr(images, "rows"):
        rows, images = images.rows, images.images
    else:
        if prompts is None or len(prompts) != len(images):
            raise UserError(f"give one prompt per image ({len(images)} images, {0 if prompts is None else len(prompts)} prompts)")
        rows = [{"file": None, "prompt": prompt, "seed": None} for prompt in prompts]
    return Evaluation(**score(as_array(images), rows, build_detector(config.detector, **config.options()), config.detector,
                              load_dataset(config.reference) if config.reference else None))


def run_evaluate(cfg: EvaluateRunConfig) -> dict:
    rows = read_manifest(cfg.images)
    reference = load_dataset(cfg.reference) if cfg.reference else None
    detector = build_detector(cfg.detector, **cfg.options())
    result = score(load_images(cfg.images, rows), rows, detector, cfg.detector, reference)
    result["images"] = str(cfg.images)
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.json_out, result)
    return result
