"""The batch verification: the per-person rules for many people at once, block by block;
its compiled row loops (hard constraints, costs) on edge values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instances import load_classifier, load_scm
from models.costs import CostProfile
from models.preferences import ConstraintArrays, SoftLimit, parse_constraints
from models.scm import Role, VariableType
from solver.verify import hard_constraints_hold, verify_action, verify_actions


def random_people(dataset: str, n: int, seed: int):
    """People with random constraints and random actions, many of which break a rule."""
    rng = np.random.default_rng(seed)
    scm, clf = load_scm(dataset), load_classifier(dataset, "mlp")
    cost = CostProfile.for_model("l1", scm, clf, sparsity=0.01)
    x, noise = scm.sample(n, seed)
    people = []
    for i in range(n):
        raw: dict = {"bounds": {}, "direction": {}, "weights": {}, "soft_limits": {}}
        for name in scm.actionable:
            var = scm.variables[scm.index[name]]
            roll = rng.random()
            if roll < 0.1:
                raw.setdefault("lock", []).append(name)
            elif roll < 0.3:
                middle = x[i, scm.index[name]]
                raw["bounds"][name] = [middle - rng.random() * (middle - var.lower), var.upper]
            elif roll < 0.5:
                raw["direction"][name] = "increase" if rng.random() < 0.5 else "decrease"
            raw["weights"][name] = float(rng.uniform(0.5, 2.0))
            if rng.random() < 0.3:
                raw["soft_limits"][name] = {"limit": 0.5, "penalty": 2.0}
        if rng.random() < 0.3:
            raw["max_changes"] = int(rng.integers(1, 3))
        people.append(parse_constraints(raw, scm))
    intervene = rng.random(x.shape) < 0.4
    movable = np.array([v.role is not Role.IMMUTABLE for v in scm.variables])
    intervene &= movable | (rng.random(x.shape) < 0.02)  # now and then an immutable one
    values = x + rng.normal(0, 1, x.shape) * (scm.upper - scm.lower) / 4
    whole = [j for j, v in enumerate(scm.variables) if v.type is not VariableType.CONTINUOUS]
    rounded = rng.random((n, len(whole))) < 0.9
    values[:, whole] = np.where(rounded, np.round(values[:, whole]), values[:, whole])
    return scm, clf, cost, x, noise, people, intervene, values


@pytest.mark.parametrize("dataset", ["loan", "gsmc"])
def test_the_batch_check_agrees_with_the_per_person_check(dataset: str) -> None:
    scm, clf, cost, x, noise, people, intervene, values = random_people(dataset, 400, seed=5)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    batch = verify_actions(scm, clf, cost, x, noise, arrays, intervene, values)
    assert 0 < batch.verified.sum() < len(x)  # both outcomes are exercised
    for i, person in enumerate(people):
        one = verify_action(scm, clf, cost, x[i], noise[i], person, intervene[i], values[i])
        assert batch.verified[i] == one.verified, one.failures
        assert batch.counterfactual[i].tobytes() == one.counterfactual.tobytes()
        # One row takes BLAS's matrix-vector product, many the matrix product: the last
        # bits of the logit may differ.
        assert batch.probability[i] == pytest.approx(one.probability, rel=1e-12)
        assert batch.cost[i] == pytest.approx(one.cost, rel=1e-12)


def test_a_large_batch_gives_the_bits_of_small_ones() -> None:
    scm, clf, cost, x, noise, people, intervene, values = random_people("gsmc", 300, seed=6)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    # More rows than a block of the checks and of the forward pass, with a rest of one row.
    rows = np.arange(2 * 8192 + 1) % len(x)
    whole = verify_actions(
        scm, clf, cost, x[rows], noise[rows], arrays.take(rows), intervene[rows], values[rows]
    )
    small = verify_actions(scm, clf, cost, x, noise, arrays, intervene, values)
    for field in ("counterfactual", "probability", "cost", "verified"):
        assert getattr(whole, field).tobytes() == getattr(small, field)[rows].tobytes(), field
    assert (
        whole.counterfactual.tobytes()
        == scm.propagate_counterfactual(
            x[rows], intervene[rows], values[rows], noise[rows]
        ).tobytes()
    )
    assert scm.abduct_noise(x[rows]).tobytes() == scm.abduct_noise(x)[rows].tobytes()
    assert scm.generate(noise[rows]).tobytes() == scm.generate(noise)[rows].tobytes()
    # The forward pass in blocks gives the bits of one pass over the whole batch (BLAS's
    # bits depend on where a row falls in its tiles), also with a rest of one row.
    for n in (20_000, 3 * 2048 + 1):
        rows = np.arange(n) % len(x)
        assert clf.logit(x[rows]).tobytes() == clf._logit_rows(x[rows]).tobytes()


# -- the compiled row loops on edge values ----------------------------------------------------

EDGE_VALUES = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0])
PROBABILITY_RULES = ("the classifier's probability", "the levels of")
"""The failures of verify_action that are not hard constraints (the classifier, one-hot)."""


def edge_cases(dataset: str, n: int, seed: int):
    """:func:`random_people` with values set to nan, infinities, signed zeros and exactly
    to a bound; infinite bounds; no change allowed at all; soft limits of 0."""
    scm, clf, cost, x, noise, people, intervene, values = random_people(dataset, n, seed)
    rng = np.random.default_rng(seed)
    actionable = [scm.index[name] for name in scm.actionable]
    continuous = [
        name
        for name in scm.actionable
        if scm.variables[scm.index[name]].type is VariableType.CONTINUOUS
    ]
    for i, person in enumerate(people):
        changes: dict = {}
        roll = rng.random()
        if roll < 0.1:
            changes["max_changes"] = 0
        elif roll < 0.2:  # bounds cannot be infinite in a constraints document, only here
            name = str(rng.choice(continuous))
            changes["bounds"] = dict(person.bounds) | {name: (-np.inf, np.inf)}
        elif roll < 0.4:
            name = str(rng.choice(scm.actionable))
            var = scm.variables[scm.index[name]]
            lower, upper = person.bounds.get(name, (var.lower, var.upper))
            values[i, scm.index[name]] = [lower, upper, -0.0][rng.integers(3)]
            intervene[i, scm.index[name]] = True
        if rng.random() < 0.3:
            name = str(rng.choice(scm.actionable))
            changes["soft_limits"] = dict(person.soft_limits) | {name: SoftLimit(0.0, 2.0)}
        people[i] = dataclasses.replace(person, **changes)
    edges = rng.random((n, len(actionable))) < 0.15
    values[:, actionable] = np.where(
        edges, rng.choice(EDGE_VALUES, edges.shape), values[:, actionable]
    )
    return scm, clf, cost, x, noise, people, intervene, values


@pytest.mark.parametrize("dataset", ["loan", "gsmc"])
@pytest.mark.parametrize("kind", ["l1", "carma"])
def test_compiled_checks_and_costs_agree_with_the_per_person_ones_on_edge_values(
    dataset: str, kind: str
) -> None:
    scm, clf, _, x, noise, people, intervene, values = edge_cases(dataset, 300, seed=7)
    cost = CostProfile.for_model(kind, scm, clf, sparsity=0.01)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    holds = hard_constraints_hold(scm, arrays, intervene, values)
    costs = cost.costs(scm.names, x, intervene, values, arrays)
    assert 0 < holds.sum() < len(x)
    assert np.isnan(costs).any() and np.isinf(costs).any()
    with np.errstate(all="ignore"):
        for i, person in enumerate(people):
            one = verify_action(scm, clf, cost, x[i], noise[i], person, intervene[i], values[i])
            hard = [f for f in one.failures if not f.startswith(PROBABILITY_RULES)]
            assert holds[i] == (not hard), (i, hard)
            if np.isnan(one.cost):
                assert np.isnan(costs[i])
            else:
                assert costs[i] == pytest.approx(one.cost, rel=1e-12), i


def reference_hard_constraints(scm, arrays, intervene, values) -> np.ndarray:
    """:func:`hard_constraints_hold`'s rules, plainly: a value is inside its interval (up
    to the tolerance) only if it is a number; whole numbers where required."""
    columns = scm.actionable_columns
    whole = np.zeros(len(columns), dtype=bool)
    whole[scm.whole_actionable] = True
    holds = np.empty(len(values), dtype=bool)
    for i in range(len(values)):
        acted = intervene[i, columns]
        v = values[i, columns]
        tolerance = 1e-7 * (1 + np.abs(v))
        with np.errstate(invalid="ignore"):
            inside = (
                np.isfinite(v)
                & (arrays.lower[i] - tolerance <= v)
                & (v <= arrays.upper[i] + tolerance)
            )
            whole_number = ~whole | (v == np.round(v))
        holds[i] = (
            not intervene[i, scm.not_actionable_columns].any()
            and (inside & ~arrays.locked[i] & whole_number)[acted].all()
            and acted.sum() <= arrays.max_changes[i]
        )
    return holds


def reference_costs(cost: CostProfile, scm, x, intervene, values, arrays) -> np.ndarray:
    """The module docstring's formula, feature by feature (a soft limit of inf: none)."""
    total = np.zeros(len(x))
    for k, name in enumerate(cost.actionable):
        j = scm.index[name]
        acted = intervene[:, j]
        delta = values[acted, j] - x[acted, j]
        per_feature = arrays.weight[acted, k] / cost.denominators[k]
        per_feature *= np.abs(delta) if cost.kind == "l1" else delta**2
        limited = np.isfinite(arrays.soft_limit[acted, k])
        beyond = np.abs(delta) - np.where(limited, arrays.soft_limit[acted, k], 0.0)
        penalty = np.where(limited, arrays.soft_penalty[acted, k] * np.maximum(beyond, 0.0), 0.0)
        total[acted] += per_feature + cost.sparsity + penalty
    return total


@pytest.mark.parametrize("dataset", ["loan", "gsmc"])
@pytest.mark.parametrize("kind", ["l1", "carma"])
def test_compiled_checks_and_costs_follow_their_rules_on_edge_constraints(
    dataset: str, kind: str
) -> None:
    # Constraints no document can give: infinite and signed-zero bounds (integer features
    # too), soft limits of 0, -0 and inf (none) with a penalty, every number of changes.
    scm, clf, _, x, _, people, intervene, values = edge_cases(dataset, 400, seed=8)
    cost = CostProfile.for_model(kind, scm, clf, sparsity=0.01)
    arrays = ConstraintArrays.from_constraints(scm, x, people)
    rng = np.random.default_rng(8)
    cells = rng.random(arrays.lower.shape)

    def where(start: float, stop: float) -> np.ndarray:
        return (start <= cells) & (cells < stop)  # noqa: SIM300 (reads as an interval)

    lower, upper = arrays.lower.copy(), arrays.upper.copy()
    lower[where(0.0, 0.1)], upper[where(0.9, 1.0)] = -np.inf, np.inf
    lower[where(0.1, 0.15)], upper[where(0.15, 0.2)] = -0.0, 0.0
    soft_limit = arrays.soft_limit.copy()
    soft_limit[where(0.2, 0.3)], soft_limit[where(0.3, 0.35)] = 0.0, -0.0
    soft_limit[where(0.35, 0.45)] = np.inf
    arrays = dataclasses.replace(
        arrays,
        lower=lower,
        upper=upper,
        soft_limit=soft_limit,
        soft_penalty=np.where(where(0.0, 0.5), 1.5, arrays.soft_penalty),
        max_changes=rng.integers(0, len(scm.actionable) + 1, len(x)),
    )
    columns = scm.actionable_columns
    values[:, columns] = np.where(where(0.5, 0.55), lower, values[:, columns])
    holds = hard_constraints_hold(scm, arrays, intervene, values)
    assert 0 < holds.sum() < len(x)
    np.testing.assert_array_equal(holds, reference_hard_constraints(scm, arrays, intervene, values))
    with np.errstate(all="ignore"):
        expected = reference_costs(cost, scm, x, intervene, values, arrays)
    np.testing.assert_allclose(
        cost.costs(scm.names, x, intervene, values, arrays), expected, rtol=1e-12, atol=0
    )
