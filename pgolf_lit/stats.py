"""The statistics a record claim needs: mean, sample standard deviation, and one-sided t-tests that a set of
seeds improves on a baseline by at least a margin, under either of the challenge's two significance policies:

* ``original`` (the README's rule from the start): an improvement of at least 0.005 nats at p < 0.01, one-sided;
* ``final`` (the leaderboard's policy at the close, PR #1902): a one-sided Welch t-test at p < 0.25 that the seeds
  improve on the chronological frontier (the record that was best when the pull request was opened), no margin.

Lower is better (the tested metric is a loss). The null hypothesis is "the true improvement is at most the
margin"; a small p rejects it. Against a single number the test is a one-sample t-test on the seeds; against
another set of seeds it is Welch's two-sample test (unequal variances), since the baseline's seeds ran
elsewhere, on other hardware and code.

The Student t distribution is computed here through the regularized incomplete beta function, so the
package needs no SciPy at run time (the tests compare against SciPy when it is installed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from pgolf_lit.errors import PgolfError

RECORD_MARGIN_NATS = 0.005
RECORD_ALPHA = 0.01


class StatsError(PgolfError, ValueError):
    """Too few values for the statistic asked for (names what is missing)."""


def mean(values: Sequence[float]) -> float:
    if not values:
        raise StatsError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n − 1), the one records quote and the t-test uses."""
    if len(values) < 2:
        raise StatsError(f"a sample standard deviation needs at least 2 values, got {len(values)}")
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------------------------------------------
# Student's t distribution
# ---------------------------------------------------------------------------------------------------------


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), by the continued fraction (Numerical Recipes §6.4) on the side where it converges fast."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def student_t_sf(t: float, df: float) -> float:
    """P(T ≥ t) for Student's t with ``df`` degrees of freedom (any real df > 0; Welch's df is fractional).

    P(|T| ≥ |t|) = I_{df/(df+t²)}(df/2, 1/2); half of it is the tail on t's side.
    """
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """P(T ≤ t)."""
    return 1.0 - student_t_sf(t, df)


# ---------------------------------------------------------------------------------------------------------
# The record test
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImprovementTest:
    """A one-sided test of "candidate mean < baseline mean − margin" and everything needed to quote it."""

    kind: str  # "one-sample" (baseline is a number) or "welch" (baseline is a set of seeds)
    metric: str  # what was tested, e.g. "val_loss (nats/token) of the sliding pass"
    unit: str  # the margin's unit, e.g. "nats"
    n: int
    mean: float
    std: float
    baseline_mean: float
    baseline_n: int  # 1 for a number
    baseline_std: Optional[float]  # None for a number
    margin: float
    alpha: float
    t: float
    df: float
    p: float
    policy: Optional[str] = None  # the significance policy whose margin and alpha these are (POLICIES)

    @property
    def improvement(self) -> float:
        return self.baseline_mean - self.mean

    @property
    def holds(self) -> bool:
        return self.p < self.alpha

    def verdict(self) -> str:
        """One line that says plainly whether the claim holds, with the p-value and the margin."""
        p = format_p(self.p, self.alpha)
        claim = f"improvement ≥ {self.margin:g} {self.unit}" if self.margin else "an improvement over the baseline"
        if self.holds:
            return f"claim holds: p = {p} < {self.alpha:g} for {claim}"
        return f"claim does NOT hold: p = {p} ≥ {self.alpha:g} for {claim}"

    def lines(self) -> list[str]:
        """The verdict with its inputs: what was tested, against what, the test and its statistic."""
        if self.kind == "welch":
            against = f"{self.baseline_n} baseline seeds, mean {self.baseline_mean:.8f} (std {self.baseline_std:.8f})"
            test = f"Welch two-sample t-test, one-sided: t = {self.t:.4f}, df = {self.df:.2f}"
        else:
            against = f"baseline {self.baseline_mean:.8f}"
            test = f"one-sample t-test, one-sided: t = {self.t:.4f}, df = {self.df:g}"
        return [
            f"tested metric: {self.metric}; lower is better",
            f"{self.n} seeds: mean {self.mean:.8f} (std {self.std:.8f}) against {against}",
            f"mean improvement {self.improvement:.8f} {self.unit}; "
            + (f"required ≥ {self.margin:g} {self.unit}" if self.margin else "required > 0")
            + f" at p < {self.alpha:g}",
            test,
            self.verdict(),
        ]


def format_p(p: float, alpha: float) -> str:
    """p with two significant digits, or more where two would round it onto the other side of alpha."""
    for digits in range(2, 8):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha):
            return text
    return repr(p)


def _t_statistic(difference: float, standard_error: float) -> float:
    """difference / standard_error; with zero spread the sign of the difference decides (t = ±inf)."""
    if standard_error > 0:
        return difference / standard_error
    return math.copysign(math.inf, difference) if difference else 0.0


def one_sample_improvement_test(
    values: Sequence[float],
    baseline: float,
    metric: str,
    margin: float = RECORD_MARGIN_NATS,
    alpha: float = RECORD_ALPHA,
    unit: str = "nats",
) -> ImprovementTest:
    """H0: mean(values) ≥ baseline − margin; one-sample t-test with n − 1 degrees of freedom."""
    if len(values) < 2:
        raise StatsError(f"a t-test needs at least 2 seeds of {metric}, got {len(values)}")
    m, s, n = mean(values), sample_std(values), len(values)
    t = _t_statistic(baseline - margin - m, s / math.sqrt(n))
    return ImprovementTest(
        kind="one-sample",
        metric=metric,
        unit=unit,
        n=n,
        mean=m,
        std=s,
        baseline_mean=baseline,
        baseline_n=1,
        baseline_std=None,
        margin=margin,
        alpha=alpha,
        t=t,
        df=n - 1,
        p=student_t_sf(t, n - 1),
    )


def welch_improvement_test(
    values: Sequence[float],
    baseline_values: Sequence[float],
    metric: str,
    margin: float = RECORD_MARGIN_NATS,
    alpha: float = RECORD_ALPHA,
    unit: str = "nats",
) -> ImprovementTest:
    """H0: mean(values) ≥ mean(baseline_values) − margin; Welch's t, Welch–Satterthwaite degrees of freedom."""
    if len(values) < 2 or len(baseline_values) < 2:
        raise StatsError(
            f"Welch's t-test needs at least 2 seeds on each side, got {len(values)} and {len(baseline_values)}"
        )
    m1, s1, n1 = mean(values), sample_std(values), len(values)
    m2, s2, n2 = mean(baseline_values), sample_std(baseline_values), len(baseline_values)
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    t = _t_statistic(m2 - margin - m1, math.sqrt(v1 + v2))
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1)) if v1 + v2 > 0 else float(n1 + n2 - 2)
    return ImprovementTest(
        kind="welch",
        metric=metric,
        unit=unit,
        n=n1,
        mean=m1,
        std=s1,
        baseline_mean=m2,
        baseline_n=n2,
        baseline_std=s2,
        margin=margin,
        alpha=alpha,
        t=t,
        df=df,
        p=student_t_sf(t, df),
    )


# ---------------------------------------------------------------------------------------------------------
# The significance policies
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignificancePolicy:
    """A rule a record claim is judged by: the improvement it requires, at what p, against what baseline."""

    name: str
    margin: float  # nats per token the improvement must exceed under H1
    alpha: float
    welch_only: bool  # the baseline must be a set of seeds (a Welch test), not one number
    rule: str  # the rule in one line, for --help and the reports

    def test(self, values: Sequence[float], baseline: Sequence[float], metric: str) -> ImprovementTest:
        """The policy's test of ``values`` (the seeds' val_loss) against ``baseline`` (one value or several
        seeds): one-sample against one value, Welch against several."""
        if len(baseline) == 1:
            if self.welch_only:
                raise StatsError(
                    f"the {self.name} policy's Welch test needs the baseline's per-seed val_loss (at least 2 "
                    f"seeds: a results.json or a submission.json with seed_results), got one value"
                )
            test = one_sample_improvement_test(values, baseline[0], metric, self.margin, self.alpha)
        else:
            test = welch_improvement_test(values, baseline, metric, self.margin, self.alpha)
        return dataclasses.replace(test, policy=self.name)


ORIGINAL_POLICY = SignificancePolicy(
    "original",
    RECORD_MARGIN_NATS,
    RECORD_ALPHA,
    welch_only=False,
    rule=f"improvement ≥ {RECORD_MARGIN_NATS} nats at p < {RECORD_ALPHA}, one-sided (the challenge README's rule)",
)
FINAL_POLICY = SignificancePolicy(
    "final",
    0.0,
    0.25,
    welch_only=True,
    rule="one-sided Welch t-test at p < 0.25 against the chronological frontier, the record that was best when the "
    "pull request was opened (the leaderboard's policy at the close, PR #1902)",
)
POLICIES = {policy.name: policy for policy in (ORIGINAL_POLICY, FINAL_POLICY)}
DEFAULT_POLICY = ORIGINAL_POLICY.name


def policy_tests(
    values: Sequence[float], baseline: Sequence[float], metric: str
) -> dict[str, ImprovementTest | StatsError]:
    """Each policy's test, or the StatsError that says why it cannot be run (too few seeds on a side)."""
    out: dict[str, ImprovementTest | StatsError] = {}
    for name, policy in POLICIES.items():
        try:
            out[name] = policy.test(values, baseline, metric)
        except StatsError as e:
            out[name] = e
    return out
