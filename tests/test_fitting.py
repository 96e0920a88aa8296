"""Bring your own data: fit a causal model to a table and a graph, then solve on it.

The table comes from a known linear causal model (with a binary, an integer and a
categorical column); the fitted coefficients must come back, recourse on the fitted model
must verify and keep the categorical one-hot, and bad input must be named, with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from models.costs import CostProfile
from models.fitting import FitError, encode_rows, fit_model, read_model, read_table
from models.graph import CausalGraph, GraphError
from models.preferences import parse_constraints
from models.scm import ModelFileError, StructuralCausalModel
from solver.backends import available_backends
from solver.cli import EXIT_RECOURSE, EXIT_USAGE, main
from solver.engine import RecourseSolver
from solver.milp import SolveStatus
from tests.conftest import random_constraints

GRAPH = """
[savings]
role = "actionable"
parents = ["income", "credit_lines"]
bounds = [-20, 60]

[gender]
role = "immutable"

[age]
role = "immutable"

[housing]
role = "actionable"

[credit_lines]
role = "actionable"

[income]
role = "actionable"
parents = ["age", "gender", "housing"]

[debt]
role = "non_actionable"
parents = ["income"]
"""
# The generating model, as fitted: intercept, then coefficient per regressor; noise sd.
TRUTH = {
    "income": ({"age": 0.05, "gender": 0.8, "housing_own": 0.5, "housing_rent": 0.0}, 1.0, 0.5),
    "savings": ({"income": 1.5, "credit_lines": 0.2}, 0.5, 1.0),
    "debt": ({"income": -0.3}, 2.0, 0.3),
}


def applicants(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    """People from the linear causal model TRUTH; approved by a score of the features."""
    rng = np.random.default_rng(seed)
    gender = (rng.random(n) < 0.4).astype(int)
    housing = rng.choice(["own", "rent", "other"], size=n, p=[0.5, 0.35, 0.15])
    age = rng.normal(45, 12, n)
    credit_lines = rng.poisson(5, n)
    own = (housing == "own").astype(float)
    income = 1.0 + 0.05 * age + 0.8 * gender + 0.5 * own + rng.normal(0, 0.5, n)
    savings = 0.5 + 1.5 * income + 0.2 * credit_lines + rng.normal(0, 1.0, n)
    debt = 2.0 - 0.3 * income + rng.normal(0, 0.3, n)
    score = income + 0.5 * savings - 2 * debt - 0.02 * age + 0.3 * own
    approved = (score > np.quantile(score, 0.3)).astype(int)
    return pd.DataFrame(
        {
            "applicant_id": np.arange(n),  # not in the graph: ignored
            "gender": gender,
            "housing": housing,
            "age": age,
            "credit_lines": credit_lines,
            "income": income,
            "savings": savings,
            "debt": debt,
            "approved": approved,
        }
    )


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return applicants()


@pytest.fixture(scope="module")
def fitted(table):
    return fit_model(table, CausalGraph.from_toml(GRAPH), "approved", data_name="applicants.csv")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_inputs(tmp_path: Path, table: pd.DataFrame, graph: str = GRAPH) -> tuple[Path, Path]:
    data, graph_path = tmp_path / "applicants.csv", tmp_path / "graph.toml"
    table.to_csv(data, index=False)
    graph_path.write_text(graph)
    return data, graph_path


# -- fitting ------------------------------------------------------------------------------


def test_the_graph_is_ordered_parents_first() -> None:
    order = CausalGraph.from_toml(GRAPH).order
    for child, parents in (("savings", ("income", "credit_lines")), ("income", ("age",))):
        assert all(order.index(p) < order.index(child) for p in parents)


def test_fitted_coefficients_come_back(fitted) -> None:
    equations = {fit.feature: fit for fit in fitted.report.equations}
    assert set(equations) == set(TRUTH)
    for feature, (coefficients, intercept, sd) in TRUTH.items():
        fit = equations[feature]
        got = dict(zip(fit.regressors, fit.coefficients, strict=True))
        assert set(got) == set(coefficients)
        for name, value in coefficients.items():
            tolerance = 0.01 if name == "age" else 0.06
            assert got[name] == pytest.approx(value, abs=tolerance), (feature, name)
        assert fit.intercept == pytest.approx(intercept, abs=0.25), feature
        assert fit.residual_sd == pytest.approx(sd, rel=0.05), feature
        assert 0.3 < fit.r2 < 1
    report = fitted.report
    assert report.types == {
        "savings": "continuous",
        "gender": "binary",
        "age": "continuous",
        "housing": "categorical",
        "credit_lines": "integer",
        "income": "continuous",
        "debt": "continuous",
    }
    assert report.classifier["test_accuracy"] > 0.95
    scm = fitted.scm
    assert scm.one_hot == {"housing": ("housing_other", "housing_own", "housing_rent")}
    gender = scm.variables[scm.index["gender"]]
    assert gender.noise.kind == "bernoulli" and gender.noise.params["p"] == pytest.approx(0.4, 0.1)
    assert scm.variables[scm.index["credit_lines"]].noise.kind == "discrete"
    savings = scm.variables[scm.index["savings"]]
    assert (savings.lower, savings.upper) == (-20, 60)  # the graph's bounds


def test_the_fitted_model_samples_valid_people(fitted) -> None:
    x, noise = fitted.scm.sample(5_000, seed=1)
    assert fitted.scm.one_hot_valid(x).all()
    np.testing.assert_allclose(fitted.scm.abduct_noise(x), noise, atol=1e-8)
    lines = x[:, fitted.scm.index["credit_lines"]]
    assert np.array_equal(lines, np.round(lines))


# -- recourse on the fitted model ---------------------------------------------------------


def test_recourse_on_the_fitted_model_verifies_on_every_backend(fitted, table) -> None:
    scm, clf = fitted.scm, fitted.classifier
    x = encode_rows(table, scm, fitted.document["encoding"])
    people = x[~clf.accepts(x)][:40]
    cost = CostProfile.for_model("l1", scm, clf)
    solvers = {b: RecourseSolver(scm, clf, cost, backend=b) for b in available_backends()}
    rng = np.random.default_rng(0)
    numeric = tuple(n for n in scm.actionable if n not in scm.one_hot["housing"])
    for i, person in enumerate(people):
        raw = random_constraints(rng, numeric)
        if rng.random() < 0.3:
            raw["lock"] = [*raw.get("lock", []), "housing"]
        constraints = parse_constraints(raw, scm)
        results = {b: s.solve(person, constraints) for b, s in solvers.items()}
        reference = results["highs"]
        for backend, result in results.items():
            assert result.status is reference.status, (i, raw, backend)
            if result.status is SolveStatus.INFEASIBLE:
                continue
            assert result.status is SolveStatus.OPTIMAL and result.verified, (i, raw, backend)
            assert not set(result.action) & constraints.locks, (i, raw, backend)
            counterfactual = np.array([result.counterfactual[n] for n in scm.names])
            assert scm.one_hot_valid(counterfactual)[0], (i, backend)
            assert result.cost == pytest.approx(reference.cost, rel=1e-6, abs=1e-9), (i, backend)


def test_changing_the_categorical_keeps_one_level(fitted, table) -> None:
    scm, clf = fitted.scm, fitted.classifier
    cost = CostProfile.for_model("l1", scm, clf)
    solver = RecourseSolver(scm, clf, cost)
    x = encode_rows(table, scm, fitted.document["encoding"])
    renters = x[(~clf.accepts(x)) & (table["housing"] == "rent").to_numpy()]
    only_housing = parse_constraints({"lock": ["income", "savings", "credit_lines"]}, scm)
    results = [solver.solve(person, only_housing) for person in renters[:20]]
    switched = [r for r in results if r.status is SolveStatus.OPTIMAL]
    assert switched, "some renter must get accepted by changing housing alone"
    for result in switched:
        assert result.verified, result.verification_failures
        assert set(result.action) <= set(scm.one_hot["housing"])
        levels = [result.counterfactual[n] for n in scm.one_hot["housing"]]
        assert sorted(levels) == [0.0, 0.0, 1.0] and result.counterfactual["housing_rent"] == 0
    locked = solver.solve(renters[0], parse_constraints({"lock": ["housing"]}, scm))
    assert not set(locked.action) & set(scm.one_hot["housing"])


# -- the command line, end to end ---------------------------------------------------------


def test_fit_then_solve_a_row(tmp_path: Path, table) -> None:
    data, graph = write_inputs(tmp_path, table)
    out = tmp_path / "my-model"
    result = run("fit", "--data", str(data), "--graph", str(graph), "--label", "approved",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "income <- age, gender, housing_own, housing_rent: R^2" in result.output
    assert "classifier lr: validation accuracy" in result.output
    assert {p.name for p in out.iterdir()} == {"scm.json", "classifier_lr.json", "fit_report.json"}
    report = json.loads((out / "fit_report.json").read_text())
    assert report["rows"] == len(table) and set(report["equations"]) == set(TRUTH)
    scm, clf, encoding = read_model(out, "lr")
    row = int(np.flatnonzero(~clf.accepts(encode_rows(table, scm, encoding)))[0])
    solved = run("solve", "--model", str(out), "--data", str(data), "--row", str(row),
                 "--lock", "age", "--lock", "housing", "--format", "json")  # fmt: skip
    assert solved.exit_code == EXIT_RECOURSE, solved.output
    answer = json.loads(solved.stdout)
    assert answer["status"] == "optimal" and answer["verified"]
    assert not {"age", *scm.one_hot["housing"]} & set(answer["action"])
    assert answer["factual"]["income"] == pytest.approx(table["income"][row])


def test_fit_an_mlp_from_parquet_and_solve(tmp_path: Path, table) -> None:
    pytest.importorskip("pyarrow")
    data = tmp_path / "applicants.parquet"
    table.head(1200).to_parquet(data)
    graph = tmp_path / "graph.toml"
    graph.write_text(GRAPH)
    out = tmp_path / "mlp-model"
    result = run("fit", "--data", str(data), "--graph", str(graph), "--label", "approved",
                 "--out", str(out), "--classifier", "mlp")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "classifier mlp" in result.output
    solved = run("solve", "--model", str(out), "--index", "0", "--time-limit", "30")
    assert solved.exit_code == EXIT_RECOURSE, solved.output
    assert "mlp classifier" in solved.output and "verified: yes" in solved.output


# -- bad input ----------------------------------------------------------------------------


def cyclic(graph: str) -> str:
    return graph.replace('parents = ["income"]', 'parents = ["income", "savings"]').replace(
        'parents = ["income", "credit_lines"]', 'parents = ["income", "credit_lines", "debt"]'
    )


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (cyclic(GRAPH), "The graph has a cycle: "),
        (
            GRAPH + '\n[tenure]\nrole = "immutable"\n',
            "The node 'tenure' of the graph has no column",
        ),
        (GRAPH.replace('role = "non_actionable"', 'role = "fixed"'), "The 'role' of node 'debt'"),
        (GRAPH + '\n[approved]\nrole = "immutable"\n', "The label 'approved' must not be a node"),
        (
            GRAPH.replace('"income", "credit_lines"]', '"income", "wealth"]'),
            "The 'parents' of node 'savings' must be nodes of the graph. Got ['wealth']",
        ),
        (
            GRAPH.replace('[debt]\nrole = "non_actionable"', '[debt]\nrole = "immutable"'),
            "The node 'debt' is 'immutable' but its parent 'income' can be moved",
        ),
        (
            GRAPH.replace(
                '[housing]\nrole = "actionable"',
                '[housing]\nrole = "actionable"\nparents = ["age"]',
            ),
            "The 'parents' of node 'housing' must be empty: a categorical column",
        ),
        (GRAPH.replace("bounds = [-20, 60]", "bounds = [0, 5]"), "The 'bounds' of node 'savings'"),
        (GRAPH.replace("bounds = [-20, 60]", "bound = [0, 5]"), "unknown keys ['bound']"),
        ("[age\n", "is not valid TOML"),
    ],
)
def test_bad_graphs_are_named(tmp_path: Path, table, graph: str, message: str) -> None:
    data, graph_path = write_inputs(tmp_path, table.head(200), graph)
    result = run("fit", "--data", str(data), "--graph", str(graph_path), "--label", "approved",
                 "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.assign(housing=[f"street {i}" for i in range(len(t))]),
            "The column 'housing' is not numeric and has 200 distinct values; at most 10",
        ),
        (lambda t: t.assign(credit_lines=3), "The column 'credit_lines' holds the single value"),
        (lambda t: t.assign(approved="yes"), "The label column 'approved' must hold both 0 and 1"),
        (lambda t: t.drop(columns="approved"), "The label column 'approved' is not in the table"),
        (
            lambda t: t.assign(income=t["income"].where(t.index % 50 != 3)),
            "The table has 4 missing values in 4 rows (0-based): 'income' 4 (rows 3, 53, 103, "
            "153). Fill them in, or pass --drop-missing",
        ),
    ],
)
def test_bad_tables_are_named(tmp_path: Path, table, change, message: str) -> None:
    data, graph = write_inputs(tmp_path, change(table.head(200).copy()))
    result = run("fit", "--data", str(data), "--graph", str(graph), "--label", "approved",
                 "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output


def test_drop_missing_drops_those_rows(tmp_path: Path, table) -> None:
    holes = table.head(400).copy()
    holes.loc[[5, 9], "age"] = np.nan
    data, graph = write_inputs(tmp_path, holes)
    result = run("fit", "--data", str(data), "--graph", str(graph), "--label", "approved",
                 "--out", str(tmp_path / "out"), "--drop-missing")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitted on 398 rows of applicants.csv (2 with missing values dropped)" in result.output


def test_solve_rows_that_do_not_fit_the_model(tmp_path: Path, table) -> None:
    data, graph = write_inputs(tmp_path, table.head(300))
    out = tmp_path / "out"
    fit = run("fit", "--data", str(data), "--graph", str(graph), "--label", "approved",
              "--out", str(out))  # fmt: skip
    assert fit.exit_code == 0, fit.output
    other = tmp_path / "other.csv"
    table.head(3).assign(housing=["own", "boat", "rent"]).to_csv(other, index=False)
    cases = [
        (["--data", str(data), "--row", "300"], "'--row'"),
        (["--data", str(other), "--row", "1"], "The column 'housing' holds ['boat']"),
        (["--data", str(data)], "Give --data FILE and --row N together"),
        (["--index", "0", "--dataset", "loan"], "--model replaces the built-in dataset"),
    ]
    for args, message in cases:
        result = run("solve", "--model", str(out), *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in result.output, args


# -- the model file's new parts -----------------------------------------------------------


def one_hot_model(**changes) -> dict:
    levels = [
        {"name": f"colour_{c}", "type": "binary", "role": "actionable", "bounds": [0, 1],
         "equation": "noise", "noise": {"distribution": "bernoulli", "p": p}}
        for c, p in (("red", 0.2), ("green", 0.3), ("blue", 0.5))
    ]  # fmt: skip
    document = {"schema_version": 1, "variables": levels, "one_hot": {"colour": [
        "colour_red", "colour_green", "colour_blue"]}}  # fmt: skip
    document.update(changes)
    return document


def test_one_hot_levels_are_sampled_jointly() -> None:
    scm = StructuralCausalModel.from_dict(one_hot_model())
    x, _ = scm.sample(20_000, seed=0)
    assert scm.one_hot_valid(x).all()
    np.testing.assert_allclose(x.mean(axis=0), [0.2, 0.3, 0.5], atol=0.02)


@pytest.mark.parametrize(
    ("one_hot", "message"),
    [
        ({"colour": ["colour_red"]}, "at least two distinct variables"),
        ({"colour": ["colour_red", "colour_green"]}, "probabilities that sum to 1"),
        ({"colour_red": ["colour_green", "colour_blue"]}, "identifiers that are not variables"),
    ],
)
def test_bad_one_hot_groups_are_named(one_hot: dict, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        StructuralCausalModel.from_dict(one_hot_model(one_hot=one_hot))


def test_discrete_noise_must_be_a_law() -> None:
    document = one_hot_model(one_hot={})
    document["variables"][0]["noise"] = {
        "distribution": "discrete",
        "values": [0, 1],
        "probabilities": [0.5, 0.6],
    }
    with pytest.raises(ModelFileError, match="must be >= 0 and sum to 1"):
        StructuralCausalModel.from_dict(document)


def test_graph_errors_are_graph_errors() -> None:
    with pytest.raises(GraphError, match="The node 'a b' must be a name"):
        CausalGraph.from_dict({"a b": {"role": "immutable"}})
    with pytest.raises(FitError, match="must end in .csv, .parquet or .pq"):
        read_table(Path("people.xlsx"))
