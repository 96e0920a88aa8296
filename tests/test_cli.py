"""The ``recourse`` command line: outputs, overrides, error messages and exit codes.

Solves use the logistic-regression classifier (fast); one test runs the default MLP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import instances
from instances import load_classifier, load_scm
from models.classifiers import Classifier
from solver.backends import backend_names
from solver.cli import (
    EXIT_NO_RECOURSE,
    EXIT_RECOURSE,
    EXIT_SOLVER_FAILURE,
    EXIT_TIME_LIMIT,
    EXIT_UNVERIFIED,
    EXIT_USAGE,
    exit_code,
    main,
    rejected_population,
)
from solver.milp import SolveStatus
from solver.result import RecourseResult, SolverInfo

EXAMPLE = Path(instances.__file__).parent / "loan" / "example_person.json"
RESULT_KEYS = {
    "status", "factual", "action", "counterfactual", "cost", "probability", "verified",
    "solver", "dataset", "classifier", "cost_profile",
}  # fmt: skip


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def solve_lr(*args: str) -> Result:
    return run("solve", "--dataset", "loan", "--index", "0", "--classifier", "lr", *args)


def write_instance(tmp_path: Path, **changes: Any) -> Path:
    document = json.loads(EXAMPLE.read_text())
    document.update(changes)
    path = tmp_path / "person.json"
    path.write_text(json.dumps(document))
    return path


# -- solve: answers ----------------------------------------------------------------------


def test_solve_index_json_is_optimal_and_verified() -> None:
    result = solve_lr("--format", "json")
    assert result.exit_code == EXIT_RECOURSE, result.output
    data = json.loads(result.stdout)
    assert set(data) >= RESULT_KEYS
    assert data["status"] == "optimal"
    assert data["verified"] is True
    assert data["action"]
    assert {"name", "version", "runtime_seconds", "gap"} <= set(data["solver"])
    assert data["dataset"] == "loan"
    assert data["classifier"] == "lr"
    assert data["cost_profile"] == {"kind": "l1", "sparsity": 0.0}


def test_solve_text_explains_action_knock_on_and_verification() -> None:
    result = solve_lr()
    assert result.exit_code == EXIT_RECOURSE, result.output
    assert "To be accepted, change:" in result.output
    # Loan: savings has income as its only parent, and index 0 is helped by more income.
    assert "What follows from it:" in result.output
    assert "(moves with income)" in result.output
    assert "verified: yes" in result.output


def test_solve_default_mlp_index_0() -> None:
    # The README's first command. MLP solves can still take tens of seconds on a loaded
    # machine (see benchmarks/RESULTS.md), so a time limit with a verified action is
    # accepted here; the answer itself must verify either way.
    result = run("solve", "--index", "0", "--time-limit", "20")
    assert result.exit_code in (EXIT_RECOURSE, EXIT_TIME_LIMIT), result.output
    assert "mlp classifier" in result.output
    assert "verified: yes" in result.output


def test_example_instance_is_rejected_by_the_mlp() -> None:
    document = instances.load_example("loan")
    scm, mlp = load_scm("loan"), load_classifier("loan", "mlp")
    row = [[document["individual"][name] for name in scm.names]]
    assert not mlp.accepts(row)[0]


def test_example_file_solves_and_keeps_its_lock() -> None:
    result = run("solve", str(EXAMPLE), "--classifier", "lr", "--format", "json")
    assert result.exit_code == EXIT_RECOURSE, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "optimal" and data["verified"]
    assert "education" not in data["action"]
    assert data["constraints"]["lock"] == ["education"]
    assert data["constraints"]["rank"] == ["savings", "income", "loan_amount"]


def test_flags_add_locks_and_replace_preferences_of_the_file() -> None:
    result = run(
        "solve", str(EXAMPLE), "--classifier", "lr", "--lock", "savings", "--score",
        "income=5,loan_amount=2", "--bound", "income=:10", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == EXIT_RECOURSE, result.output
    constraints = json.loads(result.stdout)["constraints"]
    assert constraints["lock"] == ["education", "savings"]
    assert "rank" not in constraints
    assert constraints["score"] == {"income": 5.0, "loan_amount": 2.0}
    assert constraints["bounds"]["income"][1] == 10.0


@pytest.mark.parametrize(
    "locks",
    [
        ["--lock", "education,loan_amount,income,savings"],
        ["--lock", "education", "--lock", "loan_amount", "--lock", "income,savings"],
    ],
)
def test_locking_every_actionable_feature_has_no_recourse(locks: list[str]) -> None:
    result = solve_lr(*locks)
    assert result.exit_code == EXIT_NO_RECOURSE, result.output
    assert "No recourse" in result.output
    assert "locked: education, income, loan_amount, savings" in result.output


def test_export_writes_an_lp_file(tmp_path: Path) -> None:
    path = tmp_path / "model.lp"
    result = solve_lr("--export", str(path))
    assert result.exit_code == EXIT_RECOURSE, result.output
    text = path.read_text()
    assert "min" in text and "cost" in text


# -- solve: bad input --------------------------------------------------------------------


def test_unknown_feature_in_lock_is_named() -> None:
    result = solve_lr("--lock", "colour")
    assert result.exit_code == EXIT_USAGE
    assert "'lock'" in result.output and "'colour'" in result.output
    assert "Traceback" not in result.output


def test_duplicate_in_rank_is_named() -> None:
    result = solve_lr("--rank", "income,income")
    assert result.exit_code == EXIT_USAGE
    assert "'rank'" in result.output and "once" in result.output


def test_bad_json_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    result = run("solve", str(path))
    assert result.exit_code == EXIT_USAGE
    assert "broken.json is not valid JSON" in result.output


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema_version": 2}, "'schema_version' of the instance file person.json must be 1"),
        ({"colour": "blue"}, "unknown keys ['colour']"),
        ({"classifier": "svm"}, "'classifier' of the instance file person.json must be one of"),
        ({"cost": {"profile": "l2"}}, "'profile' of the 'cost'"),
        ({"cost": {"sparsity": -1}}, "'cost.sparsity'"),
        ({"constraints": {"lock": "income"}}, "'lock' of the individual in person.json"),
    ],
)
def test_invalid_instance_documents(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    result = run("solve", str(write_instance(tmp_path, **changes)), "--classifier", "lr")
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("feature", "value", "message"),
    [
        ("age", None, "missing ['age']"),
        ("age", float("nan"), "'individual.age' of the instance file person.json must be a finite"),
        ("gender", 0.5, "'individual.gender'"),
        ("income", 1e6, "domain"),
        ("education", 0.5, "cannot come from the causal model"),
    ],
)
def test_invalid_individuals(
    tmp_path: Path, feature: str, value: float | None, message: str
) -> None:
    individual = dict(json.loads(EXAMPLE.read_text())["individual"])
    if value is None:
        del individual[feature]
    else:
        individual[feature] = value
    result = run("solve", str(write_instance(tmp_path, individual=individual)))
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output


def test_index_out_of_range_names_the_number_of_rejected_people() -> None:
    rejected = len(rejected_population(load_scm("loan"), load_classifier("loan", "lr")))
    result = run("solve", "--index", str(rejected), "--classifier", "lr")
    assert result.exit_code == EXIT_USAGE
    assert "'--index'" in result.output and f"rejects {rejected} of" in result.output


@pytest.mark.parametrize("args", [[], [str(EXAMPLE), "--index", "0"]])
def test_exactly_one_of_file_and_index(args: list[str]) -> None:
    result = run("solve", *args)
    assert result.exit_code == EXIT_USAGE
    assert "either INSTANCE_JSON or --index" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bound", "income=5"], "'--bound'"),
        (["--bound", "income=a:5"], "'--bound'"),
        (["--score", "income"], "'--score'"),
        (["--direction", "income=up"], "'direction'"),
        (["--export", "model.txt"], "'--export'"),
    ],
)
def test_malformed_flags(args: list[str], message: str) -> None:
    result = solve_lr(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output


# -- backends and train-classifier -------------------------------------------------------


def test_backends_lists_every_registered_backend() -> None:
    result = run("backends")
    assert result.exit_code == 0, result.output
    for name in ("highs", "ortools", "pyomo"):
        assert name in result.output
    rows = json.loads(run("backends", "--format", "json").stdout)
    assert [row["name"] for row in rows] == list(backend_names())
    assert all({"available", "version"} <= set(row) for row in rows)


def test_train_classifier_writes_a_loadable_classifier(tmp_path: Path) -> None:
    out = tmp_path / "classifiers"
    result = run("train-classifier", "--dataset", "loan", "--kind", "lr", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    classifier = Classifier.from_json((out / "classifier_lr.json").read_text())
    assert classifier.kind == "lr"
    assert classifier.feature_names == load_scm("loan").names


def test_train_classifier_needs_out_or_in_place() -> None:
    result = run("train-classifier", "--kind", "lr")
    assert result.exit_code == EXIT_USAGE
    assert "--out DIR or --in-place" in result.output


# -- exit codes --------------------------------------------------------------------------


def _result(status: SolveStatus, *, verified: bool, has_action: bool) -> RecourseResult:
    row = {"income": 0.0}
    return RecourseResult(
        status=status,
        factual=row,
        action={"income": 1.0} if has_action else {},
        counterfactual={"income": 1.0} if has_action else None,
        cost=1.0 if has_action else None,
        probability=0.6 if has_action else None,
        factual_probability=0.2,
        verified=verified,
        verification_failures=() if verified or not has_action else ("below threshold",),
        solver=SolverInfo("highs", "1", 0.0, 0.0, None),
    )


@pytest.mark.parametrize(
    ("status", "verified", "has_action", "code"),
    [
        (SolveStatus.OPTIMAL, True, True, EXIT_RECOURSE),
        (SolveStatus.INFEASIBLE, False, False, EXIT_NO_RECOURSE),
        (SolveStatus.ERROR, False, False, EXIT_SOLVER_FAILURE),
        (SolveStatus.UNKNOWN, False, False, EXIT_SOLVER_FAILURE),
        (SolveStatus.TIME_LIMIT, True, True, EXIT_TIME_LIMIT),
        (SolveStatus.TIME_LIMIT, False, False, EXIT_TIME_LIMIT),
        (SolveStatus.OPTIMAL, False, True, EXIT_UNVERIFIED),
        (SolveStatus.TIME_LIMIT, False, True, EXIT_UNVERIFIED),
    ],
)
def test_exit_codes(status: SolveStatus, verified: bool, has_action: bool, code: int) -> None:
    assert exit_code(_result(status, verified=verified, has_action=has_action)) == code
