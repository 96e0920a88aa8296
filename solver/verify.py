"""Re-check an action through the full causal model and the real classifier.

Nothing the engine returns skips this: the counterfactual is recomputed with the exact
structural equations (not their linearization), the classifier's probability with its
numpy forward pass, the cost with the cost profile, and every hard constraint is checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import PersonConstraints
from models.scm import Role, StructuralCausalModel, VariableType
from solver.milp import BoolArray, FloatArray

_TOLERANCE = 1e-7


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
        if not lower - tol <= value <= upper + tol:
            failures.append(f"{name!r} is set to {value}, outside [{lower}, {upper}]")
        direction = constraints.directions.get(name)
        if direction == "increase" and value < current - tol:
            failures.append(f"{name!r} may only increase, but goes {current} -> {value}")
        if direction == "decrease" and value > current + tol:
            failures.append(f"{name!r} may only decrease, but goes {current} -> {value}")
        if var.type is not VariableType.CONTINUOUS and value != round(value):
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
