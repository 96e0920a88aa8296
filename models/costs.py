"""Cost profiles: what an action costs one person.

With ``delta_k = theta_k - x_k`` the change an intervention makes to feature k, ``w_k``
the person's weight (1 unless preferences say otherwise) and ``m_k`` = 1 when k is acted on:

- ``l1`` (default): ``sum_k m_k w_k |delta_k| / s_k`` with ``s_k`` the feature's standard
  deviation in the classifier's training data: a change of one standard deviation in a
  feature of weight 1 costs 1.
- ``carma``: CARMA's range-normalized squared cost (Majumdar and Valera, 2024),
  ``(1/K) sum_k m_k w_k (delta_k / s_k)^2 / r_k`` with K the number of actionable features
  and ``r_k`` the feature's range in the training data in standard deviations. CARMA
  reports it multiplied by 100; this project reports it as is.

Both add ``sparsity * sum_k m_k`` and, for each soft limit, ``penalty * max(0, |delta_k| -
limit)``. Only changes an action makes are paid for: features that move because their
parents moved cost nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from models.classifiers import Classifier
from models.preferences import ConstraintArrays, PersonConstraints
from models.scm import StructuralCausalModel

FloatArray = npt.NDArray[np.float64]
COST_KINDS = ("l1", "carma")


@dataclass(frozen=True)
class CostProfile:
    """A cost profile bound to a model's actionable features and their scales."""

    kind: str
    actionable: tuple[str, ...]
    scale: Mapping[str, float]
    """Standard deviation per actionable feature (training data)."""
    range_in_sd: Mapping[str, float]
    """Training range per actionable feature, in standard deviations (used by ``carma``)."""
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in COST_KINDS:
            raise ValueError(
                f"The cost profile must be one of {list(COST_KINDS)}. Got {self.kind!r} instead."
            )
        if self.sparsity < 0:
            raise ValueError(f"The cost 'sparsity' must be >= 0. Got {self.sparsity} instead.")

    @classmethod
    def for_model(
        cls, kind: str, scm: StructuralCausalModel, classifier: Classifier, sparsity: float = 0.0
    ) -> CostProfile:
        """Scales from the classifier's training data (its scaler and recorded range)."""
        scale, ranges = {}, {}
        meta = classifier.metadata
        for name in scm.actionable:
            i = classifier.feature_names.index(name)
            scale[name] = float(classifier.scale[i])
            if "train_min" in meta and "train_max" in meta:
                ranges[name] = float(meta["train_max"][i] - meta["train_min"][i]) / scale[name]
            else:
                var = scm.variables[scm.index[name]]
                ranges[name] = (var.upper - var.lower) / scale[name]
        return cls(kind, scm.actionable, scale, ranges, sparsity)

    def coefficient(self, name: str, weight: float) -> float:
        """``a_k``: the cost is ``a_k |delta|`` (l1) or ``a_k delta^2`` (carma)."""
        if self.kind == "l1":
            return weight / self.scale[name]
        return weight / (len(self.actionable) * self.scale[name] ** 2 * self.range_in_sd[name])

    def feature_cost(self, name: str, weight: float, delta: FloatArray) -> FloatArray:
        a = self.coefficient(name, weight)
        return a * np.abs(delta) if self.kind == "l1" else a * np.square(delta)

    def max_change(self, name: str, weight: float, budget: float) -> float:
        """The largest |delta| whose feature cost alone stays within ``budget``."""
        a = self.coefficient(name, weight)
        return budget / a if self.kind == "l1" else float(np.sqrt(max(budget, 0.0) / a))

    def cost(
        self,
        names: tuple[str, ...],
        x_factual: FloatArray,
        intervene: npt.NDArray[np.bool_],
        values: FloatArray,
        constraints: PersonConstraints,
    ) -> FloatArray:
        """Cost of actions (rows of ``intervene`` / ``values``) for one person."""
        intervene = np.atleast_2d(intervene)
        values = np.atleast_2d(values)
        total = np.zeros(intervene.shape[0])
        for name in self.actionable:
            k = names.index(name)
            acted = intervene[:, k]
            delta = np.where(acted, values[:, k] - x_factual[k], 0.0)
            total += np.where(acted, self.feature_cost(name, constraints.weight(name), delta), 0.0)
            total += self.sparsity * acted
            limit = constraints.soft_limits.get(name)
            if limit is not None:
                total += limit.penalty * np.maximum(0.0, np.abs(delta) - limit.limit) * acted
        return total

    def costs(
        self,
        names: tuple[str, ...],
        x_factual: FloatArray,
        intervene: npt.NDArray[np.bool_],
        values: FloatArray,
        constraints: ConstraintArrays,
    ) -> FloatArray:
        """Cost of one action per person: row i of every array is person i."""
        total = np.empty(len(intervene))
        _action_costs(
            self._columns(names),
            np.ascontiguousarray(intervene),
            np.ascontiguousarray(values, dtype=float),
            np.ascontiguousarray(x_factual, dtype=float),
            constraints.weight,
            self.denominators,
            self.kind == "l1",
            self.sparsity,
            constraints.soft_limit,
            constraints.soft_penalty,
            total,
        )
        return total

    def _columns(self, names: tuple[str, ...]) -> npt.NDArray[np.intp]:
        """The columns of the actionable features among ``names`` (cached per ``names``)."""
        columns = self._columns_by_names.get(names)
        if columns is None:
            columns = np.array([names.index(name) for name in self.actionable], dtype=np.intp)
            self._columns_by_names[names] = columns
        return columns

    @functools.cached_property
    def _columns_by_names(self) -> dict[tuple[str, ...], npt.NDArray[np.intp]]:
        return {}

    @functools.cached_property
    def denominators(self) -> FloatArray:
        """Per actionable feature, what a person's weight is divided by in :meth:`costs`."""
        scale = np.array([self.scale[name] for name in self.actionable])
        if self.kind == "l1":
            return scale
        ranges = np.array([self.range_in_sd[name] for name in self.actionable])
        return len(self.actionable) * scale**2 * ranges


_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _action_costs(
    columns, intervene, values, x, weight, denominators, l1, sparsity, soft_limit, soft_penalty,
    total,
):  # fmt: skip
    """:meth:`CostProfile.costs` into ``total``, a row at a time, summed in the order of
    the features."""
    for r in range(len(total)):
        row_total = 0.0
        for k in range(len(columns)):
            c = columns[k]
            if intervene[r, c]:
                row_total += feature_cost(
                    values[r, c] - x[r, c], weight[r, k], denominators[k], l1, sparsity,
                    soft_limit[r, k], soft_penalty[r, k],
                )  # fmt: skip
        total[r] = row_total


@numba.njit(inline="always", **_JIT)
def feature_cost(delta, weight, denominator, l1, sparsity, soft_limit, soft_penalty):
    """The cost of changing one acted feature by ``delta``: weight / scale * |delta| (l1)
    or weight / (K scale^2 range) * delta^2 (carma), plus the sparsity and the soft
    limit's penalty (``denominator``: :attr:`CostProfile.denominators`' entry)."""
    size = abs(delta)
    per_feature = weight / denominator
    per_feature *= size if l1 else delta * delta
    per_feature += sparsity
    if soft_limit < np.inf:  # inf: no soft limit (else an infinite change would give nan)
        beyond = size - soft_limit
        if beyond < 0.0:  # not max(): numpy's keeps a nan
            beyond = 0.0
        per_feature += beyond * soft_penalty
    return per_feature
