"""Tiny instances whose optimum is checked by hand, on every available backend.

Model: a -> b with b = 0.5 a + u_b; the person is at a = b = 0 (noise 0); the classifier
accepts when a + b >= 2. Unit weights, unit scales, margin 1e-4 in logit.
- act on a by t: b follows to 0.5 t, a + b = 1.5 t >= 2: t = 4/3, L1 cost 4/3;
- act on b alone: cost 2; act on both: a + b >= 2 costs at least 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.preferences import parse_constraints
from solver.engine import RecourseSolver
from solver.milp import SolveStatus
from tests.conftest import backend_params, sum_classifier, two_feature_scm, unit_cost

MARGIN = 1e-4
PERSON = np.array([0.0, 0.0])


def solve(backend, constraints, *, kind="lr", cost="l1", follows=True):
    scm = two_feature_scm(follows)
    solver = RecourseSolver(scm, sum_classifier(kind), unit_cost(cost), backend=backend)
    return solver.solve(PERSON, parse_constraints(constraints, scm))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["lr", "mlp"])
def test_cheapest_path_goes_through_the_cause(backend, kind) -> None:
    result = solve(backend, {}, kind=kind)
    assert result.status is SolveStatus.OPTIMAL and result.verified
    assert set(result.action) == {"a"}
    assert result.cost == pytest.approx(4 / 3, abs=2 * MARGIN)
    assert result.counterfactual["b"] == pytest.approx(0.5 * result.action["a"])


@pytest.mark.parametrize("backend", backend_params())
def test_locked_cheapest_path(backend) -> None:
    result = solve(backend, {"lock": ["a"]})
    assert result.action.keys() == {"b"}
    assert result.cost == pytest.approx(2.0, abs=2 * MARGIN)


@pytest.mark.parametrize("backend", backend_params())
def test_rank_moves_the_answer(backend) -> None:
    # weights: b (easiest) 1, a 2, normalized by their mean 1.5: a alone 16/9, b alone 4/3
    result = solve(backend, {"rank": ["b", "a"]})
    assert result.action.keys() == {"b"}
    assert result.cost == pytest.approx(4 / 3, abs=2 * MARGIN)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "constraints",
    [
        {"lock": ["a", "b"]},
        {"lock": ["a"], "bounds": {"b": [-10, 1.5]}},
        {"direction": {"a": "decrease", "b": "decrease"}},
        {"max_changes": 0},
    ],
)
def test_no_recourse(backend, constraints) -> None:
    result = solve(backend, constraints)
    assert result.status is SolveStatus.INFEASIBLE
    assert result.action == {} and result.cost is None and not result.verified


@pytest.mark.parametrize("backend", backend_params())
def test_tie_between_two_independent_features(backend) -> None:
    # b does not follow a: any split of a + b = 2 costs 2.
    result = solve(backend, {}, follows=False)
    assert result.verified
    assert result.cost == pytest.approx(2.0, abs=2 * MARGIN)
    assert sum(result.counterfactual.values()) >= 2.0


@pytest.mark.parametrize("backend", backend_params())
def test_squared_cost_is_exact(backend) -> None:
    # (1/K) sum delta^2 with K = 2: a alone 0.5 (4/3)^2 = 8/9; both (split 1, 1) 1; b alone 2.
    result = solve(backend, {}, cost="carma")
    assert result.action.keys() == {"a"}
    assert result.cost == pytest.approx(8 / 9, abs=1e-3)
    assert result.solver.gap is not None and result.solver.gap <= 1e-6 * (1 + result.cost)


@pytest.mark.parametrize("backend", backend_params())
def test_soft_limit_and_sparsity(backend) -> None:
    # a beyond 1 costs 10 more per unit: a alone 4/3 + 10/3. Cost 2 is optimal, reached by
    # b alone or by a = 1 (no penalty yet) with b = 1 (a tie); a never passes its limit.
    result = solve(backend, {"soft_limits": {"a": {"limit": 1.0, "penalty": 10.0}}})
    assert result.verified
    assert result.cost == pytest.approx(2.0, abs=2 * MARGIN)
    assert result.action.get("a", 0.0) <= 1.0 + 1e-6


def test_already_accepted_needs_no_action() -> None:
    scm = two_feature_scm()
    solver = RecourseSolver(scm, sum_classifier("lr"), unit_cost("l1"))
    result = solver.solve(np.array([3.0, 3.0]), parse_constraints({}, scm))
    assert result.status is SolveStatus.OPTIMAL and result.action == {} and result.cost == 0
