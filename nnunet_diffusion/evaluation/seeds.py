"""Seed variance of diffusion sampling (Fu et al., Table 4): how much Dice moves when only the noise seed changes.

Input is Dice shaped [seed, case, step]; the spread is max − min over seeds for each case and sampling step,
and the per-step summary is its mean over cases. NaN Dice (reference and prediction both empty) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeedSpread:
    """`per_case_step`: [case, step] max − min over seeds; `per_step`: [step] mean over cases."""
    per_case_step: np.ndarray
    per_step: np.ndarray


def seed_spread(dice: np.ndarray) -> SeedSpread:
    """Max − min Dice over seeds per case and step, and its mean over cases per step.

    A (case, step) whose Dice is NaN for some seeds uses the remaining seeds; one that is NaN for every seed is
    NaN and is left out of the per-step mean (a step that is NaN for every case stays NaN).
    """
    values = np.asarray(dice, dtype=float)
    if values.ndim != 3:
        raise ValueError(f"Dice must be shaped [seed, case, step], got {values.ndim} dimension(s) {values.shape}")
    num_seeds, num_cases, num_steps = values.shape
    if num_seeds < 2:
        raise ValueError(f"need Dice from at least 2 seeds to measure their spread, got {num_seeds} "
                         f"(is the array ordered [seed, case, step]?)")
    if num_cases == 0 or num_steps == 0:
        raise ValueError(f"Dice holds no cases or no steps: shape [seed, case, step] = {values.shape}")
    finite = values[~np.isnan(values)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"Dice must lie in [0, 1] (or be NaN), got values in [{finite.min()}, {finite.max()}]; "
                         f"pass fractions, not percentages")
    observed = ~np.isnan(values)
    any_observed = observed.any(axis=0)
    spread = np.full((num_cases, num_steps), np.nan)
    spread[any_observed] = (np.where(observed, values, -np.inf).max(axis=0)
                            - np.where(observed, values, np.inf).min(axis=0))[any_observed]
    counts = any_observed.sum(axis=0)
    per_step = np.full(num_steps, np.nan)
    per_step[counts > 0] = np.where(any_observed, spread, 0).sum(axis=0)[counts > 0] / counts[counts > 0]
    return SeedSpread(per_case_step=spread, per_step=per_step)
