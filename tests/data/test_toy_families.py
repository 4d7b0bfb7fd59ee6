import numpy as np
import pytest

from relapse.data import toy_families as tf
from relapse.data import toy_world as tw


@pytest.mark.parametrize("name", list(tf.RENDERED))
def test_every_family_draws_labelled_images_from_its_generator(name):
    make, target = tf.RENDERED[name]
    batch = make(np.random.default_rng(0), 12)
    assert batch.images.shape == (12, 32, 32, 3) and batch.images.dtype == np.uint8
    assert set(batch.labels) == set(tf.HEAD_CLASSES) and all(len(v) == 12 for v in batch.labels.values())
    assert (batch.labels["checkered"] == int(target)).all()  # the target head always knows what it must say
    again = make(np.random.default_rng(0), 12)
    assert np.array_equal(again.images, batch.images)  # a pure function of the generator
    assert not np.array_equal(make(np.random.default_rng(1), 12).images, batch.images)


def test_labels_name_the_world_attributes_or_unknown():
    batch = tf.RENDERED["fill_striped"][0](np.random.default_rng(0), 20)
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
