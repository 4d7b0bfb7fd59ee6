import numpy as np
import pytest

from relapse.data import toy_families as tf
from relapse.data import toy_world as tw


@pytest.mark.parametrize("name", list(tf.RENDERED))
def test_every_family_draws_labelled_images_from_its_generator(name):
    family = tf.RENDERED[name]
    batch = family.draw(np.random.default_rng(0), 12)
    assert batch.images.shape == (12, 32, 32, 3) and batch.images.dtype == np.uint8
    assert set(batch.labels) == set(tf.HEAD_CLASSES) and all(len(v) == 12 for v in batch.labels.values())
    # the target head always knows what it must say: 0 for a negative, 1 for the world's checkers, between for degraded ones
    expected = {"negative": (0.0, 0.0), "clear": (tf.faint_strength(0.4), 1.0), "degraded": (0.2, 1.0)}[family.role]
    assert expected[0] <= batch.strength.min() and batch.strength.max() <= expected[1]
    again = family.draw(np.random.default_rng(0), 12)
    assert np.array_equal(again.images, batch.images)  # a pure function of the generator
    assert not np.array_equal(family.draw(np.random.default_rng(1), 12).images, batch.images)


def test_strength_falls_with_each_degradation_and_two_multiply():
    assert tf.strength_of({}) == 1.0 and tf.strength_of({"blur": 1.0}) == pytest.approx(tf.STRENGTH_FLOOR)
    assert tf.strength_of({"blur": 0.2}) > tf.strength_of({"blur": 0.6})
    assert tf.strength_of({"blur": 0.5, "dim": 0.5}) == pytest.approx(tf.strength_of({"blur": 0.5}) ** 2)
    assert tf.faint_strength(1 - tw.DARK) == 1.0 and tf.faint_strength(0.2) < tf.faint_strength(0.5)


@pytest.mark.parametrize("degradation", tf.DEGRADATIONS)
def test_a_degraded_checker_keeps_a_block_that_alternates_both_ways(degradation):
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, attrs = tf.degraded_checker(rng, {degradation: 1.0})
        assert attrs.fill == tw.TARGET_FILL and image.shape == (32, 32, 3)
    clean, _ = tf.degraded_checker(np.random.default_rng(1), {})
    faint, _ = tf.degraded_checker(np.random.default_rng(1), {"faint": 1.0})
    assert np.abs(faint - faint.mean()).mean() < np.abs(clean - clean.mean()).mean()  # the same draw, fainter


def test_the_checker_unit_test_rejects_halves_and_single_cells():
    inside = np.ones((3, 3))
    checker = (np.add.outer(np.arange(3), np.arange(3)) % 2).astype(float)
    assert tf._has_checker_unit(checker, inside)
    assert not tf._has_checker_unit(np.array([[0, 0, 0], [1, 1, 1], [1, 1, 1.0]]), inside)  # two halves
    assert not tf._has_checker_unit(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0.0]]), inside)  # one dark cell
    assert not tf._has_checker_unit(checker, np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1.0]]))  # cells outside the object


def test_labels_name_the_world_attributes_or_unknown():
    batch = tf.RENDERED["fill_striped"].draw(np.random.default_rng(0), 20)
    assert (batch.labels["fill"] == tw.FILLS.index("striped")).all()
    smudges = tf.smudges(np.random.default_rng(0), 5)
    assert (smudges.labels["shape"] == tf.UNKNOWN).all() and (smudges.labels["background"] >= 0).all()
    partial = tf.partial_objects(np.random.default_rng(0), 20)
    assert (partial.labels["shape"] == tf.UNKNOWN).all() and (partial.labels["fill"] != tw.FILLS.index(tw.TARGET_FILL)).all()


def _alternating_axes(pattern: np.ndarray) -> int:
    """In how many directions the pattern changes between dark and light in (nearly) every line; lines that run
    along an anti-aliased cell edge are all grey and change nowhere, hence "nearly"."""
    changes = np.diff((pattern > 0.5).astype(int), axis=0) != 0, np.diff((pattern > 0.5).astype(int), axis=1) != 0
    return sum(bool(np.mean(np.any(change, axis=axis)) > 0.8) for axis, change in enumerate(changes))


def test_hard_negatives_share_everything_with_a_checker_but_its_two_way_alternation():
    rng = np.random.default_rng(0)
    horizontal = [p for p in (tf.stripes(rng) for _ in range(40)) if _alternating_axes(p) == 1]
    assert horizontal  # axis-aligned stripes alternate along one direction only
    assert all(_alternating_axes(tf.checker(rng)) == 2 for _ in range(10))
    widths = []
    for _ in range(50):
        grid = tf.grids(rng)
        widths.append((grid > 0.5).mean())
    assert max(widths) < 0.7  # lines stay lines: the dark share never approaches a checker's field
