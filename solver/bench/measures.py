"""Per-person measures of an answer, the same for every method.

Whatever a method claims, its action is re-simulated here through the true causal model
and the real classifier, and checked against the person's own hard constraints:

- ``accepted``: the classifier accepts the counterfactual (one-hot levels valid);
- ``respects_constraints``: only actionable, unlocked features, inside the person's
  bounds and directions, whole numbers where required, at most the allowed changes;
- ``valid``: both (DOMAIN.md section 5's validity, with the person's constraints);
- ``cost`` under the person's cost profile (weights, soft limits), ``universal_cost``
  under the same profile without personal weights or soft limits (comparable across
  schemes), ``n_changed``;
- plausibility of the counterfactual, two measures (:class:`PlausibilityScorer`).

Measures of answers that are not valid are NaN: a cost or plausibility is only compared
where the person really gets recourse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import ConstraintArrays
from models.scm import StructuralCausalModel
from solver.result import RecourseResult
from solver.verify import hard_constraints_hold

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

REFERENCE_SIZE = 5000
"""People sampled from the causal model as the plausibility reference ("training data")."""
REFERENCE_SEED = 12345
LOF_NEIGHBOURS = 20
IMPLAUSIBLE_QUANTILE = 0.01
"""A counterfactual is implausible when it is less typical than this share of the
reference population (a fresh sample, not the one LOF is fitted on)."""


@dataclass(frozen=True, eq=False)
class Actions:
    """One answer per person: which features are set, to what; ``answered`` False when
    the method returned no action (proven infeasible, nothing found, an error)."""

    intervene: BoolArray
    values: FloatArray
    answered: BoolArray

    @classmethod
    def from_table(cls, table: pd.DataFrame, names: Sequence[str], x: FloatArray) -> Actions:
        """From a label table's ``action_mask.*`` / ``action_value.*`` / ``counterfactual.*``."""
        intervene = table[[f"action_mask.{n}" for n in names]].to_numpy(dtype=bool)
        chosen = table[[f"action_value.{n}" for n in names]].to_numpy(dtype=float)
        answered = table[f"counterfactual.{names[0]}"].notna().to_numpy() & intervene.any(axis=1)
        return cls(intervene, np.where(intervene, chosen, x), answered)

    @classmethod
    def from_results(
        cls, results: Sequence[RecourseResult], names: Sequence[str], x: FloatArray
    ) -> Actions:
        intervene = np.array([[n in r.action for n in names] for r in results], dtype=bool)
        values = np.array(
            [[r.action.get(n, x[i, k]) for k, n in enumerate(names)] for i, r in enumerate(results)]
        )
        answered = np.array([r.counterfactual is not None and bool(r.action) for r in results])
        return cls(intervene.reshape(x.shape), values.reshape(x.shape), answered)


class PlausibilityScorer:
    """How typical a counterfactual individual is, two ways (higher ``lof`` and lower
    ``noise_loglik`` are less plausible):

    - ``lof``: local outlier factor against :data:`REFERENCE_SIZE` people sampled from the
      causal model (standardized features, :data:`LOF_NEIGHBOURS` neighbours; about 1 for
      an inlier);
    - ``noise_loglik``: the log-likelihood of the noise the causal model needs to produce
      the counterfactual (abduction on it): unchanged where the equations moved a
      feature, lower the more an action pushes a feature away from what its causes
      predict. ``-inf`` at a value the equation cannot reach (a domain edge).

    Each has an implausibility threshold: the :data:`IMPLAUSIBLE_QUANTILE` tail of a
    second reference sample.
    """

    def __init__(self, scm: StructuralCausalModel) -> None:
        from sklearn.neighbors import LocalOutlierFactor  # heavy import, only when measuring

        self.scm = scm
        reference, _ = scm.sample(REFERENCE_SIZE, REFERENCE_SEED)
        self.mean = reference.mean(axis=0)
        scale = reference.std(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        self._lof = LocalOutlierFactor(n_neighbors=LOF_NEIGHBOURS, novelty=True)
        self._lof.fit((reference - self.mean) / self.scale)
        fresh, _ = scm.sample(REFERENCE_SIZE, REFERENCE_SEED + 1)
        lof, loglik = self.score(fresh)
        self.lof_threshold = float(np.quantile(lof, 1 - IMPLAUSIBLE_QUANTILE))
        self.loglik_threshold = float(np.quantile(loglik, IMPLAUSIBLE_QUANTILE))

    def score(self, rows: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(lof, noise_loglik) per row."""
        rows = np.atleast_2d(rows)
        if not len(rows):
            return np.empty(0), np.empty(0)
        lof = -self._lof.score_samples((rows - self.mean) / self.scale)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            loglik = self.scm.noise_log_likelihood(self.scm.abduct_noise(rows))
        return lof, np.where(np.isnan(loglik), -np.inf, loglik)


def measure(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    plausibility: PlausibilityScorer,
    x: FloatArray,
    constraints: ConstraintArrays,
    actions: Actions,
) -> pd.DataFrame:
    """One row per person: the module docstring's measures of ``actions``."""
    noise = scm.abduct_noise(x)
    counterfactual = scm.propagate_counterfactual(x, actions.intervene, actions.values, noise)
    accepted = classifier.probability(counterfactual) >= classifier.threshold
    if scm.one_hot:
        accepted &= scm.one_hot_valid(counterfactual)
    accepted &= actions.answered
    respects = hard_constraints_hold(scm, constraints, actions.intervene, actions.values)
    respects &= actions.answered
    valid = accepted & respects
    total = cost.costs(scm.names, x, actions.intervene, actions.values, constraints)
    unweighted = cost.costs(
        scm.names, x, actions.intervene, actions.values, _unweighted(constraints)
    )
    lof, loglik = np.full(len(x), np.nan), np.full(len(x), np.nan)
    lof[valid], loglik[valid] = plausibility.score(counterfactual[valid])
    return pd.DataFrame(
        {
            "answered": actions.answered,
            "accepted": accepted,
            "respects_constraints": respects,
            "valid": valid,
            "cost": np.where(valid, total, np.nan),
            "universal_cost": np.where(valid, unweighted, np.nan),
            "n_changed": np.where(valid, actions.intervene.sum(axis=1), np.nan),
            "lof": lof,
            "noise_loglik": loglik,
            "implausible_lof": np.where(valid, lof > plausibility.lof_threshold, np.nan),
            "implausible_noise": np.where(valid, loglik < plausibility.loglik_threshold, np.nan),
        }
    )


def _unweighted(constraints: ConstraintArrays) -> ConstraintArrays:
    return dataclasses.replace(
        constraints,
        weight=np.ones_like(constraints.weight),
        soft_limit=np.full_like(constraints.soft_limit, np.inf),
        soft_penalty=np.zeros_like(constraints.soft_penalty),
    )
