"""Summaries of the per-person table, bootstrap confidence intervals and group gaps.

Every summary figure is a mean over people of one per-person column (NaN where it does
not apply, e.g. the cost of a person without a valid answer), so one bootstrap serves
them all: resample people with replacement, recompute the mean, take the 2.5 and 97.5
percentiles. A group gap is the disadvantaged group's mean minus the other group's,
resampled within each group; a difference between two schemes is paired (the same people
answer under both), resampled by person.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]

CONFIDENCE = 0.95
GAP_METRICS = {
    "validity": "valid",
    "cost": "cost",
    "lof": "lof",
    "implausible (noise)": "implausible_noise",
}
"""Group-gap metric -> the per-person column it averages."""


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3, percent: bool = False) -> str:
        if np.isnan(self.value):
            return "n/a"
        scale, unit = (100.0, " pp") if percent else (1.0, "")
        return (
            f"{self.value * scale:+.{digits}f}{unit} "
            f"[{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
        )


class Bootstrap:
    """Percentile bootstrap with a fixed number of resamples and a seeded generator."""

    def __init__(self, resamples: int, seed: int) -> None:
        self.resamples = resamples
        self.seed = seed

    def _rng(self) -> np.random.Generator:
        # A fresh generator per estimate: a figure does not depend on which came before.
        return np.random.default_rng(self.seed)

    def _means(self, values: FloatArray, rng: np.random.Generator) -> FloatArray:
        picks = rng.integers(0, len(values), size=(self.resamples, len(values)))
        with _quiet():
            return np.nanmean(values[picks], axis=1)

    def mean(self, values: FloatArray) -> Estimate:
        values = np.asarray(values, dtype=float)
        if not np.isfinite(values).any():
            return Estimate(np.nan, np.nan, np.nan)
        return _estimate(np.nanmean(values), self._means(values, self._rng()))

    def gap(self, values: FloatArray, disadvantaged: npt.NDArray[np.bool_]) -> Estimate:
        """mean(disadvantaged) - mean(the others)."""
        values = np.asarray(values, dtype=float)
        a, b = values[disadvantaged], values[~disadvantaged]
        if not (np.isfinite(a).any() and np.isfinite(b).any()):
            return Estimate(np.nan, np.nan, np.nan)
        rng = self._rng()
        draws = self._means(a, rng) - self._means(b, rng)
        return _estimate(np.nanmean(a) - np.nanmean(b), draws)

    def paired_difference(self, a: FloatArray, b: FloatArray) -> Estimate:
        """mean(a) - mean(b) over the same people (NaNs dropped per column)."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if not (np.isfinite(a).any() and np.isfinite(b).any()):
            return Estimate(np.nan, np.nan, np.nan)
        picks = self._rng().integers(0, len(a), size=(self.resamples, len(a)))
        with _quiet():
            draws = np.nanmean(a[picks], axis=1) - np.nanmean(b[picks], axis=1)
        return _estimate(np.nanmean(a) - np.nanmean(b), draws)


def _estimate(value: float, draws: FloatArray) -> Estimate:
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return Estimate(float(value), np.nan, np.nan)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": a NaN here
        yield


def summarize(people: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per ``keys`` combination: the report's per-method figures."""

    def row(group: pd.DataFrame) -> pd.Series:
        valid = group["valid"].to_numpy(dtype=bool)
        answered = group["answered"].to_numpy(dtype=bool)
        ratio = group["cost_ratio"].to_numpy(dtype=float)
        ratio = ratio[np.isfinite(ratio)]
        with _quiet():
            return pd.Series(
                {
                    "people": len(group),
                    "feasibility": group["feasible"].mean(),
                    "validity": valid.mean(),
                    "answered": answered.mean(),
                    "violates_constraints": np.mean(~group["respects_constraints"][answered])
                    if answered.any()
                    else np.nan,
                    "rejected_in_world": np.mean(~group["accepted"][answered])
                    if answered.any()
                    else np.nan,
                    "cost_mean": group["cost"].mean(),
                    "universal_cost_mean": group["universal_cost"].mean(),
                    "cost_ratio_mean": ratio.mean() if ratio.size else np.nan,
                    "cost_ratio_median": np.median(ratio) if ratio.size else np.nan,
                    "cost_ratio_p95": np.percentile(ratio, 95) if ratio.size else np.nan,
                    "below_optimum": group["below_optimum"].mean(),
                    "features_changed": group["n_changed"].mean(),
                    "lof_mean": group["lof"].mean(),
                    "implausible_lof": group["implausible_lof"].mean(),
                    "noise_loglik_median": group["noise_loglik"].median(),
                    "implausible_noise": group["implausible_noise"].mean(),
                    "ms_per_person": 1e3 * group["seconds"].median(),
                    "ms_per_person_mean": 1e3 * group["seconds"].mean(),
                }
            )

    return people.groupby(list(keys), sort=False).apply(row, include_groups=False).reset_index()


def group_gaps(
    people: pd.DataFrame, keys: Sequence[str], attributes: Sequence[str], bootstrap: Bootstrap
) -> pd.DataFrame:
    """Per ``keys`` combination, group attribute and :data:`GAP_METRICS` entry: each
    group's mean, the gap (disadvantaged minus the others) with its bootstrap interval, and
    the group sizes."""
    rows = []
    for key, group in people.groupby(list(keys), sort=False):
        for attribute in attributes:
            disadvantaged = group[f"group.{attribute}"].to_numpy(dtype=bool)
            for metric, column in GAP_METRICS.items():
                values = group[column].to_numpy(dtype=float)
                estimate = bootstrap.gap(values, disadvantaged)
                with _quiet():
                    means = np.nanmean(values[disadvantaged]), np.nanmean(values[~disadvantaged])
                rows.append(
                    {
                        **dict(zip(keys, key, strict=True)),
                        "attribute": attribute,
                        "metric": metric,
                        "disadvantaged": means[0],
                        "others": means[1],
                        "gap": estimate.value,
                        "low": estimate.low,
                        "high": estimate.high,
                        "n_disadvantaged": int(disadvantaged.sum()),
                        "n_others": int((~disadvantaged).sum()),
                    }
                )
    return pd.DataFrame(rows)
