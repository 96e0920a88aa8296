"""Equations beyond sums: max/min/abs/indicator exactly, smooth terms by interpolation."""

from __future__ import annotations

import numpy as np
import pytest

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import parse_constraints
from models.scm import StructuralCausalModel
from solver.engine import RecourseSolver
from solver.grid import grid_search
from solver.milp import SolveStatus
from tests.conftest import backend_params

EQUATIONS = {
    "b": "max(a, 0.5 * a, -1) + noise",
    "c": "abs(a - 1) - min(a, 2) + 2 * indicator(a - 0.5) + noise",
    "d": "sigmoid(a) + 0.1 * exp(0.2 * a) + noise",
}


def model() -> StructuralCausalModel:
    variables = [
        {
            "name": "a",
            "type": "continuous",
            "role": "actionable",
            "bounds": [-4, 4],
            "equation": "noise",
            "noise": {"distribution": "normal", "sd": 1},
        },
    ]
    for name, equation in EQUATIONS.items():
        variables.append(
            {
                "name": name,
                "type": "continuous",
                "role": "non_actionable",
                "bounds": [-20, 20],
                "equation": equation,
                "noise": {"distribution": "normal", "sd": 1},
            }
        )
    return StructuralCausalModel.from_dict(
        {"schema_version": 1, "name": "nl", "variables": variables}
    )


def classifier(weights: list[float], bias: float) -> Classifier:
    return Classifier.from_dict(
        {
            "schema_version": 1,
            "kind": "lr",
            "feature_names": ["a", "b", "c", "d"],
            "scaler": {"mean": [0.0] * 4, "scale": [1.0] * 4},
            "layers": [{"weights": [[w] for w in weights], "bias": [bias]}],
        }
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "weights, bias",
    [
        ([0.0, 1.0, 0.0, 0.0], -1.5),
        ([0.0, 0.0, 1.0, 0.0], -2.5),
        ([0.0, 0.0, 0.0, 2.0], -2.5),
        ([0.3, 0.5, -0.4, 1.0], -1.0),
    ],
)
def test_recourse_through_non_linear_equations(backend, weights, bias) -> None:
    scm = model()
    clf = classifier(weights, bias)
    cost = CostProfile("l1", ("a",), {"a": 1.0}, {"a": 1.0})
    solver = RecourseSolver(scm, clf, cost, backend=backend)
    x = scm.generate(np.zeros((1, 4)))[0]
    assert not clf.accepts(x[None, :])[0]
    constraints = parse_constraints({}, scm)
    result = solver.solve(x, constraints)
    noise = np.zeros(4)
    ranges = solver.formulation.intervention_ranges(x, constraints)
    grid = grid_search(scm, clf, cost, x, noise, constraints, ranges, values_per_feature=4001)
    if grid is None:
        assert result.status is SolveStatus.INFEASIBLE
        return
    assert result.status is SolveStatus.OPTIMAL and result.verified, result
    # Exact terms match the fine grid; interpolated ones within the stated error.
    tolerance = 1e-3 + 10 * result.interpolation_error
    assert result.cost <= grid.cost + 1e-7 + tolerance
    assert result.cost >= grid.cost - 8 / 4000 - tolerance
