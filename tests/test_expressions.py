from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.expressions import (
    ExpressionError,
    check_invertible,
    evaluate,
    evaluate_interval,
    parse_expression,
    sigmoid,
    to_text,
)


@pytest.mark.parametrize(
    "text, rule",
    [
        ("__import__('os').system('true')", "not allowed"),
        ("a.real", "Attribute"),
        ("(lambda: 1)()", "not allowed"),
        ("a if b else c", "IfExp"),
        ("a < b", "Compare"),
        ("max(a, key=b)", "keyword"),
        ("a ** b", "non-constant power"),
        ("open('x')", "'open', which is not allowed"),
        ("a +", "not a valid expression"),
        ("True + a", "booleans"),
    ],
)
def test_parser_refuses_everything_outside_the_whitelist(text: str, rule: str) -> None:
    with pytest.raises(ExpressionError, match=rule):
        parse_expression(text)


def test_evaluate_matches_numpy() -> None:
    expr = parse_expression("-4 + 1.5 * max(income, 0) + abs(x) ** 2 - indicator(x) + log(exp(y))")
    env = {"income": np.array([-1.0, 2.0]), "x": np.array([-3.0, 0.0]), "y": np.array([0.5, 1.0])}
    expected = -4 + 1.5 * np.maximum(env["income"], 0) + env["x"] ** 2 - (env["x"] >= 0) + env["y"]
    np.testing.assert_allclose(evaluate(expr, env), expected)


def test_text_round_trips() -> None:
    expr = parse_expression("-0.5 + sigmoid(-1 + 0.5 * g + sigmoid(0.1 * a) + noise)")
    again = parse_expression(to_text(expr))
    env = {"g": np.array([0.0, 1.0]), "a": np.array([3.0, -2.0]), "noise": np.array([0.1, 0.2])}
    np.testing.assert_allclose(evaluate(expr, env), evaluate(again, env))


def test_noise_inside_a_sigmoid_is_invertible() -> None:
    # Recovered by the compiled abduction: tests/test_programs.py.
    expr = parse_expression("-0.5 + sigmoid(-1 + 0.5 * g + sigmoid(0.1 * a) + noise)")
    check_invertible(expr, "noise", where="equation")


@pytest.mark.parametrize(
    "text, rule", [("max(noise, 0)", "cannot be inverted"), ("noise + noise", "exactly once")]
)
def test_non_invertible_noise_is_refused(text: str, rule: str) -> None:
    with pytest.raises(ExpressionError, match=rule):
        check_invertible(parse_expression(text), "noise", where="equation of 'x'")


EXPRESSIONS = [
    "1.5 * max(x, 0) - y",
    "x * y + abs(x - y)",
    "sigmoid(2 * x) * y - min(x, y, 1)",
    "(x - 1) ** 2 + exp(0.3 * y)",
    "indicator(x - y) * 3 + x / 4",
]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(EXPRESSIONS),
    st.tuples(st.floats(-5, 5), st.floats(0, 4)),
    st.tuples(st.floats(-5, 5), st.floats(0, 4)),
    st.integers(0, 2**31 - 1),
)
def test_interval_bounds_contain_every_value(text, xbox, ybox, seed) -> None:
    expr = parse_expression(text)
    box = {"x": (xbox[0], xbox[0] + xbox[1]), "y": (ybox[0], ybox[0] + ybox[1])}
    lo, hi = evaluate_interval(expr, box)
    rng = np.random.default_rng(seed)
    points = {n: rng.uniform(b[0], b[1], 500) for n, b in box.items()}
    values = evaluate(expr, points)
    assert np.all(values >= lo - 1e-9) and np.all(values <= hi + 1e-9)


def test_evaluate_names_a_missing_value_and_raises_on_constant_division_by_zero() -> None:
    with pytest.raises(ExpressionError, match="No value for 'y'"):
        evaluate(parse_expression("x + y"), {"x": np.ones(2)})
    # Constants are Python floats (the compiled programs give numpy's inf instead).
    with pytest.raises(ZeroDivisionError):
        evaluate(parse_expression("x + 1 / 0"), {"x": np.ones(2)})


def test_sigmoid_gives_the_two_branch_formulas_bits() -> None:
    special = [0.0, -0.0, 800, -800, np.inf, -np.inf, np.nan]
    x = np.concatenate([np.random.default_rng(0).normal(0, 10, 200), special])
    e = np.exp(-np.abs(x))
    expected = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    assert sigmoid(x).tobytes() == expected.tobytes()
    assert isinstance(sigmoid(0.3), np.ndarray)  # as np.where returns, for scalars too
