"""``recourse bench``: the suite end to end on a tiny population, resume, measures, statistics.

The smoke run uses the logistic-regression classifier (a few ms per exact solve).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from instances import load_classifier, load_scm
from models.costs import CostProfile
from models.preferences import ConstraintArrays, parse_constraints
from solver.baselines import GridOracleSolver, NonCausalSolver
from solver.bench.measures import Actions, PlausibilityScorer, measure
from solver.bench.run import METHODS
from solver.bench.stats import Bootstrap
from solver.cli import EXIT_USAGE, main
from solver.labels import sample_population
from solver.milp import SolveStatus

N, N_BASELINE, SCHEMES = 24, 8, ("universal", "hard", "rank")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def bench_args(out: Path) -> list[str]:
    return [
        "bench",
        "--classifier",
        "lr",
        "--n",
        str(N),
        "--n-train",
        "80",
        "--n-baseline",
        str(N_BASELINE),
        "--schemes",
        ",".join(SCHEMES),
        "--costs",
        "l1,carma",
        "--bootstrap",
        "50",
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "report"
    result = run(*bench_args(out))
    assert result.exit_code == 0, result.output
    return out


def test_smoke_writes_every_file_and_section(smoke: Path) -> None:
    report = (smoke / "report.md").read_text()
    for heading in ("## Cost profile `l1`", "## Cost profile `carma`", "### Group gaps"):
        assert heading in report
    for finding in ("**(1)", "**(2)", "**(3)"):
        assert report.count(finding) == 2  # once per cost profile
    for name in re.findall(r"\(figures/([^)]+)\)", report):
        assert (smoke / "figures" / name).stat().st_size > 1000
    for name in ("summary.csv", "gaps.csv", "timings.csv"):
        assert len(pd.read_csv(smoke / name)) > 0


def test_smoke_every_method_answers_the_same_people(smoke: Path) -> None:
    people = pd.read_parquet(smoke / "people.parquet")
    counts = people.groupby(["cost_profile", "scheme", "method"]).size()
    for cost in ("l1", "carma"):
        for scheme in SCHEMES:
            for method in METHODS:
                expected = N_BASELINE if method in ("grid-oracle", "non-causal") else N
                assert counts[(cost, scheme, method)] == expected
    exact = people[people["method"] == "exact"].set_index(["cost_profile", "scheme", "person_id"])
    for method, part in people.groupby("method"):
        keyed = part.set_index(["cost_profile", "scheme", "person_id"])
        # The same people, with the same feasibility, whichever method answers.
        assert keyed["feasible"].equals(exact.loc[keyed.index, "feasible"]), method


def test_smoke_validity_is_rechecked_not_trusted(smoke: Path) -> None:
    people = pd.read_parquet(smoke / "people.parquet")
    valid = people["valid"]
    assert (people.loc[valid, "accepted"] & people.loc[valid, "respects_constraints"]).all()
    assert people.loc[valid, ["cost", "lof", "noise_loglik"]].notna().all().all()
    assert people.loc[~valid, ["cost", "lof"]].isna().all().all()
    exact = people[people["method"] == "exact"]
    assert (exact["valid"] == exact["feasible"]).all()  # exact answers verify, or none exists
    repaired = people[people["method"] == "amortizer + repair"]
    assert (repaired["valid"] == repaired["feasible"]).all()  # repair never leaves a failure
    # Loan's MILP is exact: nothing valid is cheaper than the optimum's proven lower bound
    # (the squared cost's answers may sit within its reported gap).
    assert (people.loc[valid & people["cost_ratio"].notna(), "below_optimum"] == 0).all()
    l1 = valid & (people["cost_profile"] == "l1") & people["cost_ratio"].notna()
    assert (people.loc[l1, "cost_ratio"] >= 1 - 1e-6).all()
    # Under hard constraints the universal recommendation asks some people for the
    # impossible; the check must see it.
    universal = people[(people["method"] == "exact-universal") & (people["scheme"] == "hard")]
    assert (~universal["respects_constraints"]).any()


def test_rerun_resumes_without_solving_again(smoke: Path) -> None:
    result = run(*bench_args(smoke))
    assert result.exit_code == 0, result.output
    report = (smoke / "report.md").read_text()
    solved = [int(n) for n in re.findall(r"people, (\d+) solved by this run", report)]
    assert solved and not any(solved)


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [("--schemes", "universal,nope", "schemes"), ("--costs", "l3", "costs")],
)
def test_bad_lists_exit_2_naming_the_field(tmp_path: Path, option: str, value: str, field: str):
    args = bench_args(tmp_path / "out")
    args[args.index(option) + 1] = value
    result = run(*args)
    assert result.exit_code == EXIT_USAGE
    assert f"'{field}'" in result.output and "Traceback" not in result.output


def test_baseline_larger_than_population_exits_2(tmp_path: Path) -> None:
    args = bench_args(tmp_path / "out")
    args[args.index("--n-baseline") + 1] = str(N + 1)
    result = run(*args)
    assert result.exit_code == EXIT_USAGE and "'n_baseline'" in result.output


# -- methods and measures ----------------------------------------------------------------


def test_independent_model_moves_nothing_but_the_edit() -> None:
    scm = load_scm("loan")
    independent = scm.independent()
    x, _ = scm.sample(50, 3)
    intervene = np.zeros_like(x, dtype=bool)
    intervene[:, scm.index["income"]] = True
    values = x + 1.0
    moved = independent.propagate_counterfactual(x, intervene, values)
    income = scm.index["income"]
    assert np.allclose(np.delete(moved, income, axis=1), np.delete(x, income, axis=1))
    real = scm.propagate_counterfactual(x, intervene, values)
    assert not np.allclose(real[:, scm.index["savings"]], x[:, scm.index["savings"]])


def test_non_causal_answers_are_checked_in_the_causal_model() -> None:
    scm, clf = load_scm("loan"), load_classifier("loan", "mlp")
    cost = CostProfile.for_model("l1", scm, clf)
    solver = NonCausalSolver(scm, clf, cost, backend="highs")
    people = sample_population(scm, clf, 12, 1).x
    constraints = parse_constraints({}, scm)
    results = [solver.solve(x, constraints) for x in people]
    for x, result in zip(people, results, strict=True):
        assert result.answered_by == "non-causal"
        intervene = np.array([n in result.action for n in scm.names])
        values = np.array([result.action.get(n, 0.0) for n in scm.names])
        real = scm.propagate_counterfactual(x[None], intervene[None], values[None])
        assert result.verified == bool(clf.probability(real)[0] >= clf.threshold)
    # Ignoring how savings follow income, some answers fail once the world responds.
    assert not all(r.verified for r in results)


def test_grid_oracle_reports_not_found_without_claiming_infeasible() -> None:
    scm, clf = load_scm("loan"), load_classifier("loan", "lr")
    cost = CostProfile.for_model("l1", scm, clf)
    oracle = GridOracleSolver(scm, clf, cost, values_per_feature=3)
    x = sample_population(scm, clf, 1, 0).x[0]
    everything_locked = parse_constraints({"lock": list(scm.actionable)}, scm)
    result = oracle.solve(x, everything_locked)
    assert result.status is SolveStatus.NOT_FOUND and not result.verified
    found = oracle.solve(x, parse_constraints({}, scm))
    assert found.status is SolveStatus.FEASIBLE and found.verified


def test_measures_flag_a_locked_feature_and_a_rejected_answer() -> None:
    scm, clf = load_scm("loan"), load_classifier("loan", "lr")
    cost = CostProfile.for_model("l1", scm, clf)
    x = sample_population(scm, clf, 3, 0).x
    people = [
        parse_constraints({"lock": ["income"]}, scm),
        parse_constraints({}, scm),
        parse_constraints({}, scm),
    ]
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    intervene = np.zeros_like(x, dtype=bool)
    intervene[:, scm.index["income"]] = True
    values = x.copy()
    values[:, scm.index["income"]] = [14.0, 14.0, x[2, scm.index["income"]] + 1e-3]
    frame = measure(
        scm,
        clf,
        cost,
        PlausibilityScorer(scm),
        x,
        arrays,
        Actions(intervene, values, np.ones(3, dtype=bool)),
    )
    assert frame["respects_constraints"].tolist() == [False, True, True]
    assert frame["accepted"].tolist()[:2] == [True, True] and not frame["accepted"][2]
    assert frame["valid"].tolist() == [False, True, False]
    assert np.isnan(frame["cost"][0]) and frame["cost"][1] > 0


# -- statistics --------------------------------------------------------------------------


def test_bootstrap_gap_and_paired_difference() -> None:
    boot = Bootstrap(400, 0)
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(1.0, 0.1, 300), rng.normal(0.0, 0.1, 300)])
    group = np.arange(600) < 300
    gap = boot.gap(values, group)
    assert gap.low < 1.0 < gap.high and gap.excludes_zero and abs(gap.value - 1) < 0.05
    same = boot.paired_difference(values, values)
    assert same.value == same.low == same.high == 0.0 and not same.excludes_zero
    with_nan = values.copy()
    with_nan[::2] = np.nan  # costs of invalid answers are NaN: left out, not zero
    assert abs(boot.mean(with_nan).value - np.nanmean(with_nan)) < 1e-12
    assert np.isnan(boot.gap(np.full(600, np.nan), group).value)
