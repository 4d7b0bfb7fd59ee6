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


def test_t_quantiles_match_the_tables():
    from relapse.measure.stats import t_quantile

    assert [round(t_quantile(df), 3) for df in (1, 2, 8, 26)] == [12.706, 4.303, 2.306, 2.056]


def test_a_seed_interval_widens_with_the_spread_between_runs():
    from relapse.measure.stats import seed_interval

    tight, loose = seed_interval([0.5, 0.5, 0.5]), seed_interval([0.2, 0.5, 0.8])
    assert tight["ci95"] == [0.5, 0.5] and loose["mean"] == 0.5
    assert abs(loose["ci95"][1] - 0.5 - 4.303 * 0.3 / 3**0.5) < 1e-3
