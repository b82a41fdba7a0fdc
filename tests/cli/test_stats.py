"""pgolf_lit.stats: the Student t distribution against closed forms, t tables and SciPy (when installed), and the
record test on hand-computed textbook examples, under both significance policies."""

from __future__ import annotations

import math

import pytest

from pgolf_lit.stats import (
    FINAL_POLICY,
    ORIGINAL_POLICY,
    StatsError,
    policy_tests,
    format_p,
    mean,
    one_sample_improvement_test,
    regularized_incomplete_beta,
    sample_std,
    student_t_cdf,
    student_t_sf,
    welch_improvement_test,
)

T_VALUES = [-60.0, -7.5, -2.0, -0.3, 0.0, 0.05, 0.9, 2.5, 6.0, 25.0, 300.0]


def test_mean_and_sample_std():
    assert mean([1, 2, 3, 4, 5]) == 3
    assert sample_std([1, 2, 3, 4, 5]) == pytest.approx(math.sqrt(2.5), rel=1e-15)  # Σ(x−3)² = 10, n − 1 = 4
    with pytest.raises(StatsError, match="at least 2"):
        sample_std([1.0])


@pytest.mark.parametrize("t", T_VALUES)
def test_t_cdf_matches_the_closed_forms_for_1_2_and_4_degrees_of_freedom(t):
    # ν = 1 is the Cauchy distribution; ν = 2 and ν = 4 have elementary CDFs.
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
    u = 1 + t * t / 4
    closed_4 = 0.5 + 3 / 8 * t / math.sqrt(u) * (1 - t * t / (12 * u))
    assert student_t_cdf(t, 4) == pytest.approx(closed_4, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("t", "df", "tail"), [(3.747, 4, 0.01), (1.812, 10, 0.05), (2.457, 30, 0.01), (6.965, 2, 0.01)]
)
def test_t_table_critical_values(t, df, tail):
    # one-sided critical values as printed in t tables (3 decimals)
    assert student_t_sf(t, df) == pytest.approx(tail, rel=2e-3)


def test_t_tails_at_infinity_and_symmetry():
    assert student_t_sf(math.inf, 3) == 0.0
    assert student_t_sf(-math.inf, 3) == 1.0
    assert student_t_sf(0.0, 7.5) == 0.5
    for t in T_VALUES:
        assert student_t_sf(t, 5.5) + student_t_sf(-t, 5.5) == pytest.approx(1.0, abs=1e-14)


def test_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    scipy_special = pytest.importorskip("scipy.special")
    for df in (1, 2.5, 3, 7.3, 30, 200, 5000):
        for t in T_VALUES:
            expected = float(scipy_stats.t.sf(t, df))
            assert student_t_sf(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-15), (t, df)
    for a, b in ((0.5, 0.5), (1.5, 0.5), (15.0, 0.5), (2.0, 3.0), (100.0, 0.5)):
        for x in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
            expected = float(scipy_special.betainc(a, b, x))
            assert regularized_incomplete_beta(a, b, x) == pytest.approx(expected, rel=1e-10, abs=1e-15), (a, b, x)


def test_one_sample_textbook_example():
    # x = 1..5: mean 3, s = √2.5; against baseline 5.005 with margin 0.005 the statistic is
    # t = (5.005 − 0.005 − 3) / (√2.5 / √5) = 2 / √0.5 = 2√2, 4 degrees of freedom; by the ν = 4 formula
    # P(T ≥ 2√2) = 1/2 − 3/8 · (2√2/√3) · (1 − 8/36) = 0.0237103...
    test = one_sample_improvement_test([1, 2, 3, 4, 5], 5.005, "toy loss")
    assert test.t == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert test.df == 4
    assert test.p == pytest.approx(0.5 - 3 / 8 * (2 * math.sqrt(2) / math.sqrt(3)) * (1 - 8 / 36), rel=1e-12)
    assert test.improvement == pytest.approx(2.005)
    assert not test.holds
    assert test.verdict() == "claim does NOT hold: p = 0.024 ≥ 0.01 for improvement ≥ 0.005 nats"


def test_one_sample_claim_holds_and_says_so():
    losses = [2.7950, 2.7962, 2.7958]  # three seeds, std 0.0006, 0.0090 nats better than the baseline
    test = one_sample_improvement_test(losses, 2.8047, "val_loss (nats/token) of the 'sliding' pass")
    assert test.holds
    assert test.verdict().startswith(f"claim holds: p = {format_p(test.p, 0.01)} < 0.01 for improvement ≥ 0.005 nats")
    assert "val_loss (nats/token) of the 'sliding' pass" in test.lines()[0]


def test_welch_textbook_example():
    # x = 1..5 (mean 3, s² = 2.5), y = 4, 6, 8 (mean 6, s² = 4), margin 1:
    # se² = 2.5/5 + 4/3 = 11/6; t = (6 − 1 − 3)/√(11/6); df = (11/6)² / ((1/2)²/4 + (4/3)²/2) = 3.5328...
    test = welch_improvement_test([1, 2, 3, 4, 5], [4, 6, 8], "toy loss", margin=1.0)
    assert test.t == pytest.approx(2 / math.sqrt(11 / 6), rel=1e-12)
    assert test.df == pytest.approx((11 / 6) ** 2 / (0.25 / 4 + (16 / 9) / 2), rel=1e-12)
    assert test.kind == "welch" and test.baseline_n == 3
    scipy_stats = pytest.importorskip("scipy.stats")
    shifted = [v - 1.0 for v in (4, 6, 8)]  # H0 with the margin moved into the baseline
    expected = scipy_stats.ttest_ind([1, 2, 3, 4, 5], shifted, equal_var=False, alternative="less").pvalue
    assert test.p == pytest.approx(float(expected), rel=1e-9)


def test_zero_spread_and_too_few_seeds():
    assert one_sample_improvement_test([1.0, 1.0], 2.0, "x").p == 0.0  # improvement 1 > margin, no noise
    assert one_sample_improvement_test([1.0, 1.0], 1.001, "x").p == 1.0  # improvement 0.001 < margin
    with pytest.raises(StatsError, match="at least 2 seeds of x"):
        one_sample_improvement_test([1.0], 2.0, "x")
    with pytest.raises(StatsError, match="at least 2 seeds on each side"):
        welch_improvement_test([1.0, 1.1], [2.0], "x")


def test_p_is_never_rounded_across_alpha():
    assert format_p(0.0003, 0.01) == "0.0003"
    assert format_p(0.00996, 0.01) == "0.00996"  # two digits would print 0.01 and contradict "< 0.01"
    assert format_p(0.0104, 0.01) == "0.01"  # 0.01 is not < 0.01: consistent with "does NOT hold"


def test_the_final_policy_is_welch_without_margin_at_a_quarter():
    # x = 1..5 (mean 3, s² = 2.5) against y = 4, 6, 8 (mean 6, s² = 4), no margin: t = 3/√(11/6), Welch's df as above.
    test = FINAL_POLICY.test([1, 2, 3, 4, 5], [4, 6, 8], "toy loss")
    df = (11 / 6) ** 2 / (0.25 / 4 + (16 / 9) / 2)
    assert (test.kind, test.policy, test.margin, test.alpha) == ("welch", "final", 0.0, 0.25)
    assert test.t == pytest.approx(3 / math.sqrt(11 / 6), rel=1e-12) and test.df == pytest.approx(df, rel=1e-12)
    assert test.p == pytest.approx(student_t_sf(3 / math.sqrt(11 / 6), df), rel=1e-12)
    assert test.verdict() == f"claim holds: p = {format_p(test.p, 0.25)} < 0.25 for an improvement over the baseline"
    with pytest.raises(StatsError, match="the final policy's Welch test needs the baseline's per-seed val_loss"):
        FINAL_POLICY.test([1, 2, 3], [5.0], "toy loss")


def test_the_policies_can_disagree_and_each_is_reported():
    # 0.002 nats better with a spread of 0.001 on each side: clear under the final policy, short of the
    # original's 0.005-nat margin.
    seeds, frontier = [2.318, 2.319, 2.320], [2.320, 2.321, 2.322]
    tests = policy_tests(seeds, frontier, "val_loss")
    assert tests["final"].holds and not tests["original"].holds
    assert (tests["original"].margin, tests["original"].alpha) == (ORIGINAL_POLICY.margin, 0.01) == (0.005, 0.01)
    against_a_number = policy_tests(seeds, [2.33], "val_loss")
    assert against_a_number["original"].kind == "one-sample"
    assert isinstance(against_a_number["final"], StatsError)
