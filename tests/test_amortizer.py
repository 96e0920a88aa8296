"""The amortizer: hard constraints by construction, verification and repair, its files, CLI.

A small amortizer is distilled from exact labels of 160 Loan people (logistic regression,
``mixed`` elicitation) once per session; the hard-constraint properties are also checked
on untrained (random) networks, since they must hold whatever the weights. The compiled
small-batch path is checked with both, on Loan and GSMC with either classifier.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from instances import load_classifier, load_scm
from models.amortizer import (
    CHANGE,
    HOLD,
    NOT_ACTED,
    ROOM_CLIP,
    Amortizer,
    AmortizerFileError,
    AmortizerSpec,
    Hyperparameters,
    Network,
    PatternScores,
    TrainingTargets,
    allowed_patterns,
    encode_inputs,
    load_amortizer,
    pattern_catalogue,
    pattern_index,
    save_amortizer,
    train_network,
)
from models.costs import CostProfile
from models.elicitation import PreferenceElicitor
from models.preferences import ConstraintArrays, parse_constraints
from models.scm import VariableType
from solver import line_search
from solver.amortized import (
    MAX_PATTERNS,
    SMALL_BATCH,
    THREADED_PEOPLE,
    AmortizedBatch,
    AmortizedSolver,
    AmortizerMismatchError,
    read_labels,
    train_amortizer,
)
from solver.cli import main
from solver.engine import RecourseSolver
from solver.labels import LabelJob, run_job, sample_population
from solver.line_search import (
    SECANT_TOLERANCE,
    Lines,
    SearchModel,
    cheapest_rows,
    extrapolate,
    line_gaps,
    refine_brackets,
    small_batch,
)
from solver.milp import SolveStatus
from solver.verify import hard_constraints_hold, verify_action

TINY_GRID = (Hyperparameters(hidden=(32,), ensemble=2, max_epochs=80, patience=10),)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="session")
def loan_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scm, clf = load_scm("loan"), load_classifier("loan", "lr")
    out = tmp_path_factory.mktemp("labels") / "loan-lr.parquet"
    job = LabelJob("loan", "lr", "mixed", "l1", 0, "highs", 30.0)
    run_job(job, sample_population(scm, clf, 160, 0), out, progress=False)
    return out


@pytest.fixture(scope="session")
def trained(loan_labels: Path) -> Amortizer:
    amortizer, _ = train_amortizer(read_labels(loan_labels), grid=TINY_GRID)
    return amortizer


def random_network(amortizer: Amortizer, seed: int) -> Amortizer:
    """The same spec with random weights: constraints must hold whatever the network says."""
    rng = np.random.default_rng(seed)
    layers = tuple(
        (rng.normal(0, 3, w.shape), rng.normal(0, 3, b.shape)) for w, b in amortizer.network.layers
    )
    return Amortizer(amortizer.spec, Network(layers))


def people_and_constraints(dataset: str, kind: str, n: int, seed: int, scheme: str = "mixed"):
    scm, clf = load_scm(dataset), load_classifier(dataset, kind)
    x = sample_population(scm, clf, n, seed).x
    elicitor = PreferenceElicitor(scm, scheme, seed)
    people = [parse_constraints(elicitor.constraints(i, row), scm) for i, row in enumerate(x)]
    # Directions and change limits too, which the schemes do not draw.
    rng = np.random.default_rng(seed)
    for i in range(0, n, 3):
        name = str(rng.choice(scm.actionable))
        direction = {name: "increase" if rng.random() < 0.5 else "decrease"}
        people[i] = dataclasses.replace(
            people[i], directions=direction, max_changes=int(rng.integers(1, 3))
        )
    return scm, clf, x, people


def assert_hard_constraints(scm, x, people, intervene, values) -> None:
    for i, person in enumerate(people):
        acted = [scm.names[j] for j in np.flatnonzero(intervene[i])]
        assert set(acted) <= set(scm.actionable)
        assert not set(acted) & person.locks, (i, acted, person.locks)
        if person.max_changes is not None:
            assert len(acted) <= person.max_changes
        for name in acted:
            j = scm.index[name]
            var, value = scm.variables[j], values[i, j]
            lower, upper = person.bounds.get(name, (var.lower, var.upper))
            assert lower - 1e-9 <= value <= upper + 1e-9, (i, name, value, lower, upper)
            direction = person.directions.get(name)
            if direction == "increase":
                assert value >= x[i, j] - 1e-9
            if direction == "decrease":
                assert value <= x[i, j] + 1e-9
            if var.type is not VariableType.CONTINUOUS:
                assert value == round(value)


def random_amortizer(
    loan_spec: AmortizerSpec, dataset: str, kind: str, seed: int, *, constraint_inputs: bool = True
) -> Amortizer:
    """A random network with one hidden layer on Loan's spec, or the same architecture over
    another dataset's features, for the classifier ``kind``."""
    scm, clf = load_scm(dataset), load_classifier(dataset, kind)
    spec = dataclasses.replace(
        loan_spec,
        constraint_inputs=constraint_inputs,
        classifier=kind,
        classifier_hash=clf.content_hash(),
        mean=clf.mean,
        scale=clf.scale,
    )
    if dataset != "loan":
        columns = [scm.index[n] for n in scm.actionable]
        spec = dataclasses.replace(
            spec,
            dataset=dataset,
            scm_hash=scm.content_hash(),
            feature_names=scm.names,
            actionable=scm.actionable,
            integer=np.array(
                [scm.variables[j].type is not VariableType.CONTINUOUS for j in columns]
            ),
        )
    inputs = len(scm.names) + (7 * len(scm.actionable) + 1 if constraint_inputs else 0)
    outputs = len(spec.catalogue) + len(spec.actionable)
    rng = np.random.default_rng(seed)
    layers = ((rng.normal(0, 3, (inputs, 16)), rng.normal(0, 3, 16)),)
    layers += ((rng.normal(0, 3, (16, outputs)), rng.normal(0, 3, outputs)),)
    return Amortizer(spec, Network(layers))


# -- hard constraints by construction ---------------------------------------------------


@pytest.mark.parametrize(("dataset", "kind"), [("loan", "lr"), ("gsmc", "lr")])
@pytest.mark.parametrize("network_seed", [0, 1, 2])
def test_random_networks_never_break_a_hard_constraint(
    trained: Amortizer, dataset: str, kind: str, network_seed: int
) -> None:
    scm, clf, x, people = people_and_constraints(dataset, kind, 1000, network_seed)
    amortizer = random_amortizer(trained.spec, dataset, kind, network_seed)
    spec = amortizer.spec
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    # The network's own proposal, every fallback rank, and the final line-searched answer.
    for rank in range(3):
        mask, values = amortizer.propose(x, arrays, rank)
        intervene = np.zeros(x.shape, dtype=bool)
        intervene[:, spec.actionable_columns] = mask
        full = x.copy()
        full[:, spec.actionable_columns] = values
        assert_hard_constraints(scm, x, people, intervene, full)
    solver = AmortizedSolver(amortizer, scm, clf)
    batch = solver.predict(x, arrays)
    assert_hard_constraints(scm, x, people, batch.intervene, batch.values)
    # The small batches' schedule (candidates, corners and fallbacks searched together).
    for rows in np.array_split(np.arange(200), 40):
        small = solver.predict(x[rows], arrays.take(rows))
        chosen = [people[i] for i in rows]
        assert_hard_constraints(scm, x[rows], chosen, small.intervene, small.values)
    assert solver.predict(x[:0], arrays.take(np.arange(0))).verified.shape == (0,)


# -- the network pass ------------------------------------------------------------------


def reference_inputs(spec: AmortizerSpec, x: np.ndarray, arrays: ConstraintArrays) -> np.ndarray:
    """The inputs of the module docstring, plainly in numpy."""
    standardized = (x - spec.mean) / spec.scale
    if not spec.constraint_inputs:
        return standardized
    current, sd = x[:, spec.actionable_columns], spec.actionable_scale
    free = ~arrays.locked
    down = np.clip((current - arrays.lower) / sd, 0.0, ROOM_CLIP) * free
    up = np.clip((arrays.upper - current) / sd, 0.0, ROOM_CLIP) * free
    has_soft = np.isfinite(arrays.soft_limit)
    limit = np.minimum(np.maximum(arrays.soft_limit / sd, 0.0), ROOM_CLIP)
    penalty = np.minimum(np.maximum(arrays.soft_penalty * sd, 0.0), ROOM_CLIP)
    blocks = [arrays.locked, down, up, np.log(arrays.weight), has_soft]
    blocks += [np.where(has_soft, limit, 0.0), penalty]
    most = arrays.max_changes[:, None] / len(spec.actionable)
    return np.hstack([standardized, *blocks, most])


def reference_allowed(spec: AmortizerSpec, current: np.ndarray, arrays: ConstraintArrays):
    """Pattern by pattern, person by person, the rules of the module docstring."""
    allowed = np.zeros((len(current), len(spec.catalogue)), dtype=bool)
    for i in range(len(current)):
        inside = (arrays.lower[i] <= current[i]) & (current[i] <= arrays.upper[i])
        for p, pattern in enumerate(spec.catalogue):
            acted = pattern != NOT_ACTED
            allowed[i, p] = (
                (pattern == CHANGE).any()
                and not (acted & arrays.locked[i]).any()
                and inside[pattern == HOLD].all()
                and acted.sum() <= arrays.max_changes[i]
            )
    return allowed


def reference_scores(amortizer: Amortizer, x: np.ndarray, arrays: ConstraintArrays):
    """:meth:`Amortizer.scores` plainly: the float64 inputs rounded once to float32, the
    float32 network with ``@``, -inf for barred patterns, changes in the features' units."""
    spec = amortizer.spec
    a = reference_inputs(spec, x, arrays).astype(np.float32)
    for weights, bias in amortizer.fast.layers[:-1]:
        a = np.maximum(a @ weights + bias, 0.0)
    weights, bias = amortizer.fast.layers[-1]
    outputs = a @ weights + bias
    current, num_patterns = x[:, spec.actionable_columns], len(spec.catalogue)
    allowed = reference_allowed(spec, current, arrays)
    logits = np.where(allowed, outputs[:, :num_patterns], -np.inf)
    return PatternScores(logits, current + outputs[:, num_patterns:] * spec.actionable_scale)


def with_edge_cases(current: np.ndarray, arrays: ConstraintArrays, seed: int) -> ConstraintArrays:
    """Unbounded intervals, current values on their ends or outside them, empty intervals,
    more locks, soft limits of 0 and -0, and every number of changes allowed."""
    rng = np.random.default_rng(seed)
    n, k = arrays.locked.shape
    lower, upper = arrays.lower.copy(), arrays.upper.copy()
    soft_limit = arrays.soft_limit.copy()
    cells = rng.random((n, k))

    def where(start: float, stop: float) -> np.ndarray:
        return (start <= cells) & (cells < stop)

    lower[where(0.0, 0.1)], upper[where(0.9, 1.0)] = -np.inf, np.inf
    lower[where(0.1, 0.15)] = current[where(0.1, 0.15)]
    upper[where(0.15, 0.2)] = current[where(0.15, 0.2)]
    lower[where(0.2, 0.25)] = current[where(0.2, 0.25)] + 1.0
    upper[where(0.2, 0.25)] = current[where(0.2, 0.25)] + 2.0
    upper[where(0.25, 0.3)] = lower[where(0.25, 0.3)] - 1.0
    soft_limit[where(0.3, 0.35)], soft_limit[where(0.35, 0.4)] = 0.0, -0.0
    return dataclasses.replace(
        arrays,
        lower=lower,
        upper=upper,
        locked=arrays.locked | (lower > upper) | where(0.4, 0.45),
        soft_limit=soft_limit,
        max_changes=rng.integers(0, k + 1, n),
    )


def assert_same_bits(got: tuple, expected: tuple) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(("dataset", "kind"), [("loan", "lr"), ("gsmc", "lr")])
@pytest.mark.parametrize("constraint_inputs", [True, False])
def test_the_network_pass_has_the_bits_of_its_formulas_at_any_batch_size(
    trained: Amortizer, dataset: str, kind: str, constraint_inputs: bool
) -> None:
    scm, _, x, people = people_and_constraints(dataset, kind, 120, 3)
    amortizer = random_amortizer(
        trained.spec, dataset, kind, 3, constraint_inputs=constraint_inputs
    )
    spec = amortizer.spec
    current = x[:, spec.actionable_columns]
    arrays = with_edge_cases(current, ConstraintArrays.from_constraints(scm, x, people), 3)
    assert_same_bits(
        (encode_inputs(spec, x, arrays), allowed_patterns(arrays, current, spec.catalogue)),
        (reference_inputs(spec, x, arrays), reference_allowed(spec, current, arrays)),
    )
    # BLAS takes other paths for one row and for many: each size against its reference.
    for rows in [
        np.arange(len(x)),
        *np.array_split(np.arange(len(x)), 30),
        *np.arange(20)[:, None],
    ]:
        assert_same_bits(
            amortizer.scores(x[rows], arrays.take(rows)),
            reference_scores(amortizer, x[rows], arrays.take(rows)),
        )


def test_trained_model_keeps_constraints_and_verifies_on_thousands(trained: Amortizer) -> None:
    scm, clf, x, people = people_and_constraints("loan", "lr", 2000, 7)
    solver = AmortizedSolver(trained, scm, clf)
    batch = solver.predict(x, ConstraintArrays.from_constraints(scm, x, people))
    assert_hard_constraints(scm, x, people, batch.intervene, batch.values)
    cost = CostProfile.for_model("l1", scm, clf)
    # The batched verification agrees with the one-person verification.
    for i in range(0, 2000, 97):
        noise = scm.abduct_noise(x[i : i + 1])[0]
        check = verify_action(
            scm, clf, cost, x[i], noise, people[i], batch.intervene[i], batch.values[i]
        )
        assert check.verified == bool(batch.verified[i]) or not batch.intervene[i].any()
        if batch.verified[i]:
            assert check.cost == pytest.approx(batch.cost[i], rel=1e-9, abs=1e-12)
            assert check.probability >= clf.threshold
    assert batch.verified.mean() > 0.8  # a tiny model, but it has learned something


def test_a_batch_split_over_threads_answers_as_its_parts_alone(trained: Amortizer) -> None:
    n = 2 * THREADED_PEOPLE + 3
    scm, clf, x, people = people_and_constraints("loan", "lr", n, 11)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    threaded = AmortizedSolver(trained, scm, clf, threads=2).predict(x, arrays)
    serial = AmortizedSolver(trained, scm, clf, threads=1)
    parts = [serial.predict(x[rows], arrays.take(rows)) for rows in np.array_split(np.arange(n), 2)]
    expected = AmortizedBatch.concatenate(parts)
    for name in ("intervene", "values", "counterfactual", "probability", "cost", "verified"):
        assert getattr(threaded, name).tobytes() == getattr(expected, name).tobytes(), name
    assert_hard_constraints(scm, x, people, threaded.intervene, threaded.values)


# -- never an invalid answer -------------------------------------------------------------


def test_failed_answers_are_repaired_and_never_beat_the_optimum(trained: Amortizer) -> None:
    scm, clf, x, people = people_and_constraints("loan", "lr", 40, 3)
    cost = CostProfile.for_model("l1", scm, clf)
    exact = RecourseSolver(scm, clf, cost)
    broken = random_network(trained, 5)  # proposes nonsense: most answers must be repaired
    results = AmortizedSolver(broken, scm, clf, exact=exact).solve(x, people)
    paths = {r.answered_by for r in results}
    assert paths & {"mask-repair", "milp-repair"}
    for xi, person, result in zip(x, people, results, strict=True):
        optimum = exact.solve(xi, person)
        if optimum.status is SolveStatus.INFEASIBLE:
            assert result.status is SolveStatus.INFEASIBLE
            continue
        assert result.verified, result
        assert result.cost >= optimum.cost * (1 - 1e-6) - 1e-9
        if result.answered_by == "milp-repair":
            assert result.cost == pytest.approx(optimum.cost, rel=1e-6, abs=1e-9)
        assert result.constraints == person.to_dict()


def test_amortized_answers_cost_no_less_than_the_exact_labels(
    trained: Amortizer, loan_labels: Path
) -> None:
    labels = read_labels(loan_labels)
    solver = AmortizedSolver(trained, labels.scm, labels.classifier)
    batch = solver.predict(labels.x, labels.constraints)
    ratio = batch.cost[batch.verified] / labels.cost[batch.verified]
    assert (ratio >= 1 - 1e-6).all()
    assert batch.verified.mean() > 0.9


def test_line_search_lands_on_the_boundary_when_the_features_are_right(
    trained: Amortizer, loan_labels: Path
) -> None:
    # The logit of logistic regression along one feature is monotone and piecewise linear
    # through Loan's equations: with the optimal feature, the answer is the optimum up to
    # the line search's tolerance (relative, or the float32 margin's few thousandths of a
    # cost unit for people on the boundary already), whatever value the network proposed.
    labels = read_labels(loan_labels)
    solver = AmortizedSolver(trained, labels.scm, labels.classifier)
    for rows in (np.arange(len(labels.x)), np.arange(3)):  # large and small batch schedules
        batch = solver.predict(labels.x[rows], labels.constraints.take(rows))
        acted = batch.intervene[:, solver.columns]
        same = batch.verified & (acted == labels.mask[rows]).all(axis=1) & (acted.sum(axis=1) == 1)
        optimum = labels.cost[rows][same]
        assert same.sum() >= min(len(rows), 40)
        excess = batch.cost[same] - optimum
        assert ((excess <= 3 * SECANT_TOLERANCE * optimum) | (excess <= 2e-3)).all()
        assert (excess >= -1e-6 * optimum).all()


# -- the small-batch path ----------------------------------------------------------------

SEARCHED = [("loan", "lr"), ("loan", "mlp"), ("gsmc", "lr"), ("gsmc", "mlp")]


def searching_solver(trained: Amortizer, dataset: str, kind: str) -> AmortizedSolver:
    """The trained amortizer on Loan's logistic regression; elsewhere a random network,
    whose poor proposals send the search to its scans, corners and fallbacks."""
    if (dataset, kind) == ("loan", "lr"):
        amortizer = trained
    else:
        amortizer = random_amortizer(trained.spec, dataset, kind, 4)
    return AmortizedSolver(amortizer, load_scm(dataset), load_classifier(dataset, kind))


def in_batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]


def search_inputs(solver: AmortizedSolver, x: np.ndarray, arrays: ConstraintArrays) -> tuple:
    """What :meth:`AmortizedSolver.predict` hands :func:`small_batch` besides the tables:
    the people, their noise and constraints, the network's ranked patterns, their chances
    and its proposed values."""
    scores = solver.amortizer.scores(x, arrays)
    ranked, chances = scores.top(MAX_PATTERNS)
    return x, solver.scm.abduct_noise(x), arrays, ranked, chances, scores.changed


def fallback_answers(solver: AmortizedSolver, x: np.ndarray, arrays: ConstraintArrays):
    """Per person the best pattern's proposal, which the search returns where it accepts
    nothing: the search run with a margin of inf, which accepts nothing."""
    never = SearchModel.of(solver.scm, solver.classifier, margin=np.inf)
    return small_batch(never, solver._small_tables, *search_inputs(solver, x, arrays))


def network_pass_bits(
    solver: AmortizedSolver, x: np.ndarray, arrays: ConstraintArrays, size: int
) -> list[bytes]:
    """Per person the bits of the network's pass over batches of ``size`` people."""
    bits = []
    for rows in in_batches(len(x), size):
        logits, changed = solver.amortizer.scores(x[rows], arrays.take(rows))
        bits += [a.tobytes() + b.tobytes() for a, b in zip(logits, changed, strict=True)]
    return bits


class SmallBatchAnswers(NamedTuple):
    solver: AmortizedSolver
    x: np.ndarray
    people: list
    arrays: ConstraintArrays
    answers: dict[int, AmortizedBatch]
    """The answers of :meth:`AmortizedSolver.predict` called on batches of each size."""


@pytest.fixture(scope="module", params=SEARCHED, ids=["-".join(case) for case in SEARCHED])
def small_batch_answers(trained: Amortizer, request: pytest.FixtureRequest) -> SmallBatchAnswers:
    dataset, kind = request.param
    solver = searching_solver(trained, dataset, kind)
    _, _, x, people = people_and_constraints(dataset, kind, 672, 21)
    arrays = ConstraintArrays.from_constraints(solver.scm, x, people)
    answers = {
        size: AmortizedBatch.concatenate(
            [solver.predict(x[rows], arrays.take(rows)) for rows in in_batches(len(x), size)]
        )
        for size in (1, 7, SMALL_BATCH)
    }
    return SmallBatchAnswers(solver, x, people, arrays, answers)


def test_small_batches_keep_the_hard_constraints_and_verify_truthfully(
    small_batch_answers: SmallBatchAnswers,
) -> None:
    solver, x, people, _, answers = small_batch_answers
    scm, clf, cost = solver.scm, solver.classifier, solver.cost
    noise = scm.abduct_noise(x)
    for batch in answers.values():
        assert_hard_constraints(scm, x, people, batch.intervene, batch.values)
        for i, person in enumerate(people):
            one = verify_action(
                scm, clf, cost, x[i], noise[i], person, batch.intervene[i], batch.values[i]
            )
            # Only the classifier may refuse an answer; verified means verified.
            assert all(f.startswith("the classifier's probability") for f in one.failures)
            assert batch.verified[i] == (one.verified and batch.intervene[i].any()), i
            assert batch.cost[i] == pytest.approx(one.cost, rel=1e-12, abs=0.0), i
            assert batch.counterfactual[i].tobytes() == one.counterfactual.tobytes()
    assert 0.3 < answers[SMALL_BATCH].verified.mean() < 1.0


def test_small_batches_answer_as_one_person_alone(small_batch_answers: SmallBatchAnswers) -> None:
    # Wherever the network's pass has the same bits for one row as among 48 (BLAS takes
    # other paths: here for everyone with the random networks, a few people with the
    # trained one), so do the answers: the search handles people one at a time.
    solver, x, _, arrays, answers = small_batch_answers
    one_row, many_rows = (network_pass_bits(solver, x, arrays, size) for size in (1, SMALL_BATCH))
    same_scores = np.array([a == b for a, b in zip(one_row, many_rows, strict=True)])
    alone, together = answers[1].take(same_scores), answers[SMALL_BATCH].take(same_scores)
    assert_same_bits((alone.intervene, alone.values), (together.intervene, together.values))


def test_small_batch_acceptance_agrees_with_the_real_classifier(
    small_batch_answers: SmallBatchAnswers,
) -> None:
    # Verified answers are accepted by the real classifier, and those the search found
    # (not the best pattern's proposal, returned where it accepted nothing) by its margin,
    # up to the rounding of its float64 layers with the standardization folded in.
    solver, x, _, arrays, answers = small_batch_answers
    clf, columns, batch = solver.classifier, solver.columns, answers[SMALL_BATCH]
    fallback = [
        fallback_answers(solver, x[rows], arrays.take(rows))
        for rows in in_batches(len(x), SMALL_BATCH)
    ]
    fallback_mask = np.concatenate([mask for mask, _ in fallback])
    fallback_values = np.where(
        fallback_mask, np.concatenate([values for _, values in fallback]), x[:, columns]
    )
    is_fallback = (batch.intervene[:, columns] == fallback_mask).all(axis=1) & (
        batch.values[:, columns].view(np.uint64) == fallback_values.view(np.uint64)
    ).all(axis=1)
    logit = clf.logit(batch.counterfactual)
    assert (logit[batch.verified] >= clf.logit_threshold).all()
    searched = batch.verified & ~is_fallback
    assert searched.sum() >= 0.2 * len(x)
    assert (logit[searched] >= clf.logit_threshold + solver.margin - 1e-9).all()


@pytest.mark.parametrize(("dataset", "kind"), SEARCHED)
def test_the_small_batch_search_answers_each_person_alone(
    trained: Amortizer, dataset: str, kind: str
) -> None:
    solver = searching_solver(trained, dataset, kind)
    scm, _, x, people = people_and_constraints(dataset, kind, 240, 22)
    arrays = with_edge_cases(
        x[:, solver.columns], ConstraintArrays.from_constraints(scm, x, people), 22
    )
    inputs = search_inputs(solver, x, arrays)

    def search(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = [a.take(rows) if isinstance(a, ConstraintArrays) else a[rows] for a in inputs]
        return small_batch(solver._search_model, solver._small_tables, *part)

    everyone = search(np.arange(len(x)))
    for size in (1, 7, SMALL_BATCH):
        parts = [search(rows) for rows in in_batches(len(x), size)]
        assert_same_bits(tuple(np.concatenate(a) for a in zip(*parts, strict=True)), everyone)
    mask, values = everyone
    assert mask.any(axis=1).mean() > 0.5
    # Within these constraints too (unbounded, empty or excluding the current value).
    intervene = np.zeros(x.shape, dtype=bool)
    intervene[:, solver.columns] = mask
    full_values = x.copy()
    full_values[:, solver.columns] = values
    assert hard_constraints_hold(scm, arrays, intervene, full_values).all()


# -- the large-batch path ----------------------------------------------------------------


def random_lines(solver: AmortizedSolver, n: int, seed: int) -> tuple[Lines, np.ndarray]:
    """``n`` lines from random people: each changes one to three of the actionable
    features a random amount from their current values, within the people's intervals.
    Returns them and the people's rows."""
    scm = solver.scm
    _, _, x, people = people_and_constraints(scm.name, solver.classifier.kind, n, seed)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    rng = np.random.default_rng(seed)
    columns = solver.columns
    mask = rng.random((n, len(columns))) < 0.4
    mask[np.arange(n), rng.integers(len(columns), size=n)] = True
    step = np.where(mask, rng.normal(0, 1, mask.shape) * solver.amortizer.spec.actionable_scale, 0)
    intervene = np.zeros(x.shape, dtype=bool)
    intervene[:, columns] = mask
    noise = scm.abduct_noise(x)
    table = np.hstack([x, noise, x[:, columns], step, arrays.lower, arrays.upper])
    threshold = solver._search_model.threshold
    return Lines(table, intervene, columns, solver.amortizer.spec.integer, threshold), x


def projected(lines: Lines, rows: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Line rows ``rows`` at scales ``t``: their features' values, projected."""
    f, k = lines.intervene.shape[1], len(lines.columns)
    start, step, lower, upper = (
        lines.table[rows, 2 * f + i * k : 2 * f + (i + 1) * k] for i in range(4)
    )
    values = np.minimum(np.maximum(start + t[:, None] * step, lower), upper)
    return np.where(lines.integer, np.round(values), values)


@pytest.mark.parametrize(("dataset", "kind"), SEARCHED)
def test_line_gaps_follow_the_full_causal_model_and_classifier(
    trained: Amortizer, dataset: str, kind: str
) -> None:
    # The evaluation reads the factual values of the features no action reaches and runs
    # the equations of the others: the counterfactual of the whole model, through the real
    # classifier, up to float32.
    solver = searching_solver(trained, dataset, kind)
    lines, x = random_lines(solver, 500, 31)
    rows = np.repeat(np.arange(500), 3)
    t = np.random.default_rng(31).uniform(-3, 3, len(rows))
    gaps = line_gaps(solver._search_model, lines, rows, t)
    values = x[rows].copy()
    values[:, solver.columns] = projected(lines, rows, t)
    f = x.shape[1]
    counterfactual = solver.scm.propagate_counterfactual(
        x[rows], lines.intervene[rows], values, lines.table[rows, f : 2 * f]
    )
    expected = solver.classifier.logit(counterfactual) - lines.threshold
    assert gaps == pytest.approx(expected, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize(("dataset", "kind"), SEARCHED)
def test_extrapolated_and_refined_brackets_hold_and_exhausted_lines_stop_changing(
    trained: Amortizer, dataset: str, kind: str
) -> None:
    solver = searching_solver(trained, dataset, kind)
    model = solver._search_model
    lines, _ = random_lines(solver, 600, 32)
    n = 600
    zero = line_gaps(model, lines, np.arange(n), np.zeros(n))
    one = line_gaps(model, lines, np.arange(n), np.ones(n))
    rows = np.flatnonzero((zero < 0) & (one < 0) & (one > zero))  # rejected, rising forwards
    assert len(rows) > 30
    near, near_gap, far, far_gap = np.ones(n), one.copy(), np.zeros(n), zero.copy()
    sign = np.ones(n)
    lo, lo_gap, hi, hi_gap = np.zeros(n), zero.copy(), np.ones(n), one.copy()
    found = np.zeros(n, dtype=bool)
    exhausted = extrapolate(
        model, lines, rows, (near, near_gap, far, far_gap), sign, (lo, lo_gap, hi, hi_gap, found)
    )
    assert found.any() and exhausted.any()
    assert not (found & exhausted).any()
    # A bracket is rejected at lo and accepted at hi, with the gaps it records.
    kept = np.flatnonzero(found)
    assert (line_gaps(model, lines, kept, lo[kept]) < 0).all()
    assert_same_bits((line_gaps(model, lines, kept, hi[kept]),), (hi_gap[kept],))
    # An exhausted line is rejected at its reach and stays the same beyond it.
    out = np.flatnonzero(exhausted)
    f, k = lines.intervene.shape[1], len(lines.columns)
    reach = np.array([line_search._reach(lines.table, i, 1.0, f, k) for i in out])
    at_reach = line_gaps(model, lines, out, reach)
    assert (at_reach < 0).all()
    assert_same_bits((line_gaps(model, lines, out, 2 * reach + 7),), (at_reach,))
    # Refinement keeps to the bracket and to accepted sizes.
    size = refine_brackets(model, lines, (lo, lo_gap, hi, hi_gap, found), sign, np.arange(n))
    assert np.isinf(size[~found]).all()
    assert ((size[kept] >= lo[kept]) & (size[kept] <= hi[kept])).all()
    assert (line_gaps(model, lines, kept, size[kept]) >= 0).all()
    assert (size[kept] < hi[kept]).mean() > 0.5


def test_cheapest_rows_take_the_first_of_the_least_cost_per_owner() -> None:
    cost = np.array([3.0, 1.0, np.inf, 1.0, 2.0, np.nan, 5.0, 0.5])
    owner = np.array([0, 0, 1, 0, 2, 2, 4, 4])
    assert cheapest_rows(cost, owner).tolist() == [1, 4, 7]
    assert cheapest_rows(np.full(3, np.inf), np.arange(3)).size == 0


@pytest.mark.parametrize(("dataset", "kind"), SEARCHED)
def test_verifying_the_cheapest_first_answers_as_verifying_every_candidate(
    trained: Amortizer, dataset: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    solver = searching_solver(trained, dataset, kind)
    scm, _, x, people = people_and_constraints(dataset, kind, 400, 33)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    lazy = solver.predict(x, arrays)

    def verify_all(self, priced, owner, eligible=None):  # every row verified, then the cheapest
        check = self._checked(priced)
        eligible = np.ones(len(owner), dtype=bool) if eligible is None else eligible
        cost = np.where(eligible & check.verified, priced.cost, np.inf)
        order = np.lexsort((np.arange(len(cost)), cost, owner))
        first = order[np.flatnonzero(np.diff(owner[order], prepend=-1))]
        first = first[np.isfinite(cost[first])]
        return owner[first], check.take(first)

    monkeypatch.setattr(AmortizedSolver, "_cheapest_verified", verify_all)
    eager = solver.predict(x, arrays)
    for name in ("intervene", "values", "counterfactual", "cost", "verified"):
        assert getattr(lazy, name).tobytes() == getattr(eager, name).tobytes(), name
    # The classifier's matrix products round by the shape of the batch verified at once.
    assert lazy.probability == pytest.approx(eager.probability, rel=1e-12, abs=1e-15)
    assert lazy.verified.mean() > 0.5


# -- training ----------------------------------------------------------------------------


def test_an_ensemble_answers_the_mean_of_its_members() -> None:
    rng = np.random.default_rng(3)
    n, patterns, features = 60, 5, 3
    inputs = rng.normal(size=(n, 4))
    targets = TrainingTargets(
        rng.integers(0, patterns, n),
        rng.normal(size=(n, features)),
        rng.random((n, features)) < 0.5,
        np.ones((n, patterns), dtype=bool),
    )
    params = Hyperparameters(hidden=(8,), max_epochs=5, ensemble=3)
    merged, history = train_network(inputs, targets, (inputs, targets), params, seed=4)
    single = dataclasses.replace(params, ensemble=1)
    members = [
        train_network(inputs, targets, (inputs, targets), single, seed=4 + i)[0] for i in range(3)
    ]
    mean = np.mean([member.forward(inputs) for member in members], axis=0)
    np.testing.assert_allclose(merged.forward(inputs), mean, rtol=1e-10, atol=1e-12)
    assert len(history["epochs"]) == 3
    with pytest.raises(ValueError, match="only for one hidden layer"):
        Hyperparameters(hidden=(8, 8), ensemble=2)


# -- files -------------------------------------------------------------------------------


def test_files_round_trip_to_identical_answers(trained: Amortizer, tmp_path: Path) -> None:
    save_amortizer(trained, tmp_path / "model")
    loaded = load_amortizer(tmp_path / "model")
    assert loaded.spec.to_dict() == trained.spec.to_dict()
    scm, clf, x, people = people_and_constraints("loan", "lr", 200, 11)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    a = AmortizedSolver(trained, scm, clf).predict(x, arrays)
    b = AmortizedSolver(loaded, scm, clf).predict(x, arrays)
    np.testing.assert_array_equal(a.intervene, b.intervene)
    np.testing.assert_array_equal(a.values, b.values)
    document = json.loads((tmp_path / "model" / "amortizer.json").read_text())
    assert document["training"]["candidates"]


def test_a_model_of_another_causal_model_or_classifier_is_refused(trained: Amortizer) -> None:
    gsmc = load_scm("gsmc")
    with pytest.raises(AmortizerMismatchError, match="another causal model"):
        AmortizedSolver(trained, gsmc, load_classifier("gsmc", "lr"))
    with pytest.raises(AmortizerMismatchError, match="another classifier"):
        AmortizedSolver(trained, load_scm("loan"), load_classifier("loan", "mlp"))


def test_tampered_or_incomplete_folders_are_refused(trained: Amortizer, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_amortizer(trained, folder)
    other = random_network(trained, 1)
    save_amortizer(other, tmp_path / "other")
    (folder / "amortizer.npz").write_bytes((tmp_path / "other" / "amortizer.npz").read_bytes())
    with pytest.raises(AmortizerFileError, match="different trainings"):
        load_amortizer(folder)
    (folder / "amortizer.npz").unlink()
    with pytest.raises(AmortizerFileError, match=r"amortizer\.npz is missing"):
        load_amortizer(folder)


def test_patterns_index_round_trip() -> None:
    holdable = np.array([False, True, False, True])
    catalogue = pattern_catalogue(holdable)
    assert len(catalogue) == 2 * 3 * 2 * 3
    np.testing.assert_array_equal(pattern_index(catalogue, holdable), np.arange(len(catalogue)))


# -- the command line --------------------------------------------------------------------


def test_cli_trains_and_solves_one_person_and_a_table(loan_labels: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    result = run("train", str(loan_labels), "--out", str(model), "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "raw validity" in result.output
    assert (model / "amortizer.npz").exists()

    result = run(
        "solve", "--index", "3", "--method", "amortized", "--model", str(model), "--format", "json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output[result.output.index("{") :])
    assert document["verified"] is True
    assert document["answered_by"] in ("amortizer", "mask-repair", "milp-repair")
    assert document["classifier"] == "lr"

    out = tmp_path / "answers.parquet"
    result = run(
        "solve", str(loan_labels), "--method", "amortized", "--model", str(model), "--out", str(out)
    )
    assert result.exit_code in (0, 3), result.output
    answers = pd.read_parquet(out)
    labels = pd.read_parquet(loan_labels)
    assert len(answers) == len(labels)
    solved = (labels["status"] == "optimal").to_numpy()
    assert answers["verified"].to_numpy()[solved].all()
    assert (
        answers["cost"].to_numpy()[solved] >= labels["cost"].to_numpy()[solved] * (1 - 1e-6)
    ).all()


def test_cli_refuses_mismatched_amortizer_use(loan_labels: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert run("train", str(loan_labels), "--out", str(model)).exit_code == 0
    result = run("solve", "--index", "0", "--method", "amortized")
    assert result.exit_code == 2 and "needs --model" in result.output
    result = run(
        "solve", "--index", "0", "--method", "amortized", "--model", str(model), "--cost", "carma"
    )
    assert result.exit_code == 2 and "--cost carma differs" in result.output
    document = json.loads((model / "amortizer.json").read_text())
    document["classifier_hash"] = "0" * 64
    (model / "amortizer.json").write_text(json.dumps(document))
    result = run("solve", "--index", "0", "--method", "amortized", "--model", str(model))
    assert result.exit_code == 2 and "another classifier" in result.output
    result = run("train", str(tmp_path / "model" / "amortizer.json"), "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "cannot be read" in result.output
