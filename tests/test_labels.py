"""``recourse label``: elicitation schemes, parallel and distributed runs, resume, errors.

Solves use the logistic-regression classifier (a few ms per person) and small populations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from models.elicitation import (
    LOCK_BASE,
    LOCK_STEP,
    SCHEMES,
    ElicitationError,
    PreferenceElicitor,
)
from models.preferences import SCORE_MAX, parse_constraints
from solver import labels
from solver.cli import EXIT_OUTPUT_CONFLICT, EXIT_USAGE, main
from solver.labels import (
    TIMING_COLUMNS,
    ChunkStore,
    ChunkTask,
    LabelJob,
    label_chunk,
    sample_population,
)

ROOT = Path(__file__).resolve().parents[1]
N, CHUNK, SEED = 48, 8, 5
BASE = ("label", "--dataset", "loan", "--classifier", "lr", "--seed", str(SEED), "--no-progress")


def label(*args: str) -> Result:
    return CliRunner().invoke(main, [*BASE, *args])


def labels_of(path: Path) -> pa.Table:
    """The table without the columns that differ between identical runs."""
    return pq.ParquetFile(path).read().drop_columns(list(TIMING_COLUMNS))


def assert_same_labels(path: Path, expected: Path) -> None:
    table, reference = labels_of(path), labels_of(expected)
    assert table.column_names == reference.column_names
    for name in reference.column_names:
        assert table.column(name).equals(reference.column(name)), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixed-scheme job with one worker, in this process."""
    out = tmp_path_factory.mktemp("reference") / "labels.parquet"
    result = label("--n", str(N), "--chunk-size", str(CHUNK), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


# -- the output --------------------------------------------------------------------------


def test_output_has_every_person_once_and_the_job_metadata(reference, loan_scm, loan_lr) -> None:
    table = pq.read_table(reference)
    assert table.column("person_id").to_pylist() == list(range(N))
    assert not reference.with_name(reference.name + ".parts").exists()
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(reference).metadata.items()}
    assert metadata["scm_hash"] == loan_scm.content_hash()
    assert metadata["classifier_hash"] == loan_lr.content_hash()
    assert metadata["scheme"] == "mixed" and metadata["seed"] == str(SEED)
    assert metadata["cost_profile"] == "l1" and metadata["classifier_kind"] == "lr"
    assert metadata["backend"] == "highs" and metadata["backend_version"]
    assert metadata["package_version"]
    assert json.loads(metadata["arguments"])["n"] == N
    frame = table.to_pandas()
    population = sample_population(loan_scm, loan_lr, N, SEED)
    factual = frame[[f"factual.{name}" for name in loan_scm.names]].to_numpy()
    np.testing.assert_array_equal(factual, population.x)
    assert set(frame["status"]) <= {"optimal", "infeasible"}
    solved = frame[frame["status"] == "optimal"]
    assert solved["verified"].all() and (solved["probability"] >= 0.5).all()


def test_population_is_rejected_seeded_and_extends_with_n(loan_scm, loan_lr) -> None:
    small = sample_population(loan_scm, loan_lr, 30, seed=1)
    large = sample_population(loan_scm, loan_lr, 60, seed=1)
    np.testing.assert_array_equal(small.x, large.x[:30])
    np.testing.assert_array_equal(small.source_index, large.source_index[:30])
    assert not loan_lr.accepts(large.x).any()
    other = sample_population(loan_scm, loan_lr, 30, seed=2)
    assert not np.array_equal(small.x, other.x)


# -- parallel, distributed, resumed: the same rows ---------------------------------------


def test_two_workers_match_one(reference, tmp_path) -> None:
    out = tmp_path / "labels.parquet"
    result = label("--n", str(N), "--chunk-size", str(CHUNK), "--jobs", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert_same_labels(out, reference)


def test_dask_cluster_matches_one_worker(reference, tmp_path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    out = tmp_path / "labels.parquet"
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        result = label(
            "--n", str(N), "--chunk-size", str(CHUNK), "--dask", cluster.scheduler_address,
            "--out", str(out),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_same_labels(out, reference)


@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_run_resumes_without_lost_or_duplicate_rows(reference, tmp_path, jobs) -> None:
    out = tmp_path / "labels.parquet"
    parts = tmp_path / "labels.parquet.parts"
    args = ("--n", str(N), "--chunk-size", "2", "--jobs", str(jobs), "--out", str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "solver.cli", *BASE, *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not any(parts.glob("chunk-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert process.poll() is None, "the job ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        # Returns once every process holding the pipe is gone: no orphaned workers.
        process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()
    finished = len(list(parts.glob("chunk-*.parquet")))
    assert 1 <= finished < N // 2
    (parts / "chunk-000023.parquet.999.tmp").write_bytes(b"half a chunk")  # killed mid-write

    result = label(*args)
    assert result.exit_code == 0, result.output
    solved_now = int(re.search(r"(\d+) solved by this run", result.output).group(1))
    assert solved_now == N - 2 * finished
    assert not parts.exists()
    assert_same_labels(out, reference)  # other chunk size, same person-by-person labels


def test_a_complete_output_is_not_solved_again(reference) -> None:
    result = label("--n", str(N), "--chunk-size", str(CHUNK), "--out", str(reference))
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output


# -- refusing another job's output -------------------------------------------------------


def test_different_arguments_on_a_complete_output_are_refused(reference) -> None:
    result = label("--n", str(N), "--chunk-size", str(CHUNK), "--out", str(reference), "--cost",
                   "carma")  # fmt: skip
    assert result.exit_code == EXIT_OUTPUT_CONFLICT
    assert "different arguments (job.cost: 'l1' there, 'carma' here)" in result.output
    assert "Use another --out, or remove" in result.output
    assert "Traceback" not in result.output


def test_different_arguments_on_unfinished_chunks_are_refused(tmp_path) -> None:
    out = tmp_path / "labels.parquet"
    with ChunkStore(out).claim({"job": {"seed": 99}}):
        pass  # leaves a manifest, as a run killed before its first chunk would
    result = label("--n", "8", "--out", str(out))
    assert result.exit_code == EXIT_OUTPUT_CONFLICT
    assert f"job.seed: 99 there, {SEED} here" in result.output


def test_a_foreign_file_at_the_output_is_refused(tmp_path) -> None:
    out = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"a": [1]}), out)
    result = label("--n", "8", "--out", str(out))
    assert result.exit_code == EXIT_OUTPUT_CONFLICT
    assert "was not written by 'recourse label'" in result.output


# -- people from a table -----------------------------------------------------------------


@pytest.fixture
def people(loan_scm) -> pd.DataFrame:
    x, _ = loan_scm.sample(6, seed=3)
    return pd.DataFrame(x, columns=list(loan_scm.names))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns="income"), r"has no column 'income'; it needs one column per"),
        (
            lambda f: f.assign(savings=["a lot"] + list(f["savings"][1:])),
            r"The column 'savings' of the people table 'people.csv' must hold numbers. "
            r"Got 'a lot' in row 0 instead.",
        ),
        (
            lambda f: f.assign(age=[1.0, np.nan, 2.0, 3.0, 4.0, 5.0]),
            r"The column 'age' of the people table 'people.csv' must not have missing values "
            r"\(NaN\). Row 1 has one.",
        ),
        (lambda f: f.assign(gender=0.5), r"The column 'gender' .* must hold whole numbers"),
        (lambda f: f.assign(income=99.0), r"The column 'income' .* domain \[-12.0, 14.0\]"),
        (lambda f: f.assign(colour=1), r"has an unknown column 'colour'"),
    ],
)
def test_bad_people_tables_name_the_column(tmp_path, people, change, message) -> None:
    path = tmp_path / "people.csv"
    change(people).to_csv(path, index=False)
    result = label("--people", str(path), "--out", str(tmp_path / "labels.parquet"))
    assert result.exit_code == EXIT_USAGE, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output


def test_people_from_a_parquet_table(tmp_path, people, loan_lr) -> None:
    path = tmp_path / "people.parquet"
    people.to_parquet(path)
    out = tmp_path / "labels.parquet"
    result = label("--people", str(path), "--n", "5", "--scheme", "universal", "--out", str(out))
    assert result.exit_code == 0, result.output
    frame = pq.read_table(out).to_pandas()
    assert frame["source_index"].tolist() == list(range(5))
    accepted = loan_lr.accepts(people.to_numpy()[:5])
    assert (frame.loc[accepted, "cost"] == 0).all()
    assert (frame.loc[~accepted, "status"] != "error").all()


# -- schemes -----------------------------------------------------------------------------


def scheme_table(tmp_path: Path, scheme: str) -> pd.DataFrame:
    out = tmp_path / f"{scheme}.parquet"
    result = label("--n", "24", "--scheme", scheme, "--out", str(out))
    assert result.exit_code == 0, result.output
    return pq.read_table(out).to_pandas()


def test_universal_has_no_locks_and_unit_weights(tmp_path, loan_scm) -> None:
    frame = scheme_table(tmp_path, "universal")
    assert (frame["constraints"] == "{}").all()
    for name in loan_scm.actionable:
        assert not frame[f"lock.{name}"].any()
        assert (frame[f"weight.{name}"] == 1.0).all()
        assert frame[f"bound_lo.{name}"].isna().all()
    assert (frame["status"] == "optimal").all()


@pytest.mark.parametrize("scheme", ["hard", "mixed"])
def test_hard_constraints_are_never_violated(tmp_path, loan_scm, scheme) -> None:
    frame = scheme_table(tmp_path, scheme)
    actionable = loan_scm.actionable
    locks = frame[[f"lock.{n}" for n in actionable]].to_numpy()
    acts = frame[[f"action_mask.{n}" for n in actionable]].to_numpy()
    assert locks.any() and not (locks & acts).any()
    assert (locks.sum(axis=1) <= len(actionable) - 1).all()
    for name in actionable:
        acted = frame[f"action_mask.{name}"] & frame[f"bound_lo.{name}"].notna()
        value = frame.loc[acted, f"action_value.{name}"]
        assert (value >= frame.loc[acted, f"bound_lo.{name}"] - 1e-9).all()
        assert (value <= frame.loc[acted, f"bound_hi.{name}"] + 1e-9).all()
    raw = [json.loads(text) for text in frame["constraints"]]
    assert any("bounds" in r for r in raw)
    if scheme == "mixed":
        assert {"rank", "score"} & set().union(*raw) == {"rank", "score"}


def test_hard_group_locks_more_in_the_disadvantaged_groups(loan_scm) -> None:
    elicitor = PreferenceElicitor(loan_scm, "hard-group", seed=0)
    x, _ = loan_scm.sample(600, seed=11)
    locks = np.array([len(elicitor.constraints(i, row)["lock"]) for i, row in enumerate(x)])
    groups = [elicitor.disadvantaged(row) for row in x]
    depth = np.array([sum(g.values()) for g in groups])
    for d in (0, 1, 2):
        expected = (len(loan_scm.actionable) - 1) * (LOCK_BASE + LOCK_STEP * d)
        assert abs(locks[depth == d].mean() - expected) < 0.25
    for attribute in ("gender", "income"):
        inside = np.array([g[attribute] for g in groups])
        assert locks[inside].mean() > locks[~inside].mean() + 0.3
    assert (x[[g["gender"] for g in groups], loan_scm.index["gender"]] == 0).all()


def test_rank_weights_follow_the_linear_mapping(tmp_path, loan_scm) -> None:
    frame = scheme_table(tmp_path, "rank")
    actionable = loan_scm.actionable
    for _, row in frame.iterrows():
        rank = json.loads(row["constraints"])["rank"]
        assert sorted(rank) == sorted(actionable)
        raw = {name: 1.0 + position for position, name in enumerate(rank)}
        mean = np.mean(list(raw.values()))
        for name in actionable:
            assert row[f"weight.{name}"] == pytest.approx(raw[name] / mean)


def test_score_weights_follow_the_linear_mapping(tmp_path, loan_scm) -> None:
    frame = scheme_table(tmp_path, "score")
    actionable = loan_scm.actionable
    for _, row in frame.iterrows():
        scores = json.loads(row["constraints"])["score"]
        assert set(scores) == set(actionable) and set(scores.values()) <= {1, 2, 3, 4, 5}
        raw = {name: 1.0 + (SCORE_MAX - scores[name]) for name in actionable}
        mean = np.mean(list(raw.values()))
        for name in actionable:
            assert row[f"weight.{name}"] == pytest.approx(raw[name] / mean)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_constraints_depend_on_seed_and_person_only(loan_scm, scheme) -> None:
    x, _ = loan_scm.sample(20, seed=4)
    forward = PreferenceElicitor(loan_scm, scheme, seed=3)
    backward = PreferenceElicitor(loan_scm, scheme, seed=3)
    drawn = [forward.constraints(i, row) for i, row in enumerate(x)]
    again = [backward.constraints(i, x[i]) for i in reversed(range(len(x)))][::-1]
    assert drawn == again
    for raw in drawn:
        parse_constraints(raw, loan_scm)
    if scheme != "universal":
        other = PreferenceElicitor(loan_scm, scheme, seed=4)
        assert [other.constraints(i, row) for i, row in enumerate(x)] != drawn


def test_unknown_scheme_lists_the_valid_ones(loan_scm, tmp_path) -> None:
    with pytest.raises(ElicitationError, match=r"The 'scheme' must be one of \['universal', "):
        PreferenceElicitor(loan_scm, "bogus", seed=0)
    result = label("--n", "4", "--scheme", "bogus", "--out", str(tmp_path / "x.parquet"))
    assert result.exit_code == EXIT_USAGE
    assert "'universal'" in result.output and "'mixed'" in result.output


# -- a person's failure is their row -----------------------------------------------------


def test_a_person_whose_solve_raises_is_an_error_row(monkeypatch, loan_scm, loan_lr) -> None:
    job = LabelJob("loan", "lr", "universal", "l1", 0, "highs", 60.0)
    population = sample_population(loan_scm, loan_lr, 4, seed=0)
    solve = labels.RecourseSolver.solve
    calls = []

    def flaky(self, x, constraints):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return solve(self, x, constraints)

    monkeypatch.setattr(labels.RecourseSolver, "solve", flaky)
    task = ChunkTask(
        job, 0, np.arange(4), population.source_index, population.x,
        loan_scm.content_hash(), loan_lr.content_hash(),
    )  # fmt: skip
    frame = label_chunk(task).to_pandas()
    assert frame["person_id"].tolist() == [0, 1, 2, 3]
    assert frame["status"].tolist() == ["optimal", "error", "optimal", "optimal"]
    assert frame.loc[1, "message"] == "RuntimeError: boom"
    assert frame.loc[1, "constraints"] == "{}"
