"""The batch verification: the per-person rules for many people at once, block by block."""

from __future__ import annotations

import numpy as np
import pytest

from instances import load_classifier, load_scm
from models.costs import CostProfile
from models.preferences import ConstraintArrays, parse_constraints
from models.scm import Role, VariableType
from solver.verify import verify_action, verify_actions


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
