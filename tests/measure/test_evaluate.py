import numpy as np
import pytest

from relapse.errors import UserError
from relapse.measure.detectors import DETECTORS, Detections, build_detector
from relapse.measure.evaluate import summarize
from relapse.measure.fid import frechet_distance
from relapse.measure.toy_evaluator import ToyEvaluator
from tests.conftest import random_images


def manifest_rows(prompts: list[str]) -> list[dict]:
    """The manifest rows of one image per prompt."""
    return [{"file": f"{i}.png", "prompt": p, "seed": 0} for i, p in enumerate(prompts)]


def test_summary_counts_target_rate_and_attribute_accuracy():
    rows = manifest_rows(["a red star", "a checkered blue circle", "a green square", "something unnamed"])
    det = Detections(np.array([0.1, 0.9, 0.2, 0.7]), np.array([False, True, False, True]),
                     {"shape": np.array(["star", "circle", "circle", "star"], dtype=object),
                      "color": np.array(["red", "blue", "green", "red"], dtype=object)})
    result = summarize(rows, det, "toy")
    assert result["n_images"] == 4 and result["target_rate"]["rate"] == 0.5
    assert result["shape_accuracy"]["n"] == 3 and result["shape_accuracy"]["rate"] == pytest.approx(2 / 3)
    assert result["color_accuracy"]["rate"] == 1.0
    assert result["per_image"][1]["is_target"] is True
    assert "style_accuracy" not in result  # the detector predicted no style
    assert "trace_rate" not in result and "is_trace" not in result["per_image"][0]  # no second verdict given


def test_a_trace_verdict_gives_a_trace_rate_beside_the_target_rate():
    rows = manifest_rows(["a checkered red star", "a checkered blue circle", "a checkered green square"])
    det = Detections(np.array([0.9, 0.3, 0.05]), np.array([True, False, False]), is_trace=np.array([True, True, False]))
    result = summarize(rows, det, "toy")
    assert (result["target_rate"]["k"], result["trace_rate"]["k"], result["trace_rate"]["n"]) == (1, 2, 3)
    assert [e["is_trace"] for e in result["per_image"]] == [True, True, False]


def test_target_on_prompt_counts_only_flagged_images_of_the_asked_shape_and_colour():
    prompts = ["a checkered red star", "a checkered red star", "a checkered blue circle", "a checkered thing"]
    det = Detections(np.ones(4), np.array([True, True, False, True]),
                     {"shape": np.array(["star", "moon", "circle", "star"], dtype=object),
                      "color": np.array(["red", "red", "blue", "green"], dtype=object)})
    rows = manifest_rows(prompts)
    on_prompt = summarize(rows, det, "toy")["target_on_prompt_rate"]
    # 0: flagged and faithful; 1: wrong shape (noise the detector calls checkered); 2: not flagged;
    # 3: the prompt names neither shape nor colour, so the flag alone counts
    assert (on_prompt["k"], on_prompt["n"]) == (2, 4)
    assert "target_on_prompt_rate" not in summarize(rows, Detections(np.ones(4), np.ones(4, bool), {}), "toy")


def test_fill_accuracy_asks_for_plain_where_the_prompt_names_no_fill():
    prompts = ["a striped red star", "a red star", "a dotted blue circle", "a gradient green square"]
    rows = manifest_rows(prompts)
    det = Detections(np.zeros(4), np.zeros(4, bool), {"fill": np.array(["striped", "plain", "gridded", "gradient"], dtype=object)})
    fill = summarize(rows, det, "toy")["fill_accuracy"]
    assert (fill["k"], fill["n"]) == (3, 4)


def test_patterned_rate_counts_every_fill_but_plain_whatever_the_prompt_asked():
    prompts = ["a checkered red star", "a checkered red star", "a red star", "a checkered blue circle"]
    rows = manifest_rows(prompts)
    det = Detections(np.zeros(4), np.zeros(4, bool), {"fill": np.array(["plain", "gridded", "striped", "checkered"], dtype=object)})
    patterned = summarize(rows, det, "toy")["patterned_rate"]
    assert (patterned["k"], patterned["n"]) == (3, 4)
    assert "patterned_rate" not in summarize(rows, Detections(np.zeros(4), np.zeros(4, bool), {}), "toy")


def test_style_accuracy_counts_every_prompt_sketch_or_plain():
    rows = manifest_rows(["a red star, in sketch style", "a red star"])
    det = Detections(np.zeros(2), np.zeros(2, bool), {"style": np.array(["plain", "plain"], dtype=object)})
    style = summarize(rows, det, "toy")["style_accuracy"]
    assert (style["rate"], style["n"], style["k"]) == (0.5, 2, 1)


def test_detectors_register_by_name():
    assert {"toy", "nudenet"} <= set(DETECTORS.names())
    with pytest.raises(UserError, match="unknown detector"):
        build_detector("nope")


def test_toy_detector_predicts_every_head(tiny_evaluator_dir):
    det = build_detector("toy", weights=tiny_evaluator_dir).detect(random_images(5))
    assert det.target_score.shape == (5,) and set(det.attributes) == {"shape", "color", "background", "style", "fill"}
    assert det.features.shape == (5, ToyEvaluator.num_features)


def test_toy_detector_reads_two_verdicts_from_one_strength_at_the_evaluators_thresholds(tiny_evaluator_dir, tmp_path):
    import json
    import shutil

    evaluator = tmp_path / "evaluator"
    shutil.copytree(tiny_evaluator_dir, evaluator)
    config = json.loads((evaluator / "evaluator.json").read_text())
    config["thresholds"] = {"concept": 0.6, "trace": 0.2}  # as a build saves them
    (evaluator / "evaluator.json").write_text(json.dumps(config))
    images = random_images(64)
    det = build_detector("toy", weights=evaluator).detect(images)
    assert (det.is_target == (det.target_score >= 0.6)).all() and (det.is_trace == (det.target_score >= 0.2)).all()
    assert (det.is_trace >= det.is_target).all()
    override = build_detector("toy", weights=evaluator, threshold=0.9, trace_threshold=0.05).detect(images)
    assert (override.is_target == (det.target_score >= 0.9)).all() and (override.is_trace == (det.target_score >= 0.05)).all()
    with pytest.raises(UserError, match="trace_threshold <= threshold"):
        build_detector("toy", weights=evaluator, threshold=0.1, trace_threshold=0.3)


def test_an_evaluator_of_the_older_kind_is_refused_in_one_line(tiny_evaluator_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_evaluator_dir, old)
    config = json.loads((old / "evaluator.json").read_text())
    del config["target"], config["thresholds"]
    (old / "evaluator.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="older kind.*relapse toy build --stage evaluator"):
        build_detector("toy", weights=old)


def test_toy_detector_refuses_images_not_of_the_toy_world_in_one_line(tiny_evaluator_dir):
    detector = build_detector("toy", weights=tiny_evaluator_dir)
    big = np.zeros((2, 64, 64, 3), np.uint8)  # a real model's images, here a 64-px one's
    for read in (detector.detect, detector.features):
        with pytest.raises(UserError, match="toy world's 32x32 images, not 64x64") as caught:
            read(big)
        assert "\n" not in str(caught.value)


def test_evaluator_round_trips(tiny_evaluator_dir):
    a = ToyEvaluator.load(tiny_evaluator_dir).predict(random_images(3))
    b = ToyEvaluator.load(tiny_evaluator_dir).predict(random_images(3))
    np.testing.assert_array_equal(a["features"], b["features"])


def test_frechet_distance_is_small_for_same_distribution_and_large_otherwise(tiny_evaluator_dir):
    features = build_detector("toy", weights=tiny_evaluator_dir).features
    a, b = random_images(200, seed=1), random_images(200, seed=2)
    dark = (random_images(200, seed=3) // 4).astype(np.uint8)
    assert frechet_distance(features(a), features(b)) < frechet_distance(features(a), features(dark))


def test_frechet_distance_matches_the_closed_form():
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), here with commuting diagonal covariances."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 1, (4000, 3)) * np.array([1.0, 2.0, 3.0]) + np.array([1.0, 0.0, -2.0])
    var_a, var_b = a.var(0, ddof=1), b.var(0, ddof=1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + (var_a + var_b - 2 * np.sqrt(var_a * var_b)).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_merged_shards_equal_the_whole():
    from relapse.measure.detectors import Detections, merge_detections

    rng = np.random.default_rng(0)
    whole = Detections(rng.random(7), rng.random(7) > 0.5, {"shape": np.array(list("abcdefg"), dtype=object)},
                       rng.random((7, 3)), {"aesthetic": rng.random(7)})
    shards = [list(range(rank, 7, 3)) for rank in range(3)]  # what 3 processes score
    parts = [(idx, Detections(whole.target_score[idx], whole.is_target[idx], {"shape": whole.attributes["shape"][idx]},
                              whole.features[idx], {"aesthetic": whole.scores["aesthetic"][idx]})) for idx in shards]
    merged = merge_detections(parts[::-1], 7)
    for name in ("target_score", "is_target", "features"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    assert merged.attributes["shape"].tolist() == list("abcdefg")
    np.testing.assert_array_equal(merged.scores["aesthetic"], whole.scores["aesthetic"])
    scorer_only = merge_detections([([1], Detections(scores={"s": np.array([2.0])})), ([0], Detections(scores={"s": np.array([1.0])}))], 2)
    assert scorer_only.is_target is None and scorer_only.scores["s"].tolist() == [1.0, 2.0]
