"""Paired comparisons of two models on the same held-out cases: the mean per-case difference with scipy's
bootstrap interval, the Wilcoxon signed-rank test that Fu et al. use (scipy's), and the verdict at a margin."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import bootstrap, wilcoxon

BOOTSTRAP_RESAMPLES = 10000


def bootstrap_interval(values: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """scipy's percentile bootstrap interval of the mean over cases; seeded, so a table rebuilt from the same
    scores is the same. One case gives its value as both ends."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D array, got shape {values.shape}")
    if len(values) == 1 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def signed_rank_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when every difference is zero (scipy
    has no test to run then: nothing separates the two)."""
    differences = np.asarray(differences, dtype=float)
    if not np.any(differences):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedDifference:
    """A − B over the cases both were scored on."""
    a: str
    b: str
    cases: int
    mean: float
    interval_low: float
    interval_high: float
    p_signed_rank: float
    a_better: int  # cases where A scored higher

    @property
    def separated(self) -> bool:
        """Whether the 95 % interval excludes zero: the difference is beyond the case-to-case noise."""
        return self.interval_low > 0 or self.interval_high < 0

    def as_row(self) -> dict:
        return {**asdict(self), "separated": self.separated}


def common_scored_cases(scores_a: Mapping[str, float], scores_b: Mapping[str, float]) -> list[str]:
    """The cases both models were scored on; NaN scores (nothing to score in a case) are left out of a pairing."""
    return sorted(c for c in set(scores_a) & set(scores_b) if not (np.isnan(scores_a[c]) or np.isnan(scores_b[c])))


def paired_difference(a: str, b: str, scores_a: Mapping[str, float], scores_b: Mapping[str, float]
                      ) -> PairedDifference:
    """Compare two models on their common scored cases (scores are per case, e.g. Dice averaged over repeats)."""
    cases = common_scored_cases(scores_a, scores_b)
    if not cases:
        raise ValueError(f"{a} and {b} share no scored case; they cannot be compared")
    differences = np.array([scores_a[c] - scores_b[c] for c in cases])
    low, high = bootstrap_interval(differences)
    return PairedDifference(a, b, len(cases), float(differences.mean()), low, high, signed_rank_p(differences),
                            int((differences > 0).sum()))


BETTER, WORSE, ON_PAR, UNDECIDED = "A better", "B better", "on par", "undecided"
SIGNIFICANCE = 0.05


def verdict(difference: PairedDifference, margin: float, folds_a_better: int = 0, folds: int = 0) -> str:
    """The reading of A − B at an equivalence margin (Dice): on par when the 95 % interval lies inside ±margin;
    better or worse when it lies beyond the margin and the rest of the evidence agrees; otherwise undecided (the
    interval crosses a margin, or it excludes zero while the signed-rank test does not reject or most folds
    contradict the mean's sign)."""
    low, high = difference.interval_low, difference.interval_high
    if -margin <= low and high <= margin:
        return ON_PAR
    folds_disagree = folds > 1 and (folds_a_better < folds / 2 if difference.mean > 0 else
                                    folds_a_better > folds / 2)
    if difference.p_signed_rank >= SIGNIFICANCE or folds_disagree:
        return UNDECIDED
    if low > margin:
        return BETTER
    if high < -margin:
        return WORSE
    return UNDECIDED
