import numpy as np
import pytest

from relapse.measure.cmmd import cmmd


def test_cmmd_matches_a_hand_computed_value():
    """x = {e1, e2}, y = {e1, e1}: k(e1, e2) = exp(-2 / 200) = e; K_xx = (2 + 2e) / 4, K_yy = 1, K_xy = (2 + 2e) / 4,
    so CMMD = 1000 (K_xx + K_yy - 2 K_xy) = 1000 (1 - e) / 2."""
    x, y = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])
    assert cmmd(x, y) == pytest.approx(1000 * (1 - np.exp(-0.01)) / 2, rel=1e-12)  # 4.97508...


def test_cmmd_normalises_embeddings_is_symmetric_and_zero_on_one_set():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 8)), rng.normal(loc=0.5, size=(30, 8))
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-12)
    assert cmmd(3 * x, y) == pytest.approx(cmmd(x, y), rel=1e-9)  # scale-free: unit norms, as CMMD's embeddings
    assert cmmd(x, y) > cmmd(x, rng.normal(size=(30, 8)))  # a shifted set is further than one from the same law
