"""Re-check an action through the full causal model and the real classifier.

Nothing the engine returns skips this: the counterfactual is recomputed with the exact
structural equations (not their linearization), the classifier's probability with its
numpy forward pass, the cost with the cost profile, and every hard constraint is checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numba
import numpy as np

from models.classifiers import Classifier, row_blocks
from models.costs import CostProfile
from models.preferences import ConstraintArrays, PersonConstraints
from models.scm import Role, StructuralCausalModel, VariableType
from solver.milp import BoolArray, FloatArray

_TOLERANCE = 1e-7
# Rows per block of a large batch: the checks' temporaries stay in cache; a whole batch's
# arrive as fresh pages, and the page faults cost more than the arithmetic. A multiple of
# the forward pass's blocks, for the same bits (see models.classifiers.row_blocks).
_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class Verification:
    counterfactual: FloatArray
    probability: float
    cost: float
    failures: tuple[str, ...]

    @property
    def verified(self) -> bool:
        return not self.failures


def verify_action(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: PersonConstraints,
    intervene: BoolArray,
    values: FloatArray,
) -> Verification:
    """Simulate ``do(x_k := values[k])`` for the marked features and check every rule."""
    counterfactual = scm.propagate_counterfactual(
        x[None, :], intervene[None, :], values[None, :], noise[None, :]
    )[0]
    probability = float(classifier.probability(counterfactual[None, :])[0])
    failures = []
    if probability < classifier.threshold:
        failures.append(
            f"the classifier's probability {probability:.6f} is below its threshold "
            f"{classifier.threshold}"
        )
    acted = [scm.names[k] for k in np.flatnonzero(intervene)]
    for name in acted:
        var = scm.variables[scm.index[name]]
        value = float(values[scm.index[name]])
        current = float(x[scm.index[name]])
        tol = _TOLERANCE * (1 + abs(value))
        if var.role is not Role.ACTIONABLE:
            failures.append(f"{name!r} is {var.role.value} but the action sets it")
        if name in constraints.locks:
            failures.append(f"{name!r} is locked but the action sets it")
        lower, upper = constraints.bounds.get(name, (var.lower, var.upper))
        if not (np.isfinite(value) and lower - tol <= value <= upper + tol):  # tol: inf for inf
            failures.append(f"{name!r} is set to {value}, outside [{lower}, {upper}]")
        direction = constraints.directions.get(name)
        if direction == "increase" and value < current - tol:
            failures.append(f"{name!r} may only increase, but goes {current} -> {value}")
        if direction == "decrease" and value > current + tol:
            failures.append(f"{name!r} may only decrease, but goes {current} -> {value}")
        if var.type is not VariableType.CONTINUOUS and value != np.round(value):  # nan too
            failures.append(f"{name!r} is {var.type.value} but is set to {value}")
    for feature, levels in scm.one_hot.items():
        block = [float(counterfactual[scm.index[level]]) for level in levels]
        if sorted(block) != [0.0] * (len(levels) - 1) + [1.0]:
            failures.append(
                f"the levels of {feature!r} must be one 1 and otherwise 0; got "
                f"{dict(zip(levels, block, strict=True))}"
            )
    if constraints.max_changes is not None and len(acted) > constraints.max_changes:
        failures.append(
            f"the action changes {len(acted)} features, more than the {constraints.max_changes} "
            f"allowed"
        )
    total = float(cost.cost(scm.names, x, intervene, values, constraints)[0])
    return Verification(counterfactual, probability, total, tuple(failures))


@dataclass(frozen=True, eq=False)
class BatchVerification:
    """One action per person, re-checked; ``failures`` only for people who fail."""

    counterfactual: FloatArray
    probability: FloatArray
    cost: FloatArray
    verified: BoolArray


def verify_actions(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: ConstraintArrays,
    intervene: BoolArray,
    values: FloatArray,
) -> BatchVerification:
    """:func:`verify_action` for many people at once (row i: person i), vectorized.

    The same rules: accepted by the classifier after the exact counterfactual, only
    actionable and unlocked features set, inside each person's interval (bounds and
    direction), whole numbers where required, one-hot levels valid, at most the allowed
    number of changes. :func:`verify_action` gives the reasons for a person who fails.
    """
    if len(x) <= _BLOCK_ROWS:
        return _verify_rows(scm, classifier, cost, x, noise, constraints, intervene, values)
    blocks = [
        _verify_rows(
            scm,
            classifier,
            cost,
            x[rows],
            noise[rows],
            constraints.take(rows),
            intervene[rows],
            values[rows],
        )
        for rows in row_blocks(len(x), _BLOCK_ROWS)
    ]
    return BatchVerification(
        *(
            np.concatenate([getattr(block, field.name) for block in blocks])
            for field in dataclasses.fields(BatchVerification)
        )
    )


def _verify_rows(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: ConstraintArrays,
    intervene: BoolArray,
    values: FloatArray,
) -> BatchVerification:
    counterfactual = scm.propagate_counterfactual(x, intervene, values, noise)
    probability = classifier.probability(counterfactual)
    ok = probability >= classifier.threshold
    ok &= hard_constraints_hold(scm, constraints, intervene, values)
    if scm.one_hot:
        ok &= scm.one_hot_valid(counterfactual)
    total = cost.costs(scm.names, x, intervene, values, constraints)
    return BatchVerification(counterfactual, probability, total, ok)


def hard_constraints_hold(
    scm: StructuralCausalModel,
    constraints: ConstraintArrays,
    intervene: BoolArray,
    values: FloatArray,
) -> BoolArray:
    """Per row: the action sets only actionable, unlocked features, inside each person's
    interval (bounds and direction), to whole numbers where required, and changes at most
    the allowed number of features. The classifier is not consulted."""
    ok = np.empty(len(intervene), dtype=bool)
    _hard_constraints(
        scm.not_actionable_columns,
        scm.actionable_columns,
        scm.whole_actionable,
        np.ascontiguousarray(intervene),
        np.ascontiguousarray(values, dtype=float),
        constraints.locked,
        constraints.lower,
        constraints.upper,
        constraints.max_changes,
        ok,
    )
    return ok


@numba.njit(nogil=True, cache=True)
def _hard_constraints(
    fixed, columns, whole, intervene, values, locked, lower, upper, max_changes, ok
):  # fmt: skip
    """:func:`hard_constraints_hold` into ``ok``, a row at a time."""
    integral = np.zeros(len(columns), dtype=np.bool_)
    integral[whole] = True
    for r in range(len(ok)):
        holds = True
        for c in fixed:
            holds &= not intervene[r, c]
        acted = 0
        for k in range(len(columns)):
            if not intervene[r, columns[k]]:
                continue
            acted += 1
            v = values[r, columns[k]]
            tol = (abs(v) + 1.0) * _TOLERANCE  # inf for inf, which is never inside
            inside = np.isfinite(v) and lower[r, k] - tol <= v <= upper[r, k] + tol
            holds &= not locked[r, k] and inside
            holds &= not integral[k] or v == np.round(v)
        ok[r] = holds and acted <= max_changes[r]
