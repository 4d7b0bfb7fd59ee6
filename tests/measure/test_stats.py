import pytest

from relapse.measure.stats import rate, wilson_interval


def test_wilson_matches_reference_values():
    # Reference: statsmodels proportion_confint(count, nobs, method="wilson")
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_rate_reports_n_and_k():
    r = rate([True, False, False, False])
    assert (r["rate"], r["n"], r["k"]) == (0.25, 4, 1)
    assert r["ci95"][0] < 0.25 < r["ci95"][1]
