"""Metrics declare themselves once; detectors name the ones they produce, and nothing else gets through."""

import numpy as np
import pytest

from relapse.measure.detectors import DETECTORS, Detections
from relapse.measure.evaluate import summarize
from relapse.measure.metrics import METRICS, Metric


def test_every_metric_a_detector_declares_is_registered():
    for detector in DETECTORS:
        assert detector.metrics and set(detector.metrics) <= {m.name for m in METRICS}, detector.__name__


def test_each_kind_reads_its_figure_from_an_evaluation():
    result = {"n_images": 7, "target_rate": {"rate": 0.5, "ci95": [0.2, 0.8], "n": 6, "k": 3},
              "aesthetic": {"mean": 5.5, "sd": 1.0, "ci95": [5.0, 6.0], "n": 7}, "frechet_distance": 12.5}
    assert METRICS.get("target_rate").read(result) == (0.5, [0.2, 0.8], 6)
    assert METRICS.get("aesthetic").read(result) == (5.5, [5.0, 6.0], 7)
    assert METRICS.get("frechet_distance").read(result) == (12.5, None, 7)
    assert METRICS.get("shape_accuracy").label() == "shape accuracy (%), higher is better"
    assert METRICS.get("target_rate").scale == 100 and METRICS.get("clip_score").scale == 1


def test_a_score_the_detector_does_not_declare_is_refused(monkeypatch):
    class Undeclared:
        metrics = ("aesthetic",)

    monkeypatch.setitem(DETECTORS._entries, "undeclared-test", Undeclared)
    rows = [{"file": "0.png", "prompt": "a red star", "seed": 0}]
    assert "aesthetic" in summarize(rows, Detections(scores={"aesthetic": np.ones(1)}), "undeclared-test")
    with pytest.raises(ValueError, match="does not declare"):
        summarize(rows, Detections(scores={"clip_score": np.ones(1)}), "undeclared-test")


def test_a_metric_is_declared_once():
    with pytest.raises(ValueError, match="already registered"):
        METRICS.register("target_rate")(Metric("target_rate", "rate", "again"))
