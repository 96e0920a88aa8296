"""GSMC, the semi-synthetic Give Me Some Credit model: its design and exact recourse on it.

The model: roles, whole-number features, a label that never reads the group attributes
while the groups' rejection rates differ. The engine: rejected people with random locks
and preferences verify through the exact equations on every backend, with the same cost;
answers through the interpolated debt-ratio term stay within the reported error of a
brute-force grid; and an answer the interpolation makes invalid is caught and repaired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import instances
from instances import load_classifier, load_example, load_scm
from models.classifiers import Classifier
from models.costs import CostProfile
from models.expressions import free_names
from models.preferences import parse_constraints
from models.scm import Role, StructuralCausalModel, VariableType
from solver.backends import available_backends, create_backend
from solver.cli import EXIT_RECOURSE, main
from solver.engine import EngineOptions, RecourseSolver
from solver.formulation import RecourseFormulation
from solver.milp import SolverSettings, SolveStatus
from solver.verify import verify_action
from tests.conftest import backend_params, random_constraints, rejected

N_LR = 210
N_MLP = 4
GROUPS = ("gender", "race", "income_group")
INTEGER_ACTIONABLE = ("open_credit_lines", "real_estate_loans")
EXAMPLE = Path(instances.__file__).parent / "gsmc" / "example_person.json"


@pytest.fixture(scope="module")
def gsmc_scm() -> StructuralCausalModel:
    return load_scm("gsmc")


@pytest.fixture(scope="module")
def gsmc_lr() -> Classifier:
    return load_classifier("gsmc", "lr")


@pytest.fixture(scope="module")
def gsmc_mlp() -> Classifier:
    return load_classifier("gsmc", "mlp")


# -- the model ----------------------------------------------------------------------------


def test_roles_and_whole_number_features(gsmc_scm) -> None:
    roles = {v.name: v.role for v in gsmc_scm.variables}
    assert {Role.IMMUTABLE, Role.ACTIONABLE, Role.NON_ACTIONABLE} == set(roles.values())
    assert 4 <= len(gsmc_scm.actionable) <= 5
    for name in INTEGER_ACTIONABLE:
        var = gsmc_scm.variables[gsmc_scm.index[name]]
        assert var.type is VariableType.INTEGER and var.role is Role.ACTIONABLE
        # Parents no action can reach: not acted on, the feature keeps its whole value.
        assert not set(var.parents) & gsmc_scm.descendants(gsmc_scm.actionable)
    x, _ = gsmc_scm.sample(20_000, seed=1)
    for var in gsmc_scm.variables:
        column = x[:, gsmc_scm.index[var.name]]
        assert var.lower <= column.min() and column.max() <= var.upper, var.name
        if var.type is not VariableType.CONTINUOUS:
            assert np.array_equal(column, np.round(column)), var.name


def test_income_group_is_derived_from_income(gsmc_scm) -> None:
    x, _ = gsmc_scm.sample(5_000, seed=2)
    income = x[:, gsmc_scm.index["monthly_income"]]
    group = x[:, gsmc_scm.index["income_group"]]
    assert np.array_equal(group, (income >= 5.4).astype(float))
    assert 0.4 < group.mean() < 0.6  # 5.4 thousand USD is GMSC's median


def test_disparities_come_through_the_graph_not_the_label(gsmc_scm) -> None:
    assert not free_names(gsmc_scm.label_spec.expr) & set(GROUPS)
    x, _ = gsmc_scm.sample(100_000, seed=3)
    rejected_share = 1 - gsmc_scm.label(x)
    assert 0.1 < rejected_share.mean() < 0.2
    for group in GROUPS:
        member = x[:, gsmc_scm.index[group]] == 1
        gap = rejected_share[member].mean() - rejected_share[~member].mean()
        # Women and the minority group are rejected more often, higher incomes less.
        assert abs(gap) > 0.02, group
        assert (gap < 0) == (group == "income_group"), group


def test_abduction_recovers_the_noise(gsmc_scm) -> None:
    x, noise = gsmc_scm.sample(2_000, seed=4)
    np.testing.assert_allclose(gsmc_scm.abduct_noise(x), noise, atol=1e-9)
    assert np.all(np.isfinite(gsmc_scm.noise_log_likelihood(noise)))


def test_classifiers_are_accurate_and_trained_on_this_model(gsmc_scm, gsmc_lr, gsmc_mlp) -> None:
    for clf in (gsmc_lr, gsmc_mlp):
        clf.check_features(gsmc_scm.names)
        assert clf.metadata["model_hash"] == gsmc_scm.content_hash()
        assert clf.metadata["test_accuracy"] > 0.95
    assert gsmc_mlp.metadata["hidden_layers"] == [32, 32]


# -- recourse -----------------------------------------------------------------------------


def check_people(scm, clf, cost_kind, people, backends, seed) -> None:
    rng = np.random.default_rng(seed)
    cost = CostProfile.for_model(cost_kind, scm, clf)
    solvers = {b: RecourseSolver(scm, clf, cost, backend=b) for b in backends}
    margin = EngineOptions().margin
    for i, x in enumerate(people):
        raw = random_constraints(rng, scm.actionable)
        constraints = parse_constraints(raw, scm, who=f"individual {i}")
        results = {b: s.solve(x, constraints) for b, s in solvers.items()}
        reference = results[backends[0]]
        for backend, result in results.items():
            assert result.status is reference.status, (i, raw, backend)
            if result.status is SolveStatus.INFEASIBLE:
                continue
            assert result.status is SolveStatus.OPTIMAL, (i, raw, backend, result.message)
            assert result.verified, (i, raw, backend, result.verification_failures)
            assert not set(result.action) & constraints.locks, (i, raw, backend)
            for name in set(result.action) & set(INTEGER_ACTIONABLE):
                assert result.action[name] == round(result.action[name]), (i, backend, name)
            # The squared cost's cut loop stops within a small absolute gap, which it reports.
            gap = max(result.solver.gap or 0.0, reference.solver.gap or 0.0)
            assert result.cost == pytest.approx(reference.cost, rel=1e-6, abs=1e-9 + gap), i
        grid = solvers[backends[0]].grid_oracle(
            x, constraints, values_per_feature=8, logit_margin=margin
        )
        if reference.status is SolveStatus.INFEASIBLE:
            assert grid is None, (i, raw)
        elif grid is not None:
            # Debt ratio's interpolated income term may make the MILP a little pessimistic.
            slack = 1e-7 * (1 + grid.cost) + 10 * reference.interpolation_error
            assert reference.cost <= grid.cost + slack, (i, raw)


@pytest.mark.parametrize("cost_kind", ["l1", "carma"])
def test_logistic_regression_all_backends_agree(gsmc_scm, gsmc_lr, cost_kind) -> None:
    people = rejected(gsmc_scm, gsmc_lr, N_LR, seed=11)
    assert len(people) == N_LR
    check_people(gsmc_scm, gsmc_lr, cost_kind, people, available_backends(), seed=5)


def test_mlp_verified_and_not_beaten_by_the_grid(gsmc_scm, gsmc_mlp) -> None:
    people = rejected(gsmc_scm, gsmc_mlp, N_MLP, seed=12)
    check_people(gsmc_scm, gsmc_mlp, "l1", people, ("highs",), seed=6)


def debt_ratio_lover(scm: StructuralCausalModel) -> Classifier:
    """Accepts more with income and, unlike GSMC's own classifiers, with debt ratio.

    The interpolation of the convex exp(-0.15 income) lies above it, so the MILP
    overestimates debt ratio and, with this classifier, the logit: its answers can be
    invalid, which is what the test needs.
    """
    weights = np.zeros(scm.num_features)
    weights[scm.index["monthly_income"]] = 0.3
    weights[scm.index["debt_ratio"]] = 2.0
    return Classifier.from_dict(
        {
            "schema_version": 1,
            "kind": "lr",
            "feature_names": list(scm.names),
            "scaler": {"mean": [0.0] * scm.num_features, "scale": [1.0] * scm.num_features},
            "layers": [{"weights": weights[:, None].tolist(), "bias": [-3.0]}],
        }
    )


@pytest.mark.parametrize("backend", backend_params())
def test_an_answer_the_interpolation_makes_invalid_is_caught_and_repaired(
    gsmc_scm, backend
) -> None:
    scm, clf = gsmc_scm, debt_ratio_lover(gsmc_scm)
    cost = CostProfile.for_model("l1", scm, clf)
    only_income = parse_constraints(
        {"lock": [n for n in scm.actionable if n != "monthly_income"]}, scm
    )
    # Few segments and no incumbent box: the interpolation spans the whole income domain.
    options = EngineOptions(breakpoints=4, incumbent_grid=0)
    x = rejected(scm, clf, 1, seed=3)[0]
    noise = scm.abduct_noise(x[None, :])[0]
    k = scm.index["monthly_income"]

    # The MILP alone, solved once: its answer fails verification through the exact model.
    formulation = RecourseFormulation(scm, clf, cost, breakpoints=options.breakpoints)
    context = formulation.context(x, only_income)
    assert formulation.interpolation_error(context) > 0.1
    outcome = create_backend(backend).solve(formulation.instantiate(context), SolverSettings())
    assert outcome.status is SolveStatus.OPTIMAL
    intervene = np.zeros(scm.num_features, dtype=bool)
    values = np.zeros(scm.num_features)
    intervene[k] = outcome.solution[formulation.m_col["monthly_income"]] > 0.5
    values[k] = outcome.solution[formulation.x_col["monthly_income"]]
    check = verify_action(scm, clf, cost, x, noise, only_income, intervene, values)
    assert not check.verified
    assert "below its threshold" in check.failures[0]

    # The engine catches it and re-solves with finer interpolation: verified.
    result = RecourseSolver(scm, clf, cost, backend=backend, options=options).solve(x, only_income)
    assert result.status is SolveStatus.OPTIMAL and result.verified, result.verification_failures
    assert result.solver.solves > 1
    assert result.interpolation_error < formulation.interpolation_error(context) / 10
    # Acceptance is monotone in income here: the cheapest valid income, by bisection.
    low, high = x[k], scm.variables[k].upper
    for _ in range(60):
        middle = (low + high) / 2
        row = scm.propagate_counterfactual(x[None, :], np.arange(len(x)) == k, middle)
        low, high = (low, middle) if clf.accepts(row)[0] else (middle, high)
    assert high <= result.action["monthly_income"] <= high + 0.1


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_cli_solves_a_gsmc_index_on_every_backend(backend) -> None:
    args = ["solve", "--dataset", "gsmc", "--index", "2", "--classifier", "lr"]
    result = CliRunner().invoke(main, [*args, "--backend", backend, "--format", "json"])
    assert result.exit_code == EXIT_RECOURSE, result.output
    data = json.loads(result.stdout)
    assert data["dataset"] == "gsmc" and data["status"] == "optimal" and data["verified"]


def test_cli_solves_a_row_of_a_table_of_gsmc_people(tmp_path: Path, gsmc_scm, gsmc_lr) -> None:
    people = tmp_path / "people.csv"
    rows = rejected(gsmc_scm, gsmc_lr, 3, seed=8)
    pd.DataFrame(rows, columns=gsmc_scm.names).to_csv(people, index=False)
    args = ["solve", "--dataset", "gsmc", "--classifier", "lr", "--data", str(people), "--row", "1"]
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code == EXIT_RECOURSE, result.output
    data = json.loads(result.stdout)
    assert data["verified"] and data["factual"]["age"] == pytest.approx(rows[1][2])


def test_example_person_is_rejected_and_solves_with_its_lock(gsmc_scm, gsmc_mlp) -> None:
    document = load_example("gsmc")
    row = [[document["individual"][name] for name in gsmc_scm.names]]
    assert not gsmc_mlp.accepts(row)[0]
    result = CliRunner().invoke(main, ["solve", str(EXAMPLE), "--format", "json"])
    assert result.exit_code == EXIT_RECOURSE, result.output
    data = json.loads(result.stdout)
    assert data["dataset"] == "gsmc" and data["classifier"] == "mlp" and data["verified"]
    assert "real_estate_loans" not in data["action"]
    assert data["counterfactual"]["income_group"] == float(
        data["counterfactual"]["monthly_income"] >= 5.4
    )


def test_train_classifier_on_gsmc(tmp_path: Path, gsmc_scm) -> None:
    args = ["train-classifier", "--dataset", "gsmc", "--kind", "lr", "--samples", "2000"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    classifier = Classifier.from_json((tmp_path / "classifier_lr.json").read_text())
    assert classifier.feature_names == gsmc_scm.names
