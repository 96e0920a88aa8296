from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.preferences import (
    ConstraintArrays,
    PreferenceError,
    WeightScheme,
    parse_constraints,
)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lock": ["salary"]}, r"'lock' of the individual names 'salary', which is not a feature"),
        ({"rank": ["income", "income"]}, r"'rank' of the individual must list each actionable"),
        ({"rank": ["age", "income"]}, r"'rank' .* names 'age', which is immutable"),
        ({"rank": ["loan_duration"]}, r"names 'loan_duration', which is non_actionable"),
        ({"score": {"income": 7}}, r"'score' of the individual for 'income' must be between 1"),
        ({"score": {"income": float("nan")}}, r"'score.income' .* must be a finite number"),
        ({"bounds": {"income": [50, 60]}}, r"'bounds' .* for 'income' must .* overlap"),
        ({"bounds": {"income": [3, 1]}}, r"lower <= upper"),
        ({"bounds": {"income": [float("nan"), 1]}}, r"'bounds.income' .* finite number"),
        ({"direction": {"savings": "up"}}, r"'direction' .* 'increase' or 'decrease'"),
        ({"max_changes": -1}, r"'max_changes' .* whole number"),
        ({"rank": ["income"], "score": {"income": 3}}, r"at most one of"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"soft_limits": {"income": {"limit": -1, "penalty": 1}}}, r"limit >= 0"),
        ({"weights": {"income": 0}}, r"'weights' .* must be > 0"),
    ],
)
def test_bad_preferences_name_the_field(loan_scm, raw, message) -> None:
    with pytest.raises(PreferenceError, match=message):
        parse_constraints(raw, loan_scm)


def test_locking_an_immutable_feature_is_fine(loan_scm) -> None:
    assert parse_constraints({"lock": ["age", "gender"]}, loan_scm).locks == {"age", "gender"}


def test_rank_becomes_increasing_weights(loan_scm) -> None:
    c = parse_constraints({"rank": ["savings", "income"]}, loan_scm)
    w = c.weights
    assert w["savings"] < w["income"] < w["loan_amount"] == w["education"]
    assert sum(w.values()) / len(w) == pytest.approx(1.0)


def test_scores_become_weights(loan_scm) -> None:
    c = parse_constraints({"score": {"income": 5, "savings": 1}}, loan_scm)
    assert c.weights["income"] < c.weights["education"] < c.weights["savings"]


def test_exponential_scheme(loan_scm) -> None:
    scheme = WeightScheme(mapping="exponential", base=3.0, normalize=False)
    c = parse_constraints(
        {"rank": ["savings", "income", "education", "loan_amount"]}, loan_scm, scheme
    )
    assert [c.weights[k] for k in ("savings", "income", "education", "loan_amount")] == [
        1,
        3,
        9,
        27,
    ]


def test_bounds_are_clipped_to_the_domain(loan_scm) -> None:
    c = parse_constraints({"bounds": {"income": [None, 100]}}, loan_scm)
    assert c.bounds["income"] == (-12.0, 14.0)


def test_taking_people_gives_the_rows_of_indexing() -> None:
    rng = np.random.default_rng(0)
    n, k = 9, 3
    arrays = ConstraintArrays(
        rng.random((n, k)) < 0.3,
        rng.normal(size=(n, k)),
        rng.normal(size=(n, k)),
        rng.random((n, k)),
        np.where(rng.random((n, k)) < 0.5, np.inf, rng.random((n, k))),
        rng.random((n, k)),
        rng.integers(0, k + 1, n),
    )
    fields = [f.name for f in dataclasses.fields(ConstraintArrays)]
    masks = [rng.random(n) < 0.5, np.zeros(n, dtype=bool)]
    for rows in [np.array([4]), np.array([-1, 0, 0]), np.arange(0), *masks, slice(2, 5)]:
        taken = arrays.take(rows)
        for name in fields:
            expected = getattr(arrays, name)[rows]
            assert getattr(taken, name).dtype == expected.dtype
            np.testing.assert_array_equal(getattr(taken, name), expected)
    assert np.shares_memory(arrays.take(slice(2, 5)).lower, arrays.lower)
    with pytest.raises(IndexError, match="boolean index did not match"):
        arrays.take(np.ones(n - 1, dtype=bool))
