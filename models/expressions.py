"""Structural equations as data: a whitelisted expression language parsed with ``ast``.

An equation is a string such as ``"-4 + 1.5 * max(income, 0) + noise"``. It is parsed
into a small tree of :class:`Expr` nodes; nothing is ever passed to ``eval``. Allowed:
numbers, variable names, ``+ - * / **`` (the exponent a constant), unary minus, and the
functions in :data:`FUNCTIONS`. The tree is evaluated with numpy on whole batches
(:func:`evaluate`, the reference interpreter) and in interval arithmetic (for big-M
constants and bound propagation); :func:`check_invertible` says whether a symbol (the
noise) can be recovered by undoing the operations along its path. The causal model runs
its equations, and those inverses, compiled by :mod:`models.programs`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

ArrayLike = npt.NDArray[np.float64] | float
Interval = tuple[ArrayLike, ArrayLike]

FUNCTIONS: dict[str, tuple[int, int | None]] = {
    # name: (minimum arity, maximum arity or None for any)
    "max": (2, None),
    "min": (2, None),
    "abs": (1, 1),
    "indicator": (1, 1),  # 1 where the argument is >= 0, else 0
    "sigmoid": (1, 1),
    "exp": (1, 1),
    "log": (1, 1),
}


class ExpressionError(ValueError):
    """An equation string is outside the whitelisted language or cannot be used."""


@dataclass(frozen=True, eq=False)
class Expr:
    """Base of the expression tree. Nodes compare by identity (each is one term)."""


@dataclass(frozen=True, eq=False)
class Const(Expr):
    value: float


@dataclass(frozen=True, eq=False)
class Var(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class Neg(Expr):
    arg: Expr


@dataclass(frozen=True, eq=False)
class BinOp(Expr):
    op: str  # one of + - * / **
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]


_BINOPS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Pow: "**",
}


def parse_expression(text: str, *, where: str = "equation") -> Expr:
    """Parse ``text`` into an :class:`Expr`, refusing anything outside the whitelist.

    ``where`` names the field in error messages, e.g. ``"equation of 'income'"``.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(
            f"The {where} is not a valid expression: {text!r} ({exc.msg})."
        ) from None
    return _convert(tree.body, text, where)


def _convert(node: ast.AST, text: str, where: str) -> Expr:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise ExpressionError(f"The {where} may not use booleans. Got {text!r}.")
        return Const(float(node.value))
    if isinstance(node, ast.Name):
        return Var(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        arg = _convert(node.operand, text, where)
        return Neg(arg) if isinstance(node.op, ast.USub) else arg
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op = _BINOPS[type(node.op)]
        left, right = _convert(node.left, text, where), _convert(node.right, text, where)
        if op == "**" and not isinstance(right, Const):
            raise ExpressionError(
                f"The {where} raises to a non-constant power; exponents must be numbers. "
                f"Got {text!r}."
            )
        return BinOp(op, left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name not in FUNCTIONS:
            raise ExpressionError(
                f"The {where} calls {name!r}, which is not allowed; allowed functions are "
                f"{sorted(FUNCTIONS)}. Got {text!r}."
            )
        if node.keywords:
            raise ExpressionError(f"The {where} passes keyword arguments to {name!r}: {text!r}.")
        low, high = FUNCTIONS[name]
        if len(node.args) < low or (high is not None and len(node.args) > high):
            raise ExpressionError(
                f"The {where} calls {name!r} with {len(node.args)} arguments. Got {text!r}."
            )
        return Call(name, tuple(_convert(arg, text, where) for arg in node.args))
    raise ExpressionError(
        f"The {where} uses {type(node).__name__}, which is not allowed (numbers, names, "
        f"+ - * / **, and {sorted(FUNCTIONS)} only). Got {text!r}."
    )


def free_names(expr: Expr) -> set[str]:
    """Every variable name that appears in ``expr``."""
    if isinstance(expr, Var):
        return {expr.name}
    return set().union(*(free_names(child) for child in children(expr)))


def children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, Neg):
        return (expr.arg,)
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Call):
        return expr.args
    return ()


def count_name(expr: Expr, name: str) -> int:
    """How often ``name`` appears in ``expr``."""
    if isinstance(expr, Var):
        return int(expr.name == name)
    return sum(count_name(child, name) for child in children(expr))


def to_text(expr: Expr) -> str:
    """A readable, fully parenthesised rendering (round-trips through the parser)."""
    if isinstance(expr, Const):
        return repr(expr.value)
    if isinstance(expr, Var):
        return expr.name
    if isinstance(expr, Neg):
        return f"(-{to_text(expr.arg)})"
    if isinstance(expr, BinOp):
        return f"({to_text(expr.left)} {expr.op} {to_text(expr.right)})"
    assert isinstance(expr, Call)
    return f"{expr.func}({', '.join(to_text(arg) for arg in expr.args)})"


# ---------------------------------------------------------------------------------------
# Numeric evaluation (vectorized)


# Constants as 0-d arrays: a ufunc converts a Python float operand on every call.
_ZERO, _ONE, _MINUS_ONE = np.array(0.0), np.array(1.0), np.array(-1.0)


def sigmoid(x: ArrayLike) -> ArrayLike:
    # Written with exp of a non-positive number only, so it never overflows: 1 / (1 + e) for
    # x >= 0 and e / (1 + e) below, e = exp(-|x|). The numerator is max(e, x >= 0): 1 where
    # x >= 0 (e <= 1 there), else e (nan stays nan). The same bits as selecting it with
    # np.where, several times faster on many rows (no branch per element).
    x = np.asarray(x, dtype=float)
    e = np.exp(np.copysign(x, _MINUS_ONE))
    numerator = np.maximum(e, np.greater_equal(x, _ZERO))
    numerator /= np.add(_ONE, e)
    return np.asarray(numerator)


def logit(p: ArrayLike) -> ArrayLike:
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore"):
        return np.subtract(np.log(p), np.log1p(np.negative(p)))


_UNARY: dict[str, Callable[[ArrayLike], ArrayLike]] = {
    "abs": np.abs,
    "indicator": lambda x: np.greater_equal(x, _ZERO).astype(float),
    "sigmoid": sigmoid,
    "exp": np.exp,
    "log": np.log,
}


_OPERATORS: dict[str, Callable[[ArrayLike, ArrayLike], ArrayLike]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "**": np.power,
}
# max and min take any number of arguments, folded pairwise from the left.
_PAIRWISE: dict[str, Callable[[ArrayLike, ArrayLike], ArrayLike]] = {
    "max": np.maximum,
    "min": np.minimum,
}


def evaluate(expr: Expr, env: Mapping[str, ArrayLike]) -> ArrayLike:
    """Evaluate ``expr`` with numpy; every name must be in ``env`` (arrays broadcast).

    The reference interpreter, a tree walk. Constants stay Python floats, so a constant
    subexpression such as ``1 / 0`` raises :class:`ZeroDivisionError`. The causal model's
    compiled programs (:mod:`models.programs`) agree with it up to the last bits of the
    math functions (libm's there, numpy's own here), and give inf or nan where this raises.
    """
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Var):
        try:
            return env[expr.name]
        except KeyError:
            raise _missing_value(expr.name) from None
    if isinstance(expr, Neg):
        return -evaluate(expr.arg, env)
    if isinstance(expr, BinOp):
        return _OPERATORS[expr.op](evaluate(expr.left, env), evaluate(expr.right, env))
    assert isinstance(expr, Call)
    values = [evaluate(arg, env) for arg in expr.args]
    if expr.func in _PAIRWISE:
        return _reduce(_PAIRWISE[expr.func], values)
    return _UNARY[expr.func](values[0])


def _missing_value(name: str) -> ExpressionError:
    return ExpressionError(f"No value for {name!r} while evaluating an equation.")


def _reduce(
    func: Callable[[ArrayLike, ArrayLike], ArrayLike], values: list[ArrayLike]
) -> ArrayLike:
    result = values[0]
    for value in values[1:]:
        result = func(result, value)
    return result


# ---------------------------------------------------------------------------------------
# Interval arithmetic


def evaluate_interval(
    expr: Expr,
    env: Mapping[str, Interval],
    cache: dict[int, Interval] | None = None,
) -> Interval:
    """Bounds of ``expr`` over the box ``env`` (name -> (lower, upper)).

    Sound (never narrower than the true range) and exact for expressions in which each
    variable appears once. ``cache`` (keyed by ``id(node)``) receives every node's bounds,
    which the MILP formulation reads for its big-M constants.
    """
    result = _interval(expr, env, cache)
    if cache is not None:
        cache[id(expr)] = result
    return result


def _interval(
    expr: Expr, env: Mapping[str, Interval], cache: dict[int, Interval] | None
) -> Interval:
    def sub(node: Expr) -> Interval:
        return evaluate_interval(node, env, cache)

    if isinstance(expr, Const):
        return expr.value, expr.value
    if isinstance(expr, Var):
        try:
            return env[expr.name]
        except KeyError:
            raise ExpressionError(
                f"No bounds for {expr.name!r} while bounding an equation."
            ) from None
    if isinstance(expr, Neg):
        lo, hi = sub(expr.arg)
        return -hi, -lo
    if isinstance(expr, BinOp):
        (alo, ahi), (blo, bhi) = sub(expr.left), sub(expr.right)
        if expr.op == "+":
            return alo + blo, ahi + bhi
        if expr.op == "-":
            return alo - bhi, ahi - blo
        if expr.op == "*":
            return _hull_of_products(alo, ahi, blo, bhi)
        if expr.op == "/":
            if np.any((np.asarray(blo) <= 0) & (np.asarray(bhi) >= 0)):
                return -np.inf, np.inf
            return _hull_of_products(alo, ahi, 1.0 / np.asarray(bhi), 1.0 / np.asarray(blo))
        return _power_interval(alo, ahi, float(expr.right.value))  # type: ignore[attr-defined]
    assert isinstance(expr, Call)
    bounds = [sub(arg) for arg in expr.args]
    if expr.func in ("max", "min"):
        func = np.maximum if expr.func == "max" else np.minimum
        return (
            _reduce(func, [lo for lo, _ in bounds]),
            _reduce(func, [hi for _, hi in bounds]),
        )
    lo, hi = bounds[0]
    if expr.func == "abs":
        lo_a, hi_a = np.abs(lo), np.abs(hi)
        straddles = (np.asarray(lo) < 0) & (np.asarray(hi) > 0)
        return np.where(straddles, 0.0, np.minimum(lo_a, hi_a)), np.maximum(lo_a, hi_a)
    # indicator, sigmoid, exp and log are non-decreasing.
    func = _UNARY[expr.func]
    with np.errstate(divide="ignore", invalid="ignore"):
        return func(lo), func(hi)


def _hull_of_products(alo: ArrayLike, ahi: ArrayLike, blo: ArrayLike, bhi: ArrayLike) -> Interval:
    if not any(isinstance(v, np.ndarray) for v in (alo, ahi, blo, bhi)):
        # One person's bounds: plain floats are much faster than numpy here.
        products = [
            0.0 if (a == 0 or b == 0) else float(a) * float(b)
            for a in (alo, ahi)
            for b in (blo, bhi)
        ]
        return min(products), max(products)
    with np.errstate(invalid="ignore"):
        products = np.stack(np.broadcast_arrays(alo * blo, alo * bhi, ahi * blo, ahi * bhi))
    # 0 * inf is nan; it stands for a zero factor, so the product is 0.
    products = np.nan_to_num(products, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return products.min(axis=0), products.max(axis=0)


def _power_interval(lo: ArrayLike, hi: ArrayLike, exponent: float) -> Interval:
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        plo, phi = np.power(lo, exponent), np.power(hi, exponent)
    if float(exponent).is_integer() and int(exponent) % 2 == 0:
        straddles = (lo < 0) & (hi > 0)
        low = np.where(straddles, 0.0, np.minimum(plo, phi))
        return low, np.maximum(plo, phi)
    return np.minimum(plo, phi), np.maximum(plo, phi)


# ---------------------------------------------------------------------------------------
# Inversion along the path to one symbol (abduction)


def check_invertible(expr: Expr, symbol: str, *, where: str) -> None:
    """Raise unless ``symbol`` appears exactly once, below invertible operations only."""
    count = count_name(expr, symbol)
    if count != 1:
        raise ExpressionError(
            f"The {where} must contain {symbol!r} exactly once so that it can be recovered "
            f"by abduction. It appears {count} times in {to_text(expr)!r}."
        )
    node = expr
    while not isinstance(node, Var):
        if isinstance(node, Call) and node.func not in ("sigmoid", "exp", "log"):
            raise ExpressionError(
                f"The {where} puts {symbol!r} inside {node.func}(), which cannot be inverted; "
                f"move it outside, for example as an additive term."
            )
        node = next(child for child in children(node) if count_name(child, symbol))
