"""The compiled causal-model numerics (models.programs) against the reference tree walk.

The programs run numba's exp, log and pow (the C library's), not numpy's own, so values
agree with :func:`models.expressions.evaluate` to a few ulps, not bit for bit: compared
here with a relative tolerance on ``1 + |value|``. What does not depend on the math
library is compared exactly: intervened values, results split across blocks of rows,
constant folding, and the IEEE edge cases (inf, nan, signed zeros).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from instances import DATASETS, load_scm
from models.expressions import (
    BinOp,
    Call,
    Const,
    Expr,
    ExpressionError,
    Neg,
    Var,
    evaluate,
    logit,
    parse_expression,
    sigmoid,
    to_text,
)
from models.programs import (
    ADD,
    BLOCK,
    CONST,
    CONSTANT,
    IN_SLOT,
    POW,
    STACKED,
    ModelProgram,
    propagate_one,
    run_scalar,
)
from models.scm import NOISE, StructuralCausalModel

RTOL = 1e-13


def assert_close(actual, expected, rtol: float = RTOL) -> None:
    """Equal nan and infinities; finite values within ``rtol * (1 + |expected|)``."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    infinite = np.isinf(expected)
    np.testing.assert_array_equal(actual[infinite], expected[infinite])
    finite = np.isfinite(expected)
    assert np.all(np.isfinite(actual[finite]))
    error = np.abs(actual[finite] - expected[finite]) / (1.0 + np.abs(expected[finite]))
    assert error.max(initial=0.0) <= rtol, f"relative error {error.max():.3g} > {rtol:.0e}"


def assert_same_bits(actual, expected) -> None:
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def model_variants() -> list[tuple[str, str | None]]:
    """Every built-in model and every variant its JSON defines."""
    found = []
    for dataset in DATASETS:
        document = json.loads((resources.files("instances") / dataset / "scm.json").read_text())
        found += [(dataset, None)] + [(dataset, v) for v in sorted(document.get("variants", {}))]
    return found


MODELS = model_variants()


def test_the_variants_are_found() -> None:
    assert ("loan", "karimi") in MODELS and ("gsmc", None) in MODELS


def awkward_rows(scm: StructuralCausalModel, n: int, seed: int) -> np.ndarray:
    """Rows inside and well outside the domain, with exact zeros of both signs."""
    rng = np.random.default_rng(seed)
    width = scm.upper - scm.lower
    rows = rng.uniform(scm.lower - width, scm.upper + width, (n, scm.num_features))
    rows[rng.random(rows.shape) < 0.1] = 0.0
    rows[rng.random(rows.shape) < 0.1] = -0.0
    return rows


def tree_walk(scm, intervene, values, noise) -> np.ndarray:
    """Propagation by the reference: a tree walk per equation, np.where per column."""
    out = np.empty_like(noise)
    for j, var in enumerate(scm.variables):
        env = {p: out[:, scm.index[p]] for p in var.parents} | {NOISE: noise[:, j]}
        out[:, j] = np.where(intervene[:, j], values[:, j], evaluate(var.equation, env))
    return out


# -- the built-in models -----------------------------------------------------------------


@pytest.mark.parametrize("dataset, variant", MODELS)
def test_generate_matches_the_tree_walk(dataset, variant) -> None:
    scm = load_scm(dataset, variant)
    nothing = np.zeros((300, scm.num_features), dtype=bool)
    with np.errstate(all="ignore"):
        for noise in (scm.sample_noise(300, 0), awkward_rows(scm, 300, 1)):
            assert_close(scm.generate(noise), tree_walk(scm, nothing, noise, noise))


@pytest.mark.parametrize("dataset, variant", MODELS)
def test_counterfactuals_match_the_tree_walk(dataset, variant) -> None:
    scm = load_scm(dataset, variant)
    rng = np.random.default_rng(6)
    with np.errstate(all="ignore"):
        for x, noise, values in (
            (*scm.sample(200, 3), scm.sample(200, 4)[0]),
            (awkward_rows(scm, 200, 3), awkward_rows(scm, 200, 4), awkward_rows(scm, 200, 5)),
        ):
            intervene = rng.random(x.shape) < 0.3
            intervene[:, 1], intervene[:, 2] = True, False  # a feature set in all rows / none
            cf = scm.propagate_counterfactual(x, intervene, values, noise)
            assert_close(cf, tree_walk(scm, intervene, values, noise))
            # Intervened features take exactly the given values (zeros keep their sign).
            assert_same_bits(cf[intervene], values[intervene])
            # Without noise, it is abducted from the factual rows.
            abducted = scm.abduct_noise(x)
            assert_same_bits(
                scm.propagate_counterfactual(x, intervene, values),
                scm.propagate_counterfactual(x, intervene, values, abducted),
            )


@pytest.mark.parametrize("dataset, variant", MODELS)
def test_abduction_round_trips(dataset, variant) -> None:
    scm = load_scm(dataset, variant)
    noise = scm.sample_noise(2000, 7)
    # Inverting a sigmoid near 0 or 1 loses digits (logit's condition number): looser
    # than the agreement with the tree walk.
    assert_close(scm.abduct_noise(scm.generate(noise)), noise, rtol=1e-12)


@pytest.mark.parametrize("dataset, variant", MODELS)
def test_abducted_noise_solves_each_equation(dataset, variant) -> None:
    # The reference evaluates each equation at the abducted noise: it gives the row back.
    scm = load_scm(dataset, variant)
    with np.errstate(all="ignore"):
        for x in (scm.sample(500, 8)[0], awkward_rows(scm, 500, 9)):
            noise = scm.abduct_noise(x)
            for j, var in enumerate(scm.variables):
                solvable = np.isfinite(noise[:, j])  # e.g. not log of a negative
                env = {p: x[solvable, scm.index[p]] for p in var.parents}
                again = evaluate(var.equation, env | {NOISE: noise[solvable, j]})
                assert_close(np.broadcast_to(again, solvable.sum()), x[solvable, j])
            assert np.isfinite(noise).mean() > 0.5


@pytest.mark.parametrize("dataset", DATASETS)
def test_blocks_give_the_rows_bits(dataset) -> None:
    scm = load_scm(dataset)
    n = 3 * BLOCK + 5  # several whole blocks and a part
    x, noise = scm.sample(n, 10)
    values = scm.sample(n, 11)[0]
    intervene = np.random.default_rng(12).random(x.shape) < 0.3
    batch = scm.propagate_counterfactual(x, intervene, values, noise)
    for i in range(n):
        assert_same_bits(
            scm.propagate_counterfactual(x[i], intervene[i], values[i], noise[i : i + 1])[0],
            batch[i],
        )
    generated, abducted = scm.generate(noise), scm.abduct_noise(x)
    for i in range(n):
        assert_same_bits(scm.generate(noise[i])[0], generated[i])
        assert_same_bits(scm.abduct_noise(x[i])[0], abducted[i])
    # Any layout: transposed views and strided rows are copied to C order first.
    assert_same_bits(scm.generate(np.asfortranarray(noise)), generated)
    assert_same_bits(scm.abduct_noise(np.repeat(x, 2, axis=0)[::2]), abducted)


def test_rows_of_another_width_are_refused(loan_scm) -> None:
    # The compiled loops do not check indices; the shapes are checked before them.
    for width in (3, loan_scm.num_features + 2):
        rows = np.zeros((2, width))
        with pytest.raises(ValueError, match="one column per variable"):
            loan_scm.generate(rows)
        with pytest.raises(ValueError, match="one column per variable"):
            loan_scm.abduct_noise(rows)
        with pytest.raises(ValueError, match="one column per variable"):
            loan_scm.propagate_counterfactual(rows, rows.astype(bool), rows, rows)


def test_unknown_names_are_refused_when_the_model_is_built(loan_scm) -> None:
    with pytest.raises(ExpressionError, match="No value for 'y'"):
        ModelProgram.build([parse_expression("a + y + noise")], [{"a": 0}], NOISE)
    # A variable that does not list a name its equation reads.
    savings = dataclasses.replace(loan_scm.variables[-1], parents=())
    with pytest.raises(ExpressionError, match="No value for 'income'"):
        StructuralCausalModel("loan", [*loan_scm.variables[:-1], savings], loan_scm.label_spec, {})


# -- single expressions --------------------------------------------------------------------

NAMES = ("a", "b", "c")


def expression_model(expr: Expr | str, **columns) -> tuple[ModelProgram, np.ndarray]:
    """``expr`` (over a, b and c) as the equation ``expr + noise`` of a variable whose
    parents are a, b and c, and the noise that gives a, b and c their ``columns`` (the
    last variable's noise -0.0: ``v + -0.0`` is ``v``, bit for bit, for every v: zeros
    keep their sign)."""
    if isinstance(expr, str):
        expr = parse_expression(expr)
    columns = {name: np.asarray(columns.get(name, 0.0), dtype=float) for name in NAMES}
    n = np.broadcast(*columns.values()).size
    program = ModelProgram.build(
        [Var(NOISE)] * len(NAMES) + [BinOp("+", expr, Var(NOISE))],
        [{}] * len(NAMES) + [{name: k for k, name in enumerate(NAMES)}],
        NOISE,
    )
    noise = np.column_stack(
        [*(np.broadcast_to(columns[name], n) for name in NAMES), np.full(n, -0.0)]
    )
    return program, noise


def compiled(expr: Expr | str, **columns) -> np.ndarray:
    """``expr`` (over a, b and c) run by a compiled program (see :func:`expression_model`)."""
    program, noise = expression_model(expr, **columns)
    x = np.empty_like(noise)
    program.propagate(x, np.zeros(x.shape, dtype=bool), np.zeros_like(x), noise)
    return x[:, -1]


EXPRESSIONS = [
    "1.5 * max(a, 0) - b",
    "a * b + abs(a - b)",
    "sigmoid(2 * a) * b - min(a, b, 1)",
    "(a - 1) ** 2 + exp(0.3 * b)",
    "indicator(a - b) * 3 + a / 4",
    "-(2 ** 3) + a * -b",
    "max(a, 1, b, -2) / min(2, 3)",
    "sigmoid(1) * a",
    "log(abs(a) + 0.5) - exp(-b) * c",
    "(abs(c) + 1) ** 0.5 + abs(a) ** 1.5 / (1 + b ** 2)",
    "4",
]


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_expressions_match_the_tree_walk(text: str) -> None:
    rng = np.random.default_rng(0)
    env = {
        "a": rng.normal(0, 3, 100),
        "b": np.append(rng.normal(0, 3, 99), -0.0),
        "c": rng.normal(0, 3, 100),
    }
    reference = np.broadcast_to(evaluate(parse_expression(text), env), (100,))
    assert_close(compiled(text, **env), reference)


def test_division_by_zero_gives_inf_or_nan() -> None:
    got = compiled("a / b", a=[1.0, -1.0, 0.0, 1.0, -1.0], b=[0.0, 0.0, 0.0, -0.0, -0.0])
    np.testing.assert_array_equal(got, [np.inf, -np.inf, np.nan, -np.inf, np.inf])
    # Constant subtrees that fail in Python floats are left to the interpreter: numpy's inf.
    assert_same_bits(compiled("a + 1 / 0", a=[1.0, -2.0]), [np.inf, np.inf])
    assert np.isnan(compiled("a * (0 / 0)", a=[1.0])).all()
    assert_same_bits(compiled("exp(1 / 0) - a", a=[3.0]), [np.inf])


def test_constant_subtrees_are_folded() -> None:
    a = np.random.default_rng(1).normal(0, 3, 50)
    assert_same_bits(compiled("2 ** 3 * a", a=a), 8 * a)
    assert_same_bits(compiled("-(2 ** 3) + a", a=a), -8 + a)
    program = ModelProgram.build([parse_expression("2 ** 3 * noise")], [{}], NOISE)
    assert POW not in program.ops
    assert 8.0 in program.consts[program.ops == CONST]
    # Folded by numpy itself: the reference's bits even for functions of constants.
    for text in ("sigmoid(1) * a", "exp(0.3) * a", "log(2) * a", "max(1, 2, -3) * a"):
        assert_same_bits(compiled(text, a=a), evaluate(parse_expression(text), {"a": a}))


def test_max_and_min_follow_numpy() -> None:
    a = np.array([np.nan, 1.0, np.nan, -0.0, 0.0, 2.0, -1.0])
    b = np.array([1.0, np.nan, np.nan, 0.0, -0.0, 1.0, 3.0])
    c = np.array([0.0, 0.0, 0.0, -0.0, -0.0, 5.0, np.nan])
    # Bit for bit, signed zeros included: of equal values numpy takes the second.
    assert_same_bits(compiled("max(a, b)", a=a, b=b), np.maximum(a, b))
    assert_same_bits(compiled("min(a, b)", a=a, b=b), np.minimum(a, b))
    assert np.isnan(compiled("max(a, b)", a=a, b=b)[:3]).all()
    assert_same_bits(compiled("1 / max(a, 0)", a=[-0.0, -1.0]), [np.inf, np.inf])
    # Any number of arguments, folded from the left.
    for func, ufunc in (("max", np.maximum), ("min", np.minimum)):
        for args in (("a", "b", "c"), ("c", "1", "a", "b", "-2"), ("b", "b", "a", "c", "a")):
            env = {"a": a, "b": b, "c": c}
            values = [env[arg] if arg in env else float(arg) for arg in args]
            expected = functools.reduce(ufunc, values)
            assert_same_bits(compiled(f"{func}({', '.join(args)})", **env), expected)


def test_functions_on_edge_values() -> None:
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -1e-300, -1.0, 1000.0, -1000.0])
    got = compiled("indicator(a)", a=special)
    assert_same_bits(got, [0, 1, 0, 1, 1, 0, 0, 1, 0])
    with np.errstate(all="ignore"):
        assert_same_bits(compiled("abs(a)", a=special), np.abs(special))
        logs = compiled("log(a)", a=special)
        assert np.isnan(logs[[0, 2, 5, 6]]).all()  # log of a negative is nan
        assert_same_bits(logs[[1, 3, 4]], [np.inf, -np.inf, -np.inf])
        assert_same_bits(compiled("exp(a)", a=special)[[1, 2, 7, 8]], [np.inf, 0, np.inf, 0])
        # ** 0.5 is numpy's square root (not C's pow, for which (-inf) ** 0.5 is inf).
        base = np.array([-np.inf, -1.0, np.nan, -0.0, 0.0, 4.0, np.inf])
        roots = compiled("a ** 0.5", a=base)
        np.testing.assert_array_equal(roots, np.power(base, 0.5))  # nan where numpy's is
        assert_same_bits(roots[3:], [-0.0, 0.0, 2.0, np.inf])  # and -0.0 stays -0.0
        assert_same_bits(compiled("a ** 3", a=[-2.0, -0.0, -np.inf]), [-8.0, -0.0, -np.inf])


def test_sigmoid_never_overflows() -> None:
    x = np.array([1000.0, -1000.0, 710.0, 800.0, -800.0, np.inf, -np.inf, 0.0, -0.0])
    got = compiled("sigmoid(a)", a=x)
    assert_same_bits(got, [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    assert np.isnan(compiled("sigmoid(a)", a=[np.nan])).all()
    wide = np.random.default_rng(0).normal(0, 50, 1000)
    assert_close(compiled("sigmoid(a)", a=wide), sigmoid(wide))


# -- abduction of hand-picked equations ----------------------------------------------------

# (equation over a, b and noise; the range of the noise; the noise solved by hand)
# a in [0.5, 2], b in [-2, 2]. The noise sits inside sigmoid, exp and log, under unary
# minus, on either side of - and /, and under ** with a constant exponent.
INVERTED: list[tuple[str, tuple[float, float], object]] = [
    ("a + noise", (-5, 5), lambda y, a, b: y - a),
    ("noise - a * b", (-5, 5), lambda y, a, b: y + a * b),
    ("a - noise", (-5, 5), lambda y, a, b: a - y),
    ("-noise + b", (-5, 5), lambda y, a, b: b - y),
    ("-(a * noise) + b", (-5, 5), lambda y, a, b: (b - y) / a),
    ("noise / (1 + a ** 2)", (-5, 5), lambda y, a, b: y * (1 + a**2)),
    ("b - a / noise", (0.5, 4), lambda y, a, b: a / (b - y)),
    ("2 * (noise - b) ** 3", (-3, 3), lambda y, a, b: b + np.cbrt(y / 2)),
    ("(a + noise) ** 2", (0, 3), lambda y, a, b: np.sqrt(y) - a),
    ("(noise * a) ** 0.5 - b", (0.1, 4), lambda y, a, b: (y + b) ** 2 / a),
    ("sigmoid(a * b + noise)", (-4, 4), lambda y, a, b: logit(y) - a * b),
    (
        "-0.5 + sigmoid(-1 + 0.5 * a + sigmoid(0.1 * b) + noise)",
        (-4, 4),
        lambda y, a, b: logit(y + 0.5) - (-1 + 0.5 * a + sigmoid(0.1 * b)),
    ),
    ("21 + 79 * sigmoid(-0.45 + noise)", (-4, 4), lambda y, a, b: logit((y - 21) / 79) + 0.45),
    ("a / (1 + exp(-noise))", (-4, 4), lambda y, a, b: -np.log(a / y - 1)),
    ("exp(1.5 - noise) * (2 + abs(b))", (-3, 3), lambda y, a, b: 1.5 - np.log(y / (2 + abs(b)))),
    ("exp(noise) * (0.06 + 0.09 * a)", (-3, 3), lambda y, a, b: np.log(y / (0.06 + 0.09 * a))),
    ("log(noise) + a", (0.1, 5), lambda y, a, b: np.exp(y - a)),
    ("3 * log(2 - noise) - b", (-3, 1.9), lambda y, a, b: 2 - np.exp((y + b) / 3)),
    ("-log(a / noise)", (0.1, 5), lambda y, a, b: a * np.exp(y)),
    (
        "indicator(b - 0.5) + max(a, b, 0) - noise",
        (-5, 5),
        lambda y, a, b: (b >= 0.5) + np.maximum(np.maximum(a, b), 0) - y,
    ),
]


def hand_model(equation: str) -> StructuralCausalModel:
    def variable(name: str, equation: str) -> dict:
        return {
            "name": name,
            "type": "continuous",
            "role": "actionable",
            "bounds": [-100, 100],
            "equation": equation,
            "noise": {"distribution": "normal", "sd": 1},
        }

    return StructuralCausalModel.from_dict(
        {
            "schema_version": 1,
            "name": "hand",
            "variables": [variable("a", "noise"), variable("b", "noise"), variable("y", equation)],
        }
    )


def hand_noise(noise_range: tuple[float, float], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [rng.uniform(0.5, 2, n), rng.uniform(-2, 2, n), rng.uniform(*noise_range, n)]
    )


@pytest.mark.parametrize("equation, noise_range, solved", INVERTED)
def test_abduction_inverts_hand_picked_equations(equation, noise_range, solved) -> None:
    scm = hand_model(equation)
    u = hand_noise(noise_range, 500, 0)
    x = scm.generate(u)
    env = {"a": u[:, 0], "b": u[:, 1], NOISE: u[:, 2]}
    assert_close(x[:, 2], evaluate(scm.variables[2].equation, env))
    abducted = scm.abduct_noise(x)
    assert_same_bits(abducted[:, :2], u[:, :2])  # the roots' noise is their value
    assert_close(abducted[:, 2], solved(x[:, 2], x[:, 0], x[:, 1]))
    assert_close(abducted[:, 2], u[:, 2], rtol=1e-12)  # round trip (conditioning: looser)


@pytest.mark.parametrize("equation, noise_range, solved", INVERTED)
def test_abduction_agrees_with_root_finding(equation, noise_range, solved) -> None:
    # An inversion that knows nothing of the algebra: bracket the noise, solve numerically.
    scm = hand_model(equation)
    expr = scm.variables[2].equation
    u = hand_noise(noise_range, 30, 1)
    x = scm.generate(u)
    abducted = scm.abduct_noise(x)
    for row, true_noise, noise in zip(x, u[:, 2], abducted[:, 2], strict=True):
        env = {"a": row[0], "b": row[1]}

        def residual(n, env=env, target=row[2]):
            return float(evaluate(expr, env | {NOISE: n})) - target

        # Every equation is monotone in the noise around the sampled ranges (and defined
        # there: the ranges keep 0.1 from where log or a root is not).
        width = 0.01 * (1 + abs(true_noise))
        root = brentq(residual, true_noise - width, true_noise + width, xtol=1e-15, rtol=1e-15)
        assert abs(noise - root) <= 1e-11 * (1 + abs(root))


def test_unary_minus_and_reversed_operands_are_undone() -> None:
    # The reversed undo operations (the noise on the right of - and /), a few exact cases.
    scm = hand_model("b - a / noise")
    assert_same_bits(scm.abduct_noise([[2.0, 1.0, 0.5]])[0], [2.0, 1.0, 4.0])
    scm = hand_model("-(noise - a)")
    assert_same_bits(scm.abduct_noise([[2.0, 0.0, -3.0]])[0], [2.0, 0.0, 5.0])


# -- random expressions ----------------------------------------------------------------------

leaves = st.one_of(  # constants as the parser makes them: not negative (-c is Neg(c))
    st.sampled_from(NAMES).map(Var),
    st.floats(0, 4).map(Const),
    st.sampled_from([0.0, 1.0, 0.5]).map(Const),
)


def _nodes(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    return st.one_of(
        children.map(Neg),
        st.tuples(st.sampled_from("+-*/"), children, children).map(lambda t: BinOp(*t)),
        st.tuples(children, st.sampled_from([0.0, 1.0, 2.0, 3.0, 0.5, 1.5])).map(
            lambda t: BinOp("**", t[0], Const(t[1]))
        ),
        st.tuples(st.sampled_from(["max", "min"]), st.lists(children, min_size=2, max_size=4)).map(
            lambda t: Call(t[0], tuple(t[1]))
        ),
        st.tuples(st.sampled_from(["abs", "indicator", "sigmoid", "exp", "log"]), children).map(
            lambda t: Call(t[0], (t[1],))
        ),
    )


expressions = st.recursive(leaves, _nodes, max_leaves=12)
EDGES = np.array([0.0, -0.0, 1.0, -1.0, 0.5, np.inf, -np.inf, np.nan])


@settings(max_examples=300, deadline=None)
@given(expressions, st.integers(0, 2**31 - 1))
def test_random_expressions_match_the_tree_walk(expr: Expr, seed: int) -> None:
    rng = np.random.default_rng(seed)
    env = {name: np.concatenate([rng.normal(0, 2, 40), rng.permutation(EDGES)]) for name in NAMES}
    with np.errstate(all="ignore"):
        try:
            reference = np.broadcast_to(evaluate(expr, env), (48,))
        except ZeroDivisionError:  # a constant 1 / 0: Python floats raise, numpy gives inf
            reference = None
        got = compiled(expr, **env)
        assert_same_bits(compiled(parse_expression(to_text(expr)), **env), got)
    if reference is not None:
        assert_close(got, reference)


# -- the one-row interpreter -----------------------------------------------------------------
# run_scalar and propagate_one (the search kernels' evaluation) run the same opcodes as the
# block interpreter with the same arithmetic, one row at a time: the same bits, except
# for the sign of a nan (IEEE 754 leaves it open, and the compiler may swap the operands
# of + and *, which decides whose nan comes out; no operation here reads it).


def assert_same_values(actual, expected) -> None:
    """The same bits, but any nan for a nan."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    assert actual[~nan].tobytes() == expected[~nan].tobytes()


def one_row_propagation(program: ModelProgram, intervene, values, noise) -> np.ndarray:
    """:meth:`ModelProgram.propagate` row by row through :func:`propagate_one`."""
    n, f = noise.shape
    x = np.empty_like(noise)
    slots, stack = np.empty(2 * f), np.empty(program.depth)
    for i in range(n):
        slots[:f] = np.nan  # a program reading a slot before it is set would show
        slots[f:] = noise[i]
        propagate_one(program.value_code, slots, stack, intervene[i], values[i])
        x[i] = slots[:f]
    return x


def one_row_abduction(program: ModelProgram, x: np.ndarray) -> np.ndarray:
    """:meth:`ModelProgram.abduct` (noise given as the rows) row by row with
    :func:`run_scalar`."""
    noise = x.copy()
    stack = np.empty(program.depth)
    begin, end = program.noise_start[:-1], program.noise_start[1:]
    for i, row in enumerate(x):
        for j in np.flatnonzero(end > begin):
            noise[i, j] = run_scalar(program.ops, program.operands, program.args,
                                     program.consts, begin[j], end[j], row, stack)  # fmt: skip
    return noise


def block_abduction(program: ModelProgram, x: np.ndarray) -> np.ndarray:
    noise = x.copy()
    program.abduct(noise, x)
    return noise


def folded_operands(program: ModelProgram) -> set[int]:
    """How the binary operations of ``program`` take their right operand."""
    return {int(kind) for kind in program.operands[program.ops >= ADD]}


@pytest.mark.parametrize("dataset, variant", MODELS)
def test_one_row_interpreter_gives_the_blocks_bits_on_the_models(dataset, variant) -> None:
    scm = load_scm(dataset, variant)
    program = scm.program
    rng = np.random.default_rng(13)
    with np.errstate(all="ignore"):
        for x, noise, values in (
            (*scm.sample(150, 14), scm.sample(150, 15)[0]),
            (awkward_rows(scm, 150, 14), awkward_rows(scm, 150, 15), awkward_rows(scm, 150, 16)),
        ):
            for intervene in (
                np.zeros(x.shape, dtype=bool),
                rng.random(x.shape) < 0.3,
                rng.random(x.shape) < 0.7,
            ):
                block = scm.propagate_counterfactual(x, intervene, values, noise)
                assert_same_values(one_row_propagation(program, intervene, values, noise), block)
            assert_same_values(one_row_abduction(program, x), scm.abduct_noise(x))


def test_the_models_fold_slot_and_constant_operands() -> None:
    # Else the folded paths of the interpreters would go untested on the models.
    kinds = set().union(*(folded_operands(load_scm(*model).program) for model in MODELS))
    assert kinds == {STACKED, IN_SLOT, CONSTANT}


SPECIAL_VALUES = np.concatenate([EDGES, [-1e-300, 1e300, -1e300, 710.0, -745.0]])


@settings(max_examples=300, deadline=None)
@given(expressions, st.integers(0, 2**31 - 1))
def test_one_row_interpreter_gives_the_blocks_bits_on_random_expressions(
    expr: Expr, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    env = {
        name: np.concatenate([rng.normal(0, 2, 30), rng.permutation(SPECIAL_VALUES)])
        for name in NAMES
    }
    with np.errstate(all="ignore"):  # constant subtrees are folded by numpy, e.g. log(0)
        program, noise = expression_model(expr, **env)
        # a, b and c are set by an intervention now and then, to values of the same kinds.
        intervene = rng.random(noise.shape) < 0.2
        intervene[:, -1] = False
        values = rng.permutation(noise.ravel()).reshape(noise.shape)
        block = np.empty_like(noise)
        program.propagate(block, intervene, values, noise)
        assert_same_values(one_row_propagation(program, intervene, values, noise), block)
        # The inverse (noise = value - expr) runs expr again, on the computed rows.
        assert_same_values(one_row_abduction(program, block), block_abduction(program, block))


def test_random_expressions_fold_slot_and_constant_operands() -> None:
    # The strategy above makes both kinds of folded operands (a leaf on the right of an
    # operation), stacked ones, and the constant 0.5 exponent numpy takes as a square root.
    program, _ = expression_model("(a - 1) ** 0.5 * b - max(c, 2) / (a + b)")
    assert folded_operands(program) == {STACKED, IN_SLOT, CONSTANT}
