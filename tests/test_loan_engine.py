"""The exact engine on rejected Loan individuals with random personal constraints.

For each person every backend must return the same optimal cost, every answer must verify
through the exact causal model and classifier, locked features never move, and no action
on a brute-force grid is cheaper than the optimum. ReLU-network MILPs take a tenth of a
second to seconds each, so the MLP runs every person with the default backend and the
other backends on the first few; benchmarks/agreement.py runs the full matrix.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.costs import CostProfile
from models.preferences import parse_constraints
from solver.backends import available_backends
from solver.engine import EngineOptions, RecourseSolver
from solver.milp import SolveStatus
from tests.conftest import random_constraints, rejected

N_LR = 210
N_MLP = {"l1": 200, "carma": 12}
MLP_CROSS_CHECK = {"l1": 12, "carma": 3}


def check_people(scm, clf, cost_kind, people, backends, seed, cross_check=None):
    """Check every person with ``backends[0]``; the first ``cross_check`` (default: all)
    also with the other backends."""
    rng = np.random.default_rng(seed)
    cost = CostProfile.for_model(cost_kind, scm, clf)
    solvers = {b: RecourseSolver(scm, clf, cost, backend=b) for b in backends}
    margin = EngineOptions().margin
    for i, x in enumerate(people):
        raw = random_constraints(rng, scm.actionable)
        constraints = parse_constraints(raw, scm, who=f"individual {i}")
        active = backends if cross_check is None or i < cross_check else backends[:1]
        results = {b: solvers[b].solve(x, constraints) for b in active}
        reference = results[backends[0]]
        for backend, result in results.items():
            assert result.status is reference.status, (i, raw, backend)
            if result.status is SolveStatus.INFEASIBLE:
                continue
            assert result.status is SolveStatus.OPTIMAL, (i, raw, backend, result.message)
            assert result.verified, (i, raw, backend, result.verification_failures)
            assert not set(result.action) & constraints.locks, (i, raw, backend)
            assert result.cost == pytest.approx(reference.cost, rel=1e-6, abs=1e-9), (i, backend)
        grid = solvers[backends[0]].grid_oracle(
            x, constraints, values_per_feature=8, logit_margin=margin
        )
        if reference.status is SolveStatus.INFEASIBLE:
            assert grid is None, (i, raw)
        elif grid is not None:
            assert reference.cost <= grid.cost + 1e-7 * (1 + grid.cost), (i, raw)


@pytest.mark.parametrize("cost_kind", ["l1", "carma"])
def test_logistic_regression_all_backends_agree(loan_scm, loan_lr, cost_kind) -> None:
    people = rejected(loan_scm, loan_lr, N_LR, seed=11)
    assert len(people) == N_LR
    check_people(loan_scm, loan_lr, cost_kind, people, available_backends(), seed=5)


@pytest.mark.parametrize("cost_kind", ["l1", "carma"])
def test_mlp_backends_agree_verified_and_not_beaten_by_the_grid(
    loan_scm, loan_mlp, cost_kind
) -> None:
    people = rejected(loan_scm, loan_mlp, N_MLP[cost_kind], seed=12)
    assert len(people) == N_MLP[cost_kind]
    backends = ("highs", *(b for b in available_backends() if b != "highs"))
    check_people(
        loan_scm,
        loan_mlp,
        cost_kind,
        people,
        backends,
        seed=6,
        cross_check=MLP_CROSS_CHECK[cost_kind],
    )


def test_locked_features_do_not_turn_an_optimum_into_a_solve_error(loan_scm, loan_lr) -> None:
    # A person of benchmarks/agreement.py: with education locked, its big-M constants were
    # 1e-9, which HiGHS drops; it then called its own optimum a solve error.
    x = np.array([0.0, 4.965392007387685, -0.005015118281110953, 2.8719228680293662,
                  3.84893729534131, 0.5925322294009042, 1.356025240722015])  # fmt: skip
    raw = {
        "lock": ["education", "income"],
        "rank": ["income", "loan_amount", "education", "savings"],
        "soft_limits": {"savings": {"limit": 10.013824190249112, "penalty": 0.178202951659058}},
    }
    constraints = parse_constraints(raw, loan_scm)
    cost = CostProfile.for_model("l1", loan_scm, loan_lr)
    for backend in available_backends():
        result = RecourseSolver(loan_scm, loan_lr, cost, backend=backend).solve(x, constraints)
        assert result.status is SolveStatus.OPTIMAL, (backend, result.message)
        assert result.verified
        assert result.cost == pytest.approx(0.16976213113, rel=1e-6)


def test_no_op_interventions_are_dropped_as_one_by_one(loan_scm, loan_lr) -> None:
    # The engine checks its candidates in batches; the answer must be the one-by-one scan's.
    scm = loan_scm

    def propagate(x, intervene, values, noise):
        return scm.propagate_counterfactual(x[None], intervene[None], values[None], noise[None])[0]

    solver = RecourseSolver(scm, loan_lr, CostProfile.for_model("l1", scm, loan_lr))
    rng = np.random.default_rng(5)
    actionable = [scm.index[k] for k in scm.actionable]
    people = rejected(scm, loan_lr, 60, seed=3)
    dropped_below_a_dropped_ancestor = 0
    for x in people:
        noise = scm.abduct_noise(x[None, :])[0]
        intervene = np.zeros(len(x), dtype=bool)
        intervene[rng.choice(actionable, size=rng.integers(1, 5), replace=False)] = True
        # Each set feature: its factual value, a random one, or the value its equation
        # gives under the features set before it (a no-op when nothing before it moves).
        values = x.copy()
        for k in np.flatnonzero(intervene):
            kind = rng.integers(3)
            if kind == 1:
                values[k] = rng.uniform(scm.lower[k], scm.upper[k])
            elif kind == 2:
                before = intervene & (np.arange(len(x)) < k)
                values[k] = propagate(x, before, values, noise)[k]
        expected = intervene.copy()
        for k in np.flatnonzero(intervene):
            without = expected.copy()
            without[k] = False
            natural = propagate(x, without, values, noise)[k]
            if abs(natural - values[k]) <= 1e-9 * (1 + abs(values[k])):
                expected[k] = False
                dropped_below_a_dropped_ancestor += bool(
                    np.any(solver._ancestors[k] & intervene & ~expected)
                )
        got = solver._drop_no_op_interventions(x, noise, intervene, values)
        np.testing.assert_array_equal(got, expected)
    assert dropped_below_a_dropped_ancestor > 0
