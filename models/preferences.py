"""One person's individual actionability: hard constraints and soft preferences.

Hard constraints (never violated by an answer):
- ``locks``: features this person cannot change (a categorical feature's name locks all of
  its one-hot levels);
- ``bounds``: the interval a value this person sets must lie in;
- ``directions``: ``increase`` (the new value is at least the current one) or ``decrease``;
- ``max_changes``: the most features acted on.

Soft constraints (they shape the cost):
- a ``rank`` of actionable features, easiest first, or a ``score`` per feature from 1 (very
  hard to change) to 5 (very easy), mapped to cost weights by a :class:`WeightScheme`;
- ``soft_limits``: a change beyond ``limit`` (in the feature's units) costs ``penalty`` per
  unit on top of the ordinary cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.scm import StructuralCausalModel, Variable, VariableType

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
SCORE_MIN, SCORE_MAX = 1, 5


class PreferenceError(ValueError):
    """A person's constraints or preferences break a rule; the message names the field."""


@dataclass(frozen=True)
class WeightScheme:
    """How rankings and scores become cost weights (a larger weight: a harder change).

    ``mapping="linear"``: the feature ranked r-th (1 = easiest) gets weight
    ``1 + step * (r - 1)``; a feature scored s gets ``1 + step * (SCORE_MAX - s)``.
    ``mapping="exponential"``: ``base ** (r - 1)`` and ``base ** (SCORE_MAX - s)``.
    Features left out of a partial ranking share the weight of the next rank; features left
    out of a scoring get the weight of the middle score (3). Weights are then divided by
    their mean over the actionable features, so that personalization moves costs between
    features without changing their overall scale.
    """

    mapping: str = "linear"
    step: float = 1.0
    base: float = 2.0
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mapping not in ("linear", "exponential"):
            raise PreferenceError(
                f"The weight scheme's 'mapping' must be 'linear' or 'exponential'. "
                f"Got {self.mapping!r} instead."
            )
        if not (self.step > 0 and self.base > 1):
            raise PreferenceError("The weight scheme needs 'step' > 0 and 'base' > 1.")

    def _level_weight(self, level: float) -> float:
        if self.mapping == "linear":
            return 1.0 + self.step * level
        return float(self.base**level)

    def from_rank(self, rank: Sequence[str], actionable: Sequence[str]) -> dict[str, float]:
        weights = {name: self._level_weight(position) for position, name in enumerate(rank)}
        for name in actionable:
            weights.setdefault(name, self._level_weight(len(rank)))
        return self._normalized(weights, actionable)

    def from_scores(
        self, scores: Mapping[str, float], actionable: Sequence[str]
    ) -> dict[str, float]:
        middle = (SCORE_MIN + SCORE_MAX) / 2
        weights = {
            name: self._level_weight(SCORE_MAX - scores.get(name, middle)) for name in actionable
        }
        return self._normalized(weights, actionable)

    def _normalized(self, weights: dict[str, float], actionable: Sequence[str]) -> dict[str, float]:
        if not self.normalize:
            return weights
        mean = sum(weights[name] for name in actionable) / len(actionable)
        return {name: weight / mean for name, weight in weights.items()}


@dataclass(frozen=True)
class SoftLimit:
    limit: float
    penalty: float


@dataclass(frozen=True)
class PersonConstraints:
    """Validated individual actionability of one person (see the module docstring)."""

    locks: frozenset[str] = frozenset()
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    directions: Mapping[str, str] = field(default_factory=dict)
    max_changes: int | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    soft_limits: Mapping[str, SoftLimit] = field(default_factory=dict)
    rank: tuple[str, ...] | None = None
    scores: Mapping[str, float] | None = None

    def weight(self, name: str) -> float:
        return float(self.weights.get(name, 1.0))

    def interval(self, var: Variable, current: float) -> tuple[float, float]:
        """The values this person may set ``var`` to: its bounds (else the domain), cut by
        the direction at ``current``; empty when the first end exceeds the second."""
        lower, upper = self.bounds.get(var.name, (var.lower, var.upper))
        direction = self.directions.get(var.name)
        if direction == "increase":
            lower = max(lower, current)
        elif direction == "decrease":
            upper = min(upper, current)
        return lower, upper

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "lock": sorted(self.locks),
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "direction": dict(self.directions),
            "max_changes": self.max_changes,
            "soft_limits": {
                k: {"limit": v.limit, "penalty": v.penalty} for k, v in self.soft_limits.items()
            },
            "weights": dict(self.weights),
        }
        if self.rank is not None:
            data["rank"] = list(self.rank)
        if self.scores is not None:
            data["score"] = dict(self.scores)
        return data


def parse_constraints(
    raw: Mapping[str, Any] | None,
    scm: StructuralCausalModel,
    scheme: WeightScheme | None = None,
    *,
    who: str = "the individual",
) -> PersonConstraints:
    """Validate a constraints document against ``scm`` and resolve preferences to weights.

    Keys: ``lock`` (list), ``bounds`` ({feature: [lower, upper]}, ``null`` for an open side),
    ``direction`` ({feature: "increase" | "decrease"}), ``max_changes`` (int), ``rank``
    (list, easiest first), ``score`` ({feature: 1..5}), ``weights`` ({feature: > 0}, given
    directly), ``soft_limits`` ({feature: {"limit": >= 0, "penalty": >= 0}}).
    ``who`` names the person in error messages (e.g. "individual 17").
    """
    raw = dict(raw or {})
    scheme = scheme or WeightScheme()
    known = {
        "lock",
        "bounds",
        "direction",
        "max_changes",
        "rank",
        "score",
        "weights",
        "soft_limits",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PreferenceError(
            f"The constraints of {who} have unknown keys {unknown}; "
            f"allowed keys are {sorted(known)}."
        )
    actionable = scm.actionable
    variables = {v.name: v for v in scm.variables}

    def check_feature(name: Any, field_name: str, *, actionable_only: bool) -> str:
        if name not in variables:
            raise PreferenceError(
                f"The '{field_name}' of {who} names {name!r}, which is not a feature; features are "
                f"{list(scm.names)}."
            )
        if actionable_only and name not in actionable:
            raise PreferenceError(
                f"The '{field_name}' of {who} names {name!r}, which is "
                f"{variables[name].role.value}; only actionable features {list(actionable)} "
                f"may appear there."
            )
        return str(name)

    def finite_number(value: Any, field_name: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise PreferenceError(
                f"The '{field_name}' of {who} must be a finite number. Got {value!r} instead."
            )
        return float(value)

    locks_raw = raw.get("lock", [])
    if isinstance(locks_raw, str) or not isinstance(locks_raw, Sequence):
        raise PreferenceError(f"The 'lock' of {who} must be a list of features. Got {locks_raw!r}.")
    # A categorical feature's name locks all of its one-hot levels.
    locks = frozenset(
        level
        for n in locks_raw
        for level in (
            scm.one_hot[n]
            if isinstance(n, str) and n in scm.one_hot
            else (check_feature(n, "lock", actionable_only=False),)
        )
    )

    bounds: dict[str, tuple[float, float]] = {}
    for name, pair in _mapping(raw.get("bounds", {}), "bounds", who).items():
        check_feature(name, "bounds", actionable_only=True)
        var = variables[name]
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise PreferenceError(
                f"The 'bounds' of {who} for {name!r} must be [lower, upper]. Got {pair!r} instead."
            )
        lower = var.lower if pair[0] is None else finite_number(pair[0], f"bounds.{name}")
        upper = var.upper if pair[1] is None else finite_number(pair[1], f"bounds.{name}")
        if lower > upper or lower > var.upper or upper < var.lower:
            raise PreferenceError(
                f"The 'bounds' of {who} for {name!r} must satisfy lower <= upper and overlap the "
                f"feature's domain [{var.lower}, {var.upper}]. Got [{lower}, {upper}] instead."
            )
        bounds[name] = (max(lower, var.lower), min(upper, var.upper))

    directions: dict[str, str] = {}
    for name, direction in _mapping(raw.get("direction", {}), "direction", who).items():
        check_feature(name, "direction", actionable_only=True)
        if direction not in ("increase", "decrease"):
            raise PreferenceError(
                f"The 'direction' of {who} for {name!r} must be 'increase' or 'decrease'. "
                f"Got {direction!r} instead."
            )
        directions[name] = direction

    max_changes = raw.get("max_changes")
    if max_changes is not None and (
        isinstance(max_changes, bool) or not isinstance(max_changes, int) or max_changes < 0
    ):
        raise PreferenceError(
            f"The 'max_changes' of {who} must be a whole number >= 0. Got {max_changes!r} instead."
        )

    rank: tuple[str, ...] | None = None
    scores: dict[str, float] | None = None
    preference_keys = [key for key in ("rank", "score", "weights") if key in raw]
    if len(preference_keys) > 1:
        raise PreferenceError(
            f"The constraints of {who} give {preference_keys}; give at most one of 'rank', "
            f"'score' and 'weights'."
        )
    weights = {name: 1.0 for name in actionable}
    if "rank" in raw:
        rank_raw = raw["rank"]
        if isinstance(rank_raw, str) or not isinstance(rank_raw, Sequence) or not rank_raw:
            raise PreferenceError(
                f"The 'rank' of {who} must be a non-empty list of actionable features. "
                f"Got {rank_raw!r} instead."
            )
        rank = tuple(check_feature(n, "rank", actionable_only=True) for n in rank_raw)
        if len(set(rank)) != len(rank):
            raise PreferenceError(
                f"The 'rank' of {who} must list each actionable feature once. "
                f"Got {list(rank)} instead."
            )
        weights = scheme.from_rank(rank, actionable)
    elif "score" in raw:
        scores = {}
        for name, score in _mapping(raw["score"], "score", who).items():
            check_feature(name, "score", actionable_only=True)
            value = finite_number(score, f"score.{name}")
            if not SCORE_MIN <= value <= SCORE_MAX:
                raise PreferenceError(
                    f"The 'score' of {who} for {name!r} must be between {SCORE_MIN} (very hard) "
                    f"and {SCORE_MAX} (very easy). Got {score!r} instead."
                )
            scores[name] = value
        weights = scheme.from_scores(scores, actionable)
    elif "weights" in raw:
        for name, weight in _mapping(raw["weights"], "weights", who).items():
            check_feature(name, "weights", actionable_only=True)
            value = finite_number(weight, f"weights.{name}")
            if value <= 0:
                raise PreferenceError(
                    f"The 'weights' of {who} for {name!r} must be > 0. Got {weight!r} instead."
                )
            weights[name] = value

    soft_limits: dict[str, SoftLimit] = {}
    for name, spec in _mapping(raw.get("soft_limits", {}), "soft_limits", who).items():
        check_feature(name, "soft_limits", actionable_only=True)
        spec = _mapping(spec, f"soft_limits.{name}", who)
        limit = finite_number(spec.get("limit"), f"soft_limits.{name}.limit")
        penalty = finite_number(spec.get("penalty"), f"soft_limits.{name}.penalty")
        if limit < 0 or penalty < 0:
            raise PreferenceError(
                f"The 'soft_limits' of {who} for {name!r} need limit >= 0 and penalty >= 0. "
                f"Got limit {limit} and penalty {penalty} instead."
            )
        soft_limits[name] = SoftLimit(limit, penalty)

    return PersonConstraints(
        locks=locks,
        bounds=bounds,
        directions=directions,
        max_changes=max_changes,
        weights=weights,
        soft_limits=soft_limits,
        rank=rank,
        scores=scores,
    )


def _mapping(value: Any, field_name: str, who: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PreferenceError(
            f"The '{field_name}' of {who} must be an object {{feature: value}}. Got {value!r}."
        )
    return value


@dataclass(frozen=True, eq=False)
class ConstraintArrays:
    """Many people's hard and soft constraints, one column per actionable feature."""

    locked: BoolArray
    """The person may not act on k (a lock, or no value left in their interval)."""
    lower: FloatArray
    upper: FloatArray
    """The values k may be set to: domain, bounds and direction; integer ends for integers."""
    weight: FloatArray
    soft_limit: FloatArray
    """Largest change without penalty (inf: no soft limit)."""
    soft_penalty: FloatArray
    max_changes: IntArray
    """Most features acted on (K when unlimited)."""

    @classmethod
    def from_constraints(
        cls, scm: StructuralCausalModel, x: FloatArray, constraints: Sequence[PersonConstraints]
    ) -> ConstraintArrays:
        x = np.atleast_2d(x)
        n, actionable = len(constraints), scm.actionable
        shape = (n, len(actionable))
        lower, upper = np.empty(shape), np.empty(shape)
        weight, soft_limit, soft_penalty = np.ones(shape), np.full(shape, np.inf), np.zeros(shape)
        locked = np.zeros(shape, dtype=bool)
        max_changes = np.full(n, len(actionable), dtype=np.int64)
        for i, person in enumerate(constraints):
            if person.max_changes is not None:
                max_changes[i] = min(person.max_changes, len(actionable))
            for k, name in enumerate(actionable):
                var = scm.variables[scm.index[name]]
                lo, hi = person.interval(var, x[i, scm.index[name]])
                if var.type is not VariableType.CONTINUOUS:
                    lo, hi = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
                lower[i, k], upper[i, k] = lo, hi
                locked[i, k] = name in person.locks or lo > hi
                weight[i, k] = person.weight(name)
                limit = person.soft_limits.get(name)
                if limit is not None:
                    soft_limit[i, k], soft_penalty[i, k] = limit.limit, limit.penalty
        return cls(locked, lower, upper, weight, soft_limit, soft_penalty, max_changes)

    @property
    def size(self) -> int:
        return int(self.locked.shape[0])

    def take(self, rows: IntArray | BoolArray | slice) -> ConstraintArrays:
        """The people ``rows``: indices, a mask over all of them, or a slice (views)."""
        if isinstance(rows, np.ndarray) and rows.dtype == np.bool_ and rows.shape == (self.size,):
            rows = np.flatnonzero(rows)
        arrays = (
            self.locked,
            self.lower,
            self.upper,
            self.weight,
            self.soft_limit,
            self.soft_penalty,
            self.max_changes,
        )
        if isinstance(rows, np.ndarray) and rows.dtype.kind in "iu":
            # ndarray.take: the rows of fancy indexing at a third of its fixed cost per call,
            # which is nearly all the time for one person.
            return ConstraintArrays(*[a.take(rows, axis=0) for a in arrays])
        return ConstraintArrays(*[a[rows] for a in arrays])
