"""Structural equations compiled to flat stack programs, run by numba.

A causal model's numerics (generating, abducting noise, propagating an intervention)
apply a handful of scalar operations per variable. With numpy, each is a call with a
fixed cost of about a microsecond: on the few rows of one person's checks, that overhead
is nearly all the time. Here every equation becomes a short program of opcodes over
slots (slot k: variable k; slot ``num_features + k``: its noise), and one jitted call
runs the whole model: over a block of rows at a time, one opcode over the whole block
(:func:`run_program`), or over one row (:func:`run_scalar`, for the compiled searches).

The programs are built from the whitelisted :class:`~models.expressions.Expr` trees,
never from text; the interpreter knows only the opcodes below. Its arithmetic follows
numpy's (inf and nan instead of exceptions; ``max``/``min`` propagate nan), so values
agree with :func:`~models.expressions.evaluate` to the last bits of the math library,
and the two interpreters agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from models.expressions import (
    BinOp,
    Call,
    Const,
    Expr,
    ExpressionError,
    Neg,
    Var,
    count_name,
    evaluate,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Opcodes. SLOT pushes slots[arg], CONST pushes const; unary ones replace the top of the
# stack, binary ones replace a (the top) with ``a op b``, where b is popped from the stack
# above it (operand STACKED), or read from slots[arg] (IN_SLOT) or const (CONSTANT): a
# slot or constant right operand is folded into its operation, which halves the count.
SLOT, CONST = 0, 1
NEG, ABS, INDICATOR, SIGMOID, EXP, LOG, LOG_ODDS, SIGNED_ROOT = 2, 3, 4, 5, 6, 7, 8, 9
ADD, SUB, MUL, DIV, POW, MAX, MIN, REVERSED_SUB, REVERSED_DIV = 10, 11, 12, 13, 14, 15, 16, 17, 18
# SIGNED_ROOT (abduction through ``**``): sign(v) * |v| ** const. LOG_ODDS undoes sigmoid.
# REVERSED_SUB and REVERSED_DIV compute ``b - a`` and ``b / a`` (abduction, where the value
# on the path sits below the other operand).

STACKED, IN_SLOT, CONSTANT = 0, 1, 2

_BINARY = {"+": ADD, "-": SUB, "*": MUL, "/": DIV, "**": POW}
_CALLS = {"abs": ABS, "indicator": INDICATOR, "sigmoid": SIGMOID, "exp": EXP, "log": LOG}
_PAIRWISE = {"max": MAX, "min": MIN}
# (operator, path in the left operand) -> the op applied to (value, other) on the stack.
_UNDO = {
    ("+", True): SUB,
    ("+", False): SUB,
    ("-", True): ADD,
    ("-", False): REVERSED_SUB,
    ("*", True): DIV,
    ("*", False): DIV,
    ("/", True): MUL,
    ("/", False): REVERSED_DIV,
}
_UNDO_CALL = {"sigmoid": LOG_ODDS, "exp": LOG, "log": EXP}


@dataclass(frozen=True, eq=False)
class ModelProgram:
    """Every variable's equation, and its inverse for the noise, as one opcode table.

    Variable j's equation is rows ``value_start[j]:value_start[j + 1]`` of ``ops``,
    ``args`` and ``consts``; its inverse (the noise from the variable and its parents)
    rows ``noise_start[j]:noise_start[j + 1]``, empty where the noise is the value itself.
    """

    ops: IntArray
    operands: IntArray
    """Where a binary operation's right operand is (STACKED, IN_SLOT or CONSTANT)."""
    args: IntArray
    consts: FloatArray
    value_start: IntArray
    noise_start: IntArray
    depth: int
    """The deepest stack any of the programs needs."""

    @classmethod
    def build(
        cls, equations: list[Expr], parents: list[dict[str, int]], noise_name: str
    ) -> ModelProgram:
        """``equations[j]`` reads its parents' slots ``parents[j]`` and the noise symbol
        ``noise_name`` (slot ``len(equations) + j``)."""
        emitter = _Emitter()
        value_start, noise_start = [0], []
        for j, equation in enumerate(equations):
            emitter.value(equation, parents[j] | {noise_name: len(equations) + j})
            value_start.append(len(emitter.ops))
        noise_start.append(len(emitter.ops))
        for j, equation in enumerate(equations):
            if not isinstance(equation, Var):
                emitter.inverse(equation, noise_name, j, parents[j])
            noise_start.append(len(emitter.ops))
        return cls(
            np.array(emitter.ops, np.int64),
            np.array(emitter.operands, np.int64),
            np.array(emitter.args, np.int64),
            np.array(emitter.consts, float),
            np.array(value_start, np.int64),
            np.array(noise_start, np.int64),
            max(emitter.depth, 1),
        )

    @property
    def value_code(self) -> tuple[IntArray, IntArray, IntArray, FloatArray, IntArray]:
        """What :func:`propagate_one` reads: the code and where each equation starts."""
        return self.ops, self.operands, self.args, self.consts, self.value_start

    def propagate(
        self, x: FloatArray, intervene: BoolArray, values: FloatArray, noise: FloatArray
    ) -> None:
        """Fill ``x`` in place: each variable set by ``intervene`` takes ``values``, the
        others their equations from their parents in ``x`` and ``noise`` (all C-ordered,
        same shape)."""
        _propagate(self.ops, self.operands, self.args, self.consts, self.value_start,
                   self.depth, x, intervene, values, noise)  # fmt: skip

    def abduct(self, noise: FloatArray, x: FloatArray) -> None:
        """Fill ``noise`` where an equation is inverted (elsewhere it is left as given)."""
        _abduct(self.ops, self.operands, self.args, self.consts, self.noise_start, self.depth,
                noise, x)  # fmt: skip


class _Emitter:
    """Appends programs to one table, tracking the stack's depth."""

    def __init__(self) -> None:
        self.ops: list[int] = []
        self.operands: list[int] = []
        self.args: list[int] = []
        self.consts: list[float] = []
        self.depth = 0
        self._height = 0

    def _emit(self, op: int, *, arg: int = 0, const: float = 0.0, pushes: int = 0) -> None:
        self.ops.append(op)
        self.operands.append(STACKED)
        self.args.append(arg)
        self.consts.append(const)
        self._height += pushes
        self.depth = max(self.depth, self._height)

    def value(self, expr: Expr, slots: dict[str, int]) -> None:
        """A program that computes ``expr``."""
        self._height = 0
        self._push(expr, slots)

    def _push(self, expr: Expr, slots: dict[str, int]) -> None:
        """Code that pushes the value of ``expr``."""
        if reads_names(expr):
            self._tree(expr, slots)
            return
        try:  # constants folded by numpy itself: the same value as evaluate()
            value = float(evaluate(expr, {}))
        except ArithmeticError:  # e.g. 1 / 0 in Python floats: left to the interpreter (inf)
            self._tree(expr, slots)
            return
        self._emit(CONST, const=value, pushes=1)

    def _binary(self, op: int, right_start: int) -> None:
        """The binary ``op`` whose right operand's code starts at ``right_start``: folded
        into it when that code is a single SLOT or CONST."""
        if len(self.ops) - right_start == 1 and self.ops[-1] in (SLOT, CONST):
            self.operands[-1] = IN_SLOT if self.ops[-1] == SLOT else CONSTANT
            self.ops[-1] = op
            self._height -= 1
            return
        self._emit(op, pushes=-1)

    def _tree(self, expr: Expr, slots: dict[str, int]) -> None:
        if isinstance(expr, Const):
            self._emit(CONST, const=expr.value, pushes=1)
        elif isinstance(expr, Var):
            if expr.name not in slots:
                raise ExpressionError(f"No value for {expr.name!r} while evaluating an equation.")
            self._emit(SLOT, arg=slots[expr.name], pushes=1)
        elif isinstance(expr, Neg):
            self._push(expr.arg, slots)
            self._emit(NEG)
        elif isinstance(expr, BinOp):
            self._push(expr.left, slots)
            right_start = len(self.ops)
            self._push(expr.right, slots)
            self._binary(_BINARY[expr.op], right_start)
        else:
            assert isinstance(expr, Call)
            self._push(expr.args[0], slots)
            if expr.func in _PAIRWISE:
                for arg in expr.args[1:]:  # folded pairwise from the left
                    right_start = len(self.ops)
                    self._push(arg, slots)
                    self._binary(_PAIRWISE[expr.func], right_start)
            else:
                self._emit(_CALLS[expr.func])

    def inverse(self, expr: Expr, symbol: str, column: int, slots: dict[str, int]) -> None:
        """A program that computes the value of ``symbol`` (it appears once in ``expr``,
        below invertible operations) for which ``expr`` equals variable ``column``: the
        operations undone from the root down."""
        self._height = 0
        self._emit(SLOT, arg=column, pushes=1)
        node = expr
        while not isinstance(node, Var):
            if isinstance(node, Neg):
                self._emit(NEG)
                node = node.arg
            elif isinstance(node, BinOp):
                in_left = count_name(node.left, symbol) > 0
                path, side = (node.left, node.right) if in_left else (node.right, node.left)
                if node.op == "**":  # the exponent is a constant, so the path is the base
                    self._emit(SIGNED_ROOT, const=1.0 / side.value)  # type: ignore[attr-defined]
                else:
                    right_start = len(self.ops)
                    self._push(side, slots)
                    self._binary(_UNDO[node.op, in_left], right_start)
                node = path
            else:
                assert isinstance(node, Call)
                self._emit(_UNDO_CALL[node.func])
                node = node.args[0]


def reads_names(expr: Expr) -> bool:
    """Whether ``expr`` reads a variable (else it is a constant, to fold)."""
    if isinstance(expr, Var):
        return True
    if isinstance(expr, Const):
        return False
    if isinstance(expr, Neg):
        return reads_names(expr.arg)
    if isinstance(expr, BinOp):
        return reads_names(expr.left) or reads_names(expr.right)
    assert isinstance(expr, Call)
    return any(reads_names(arg) for arg in expr.args)


# ---------------------------------------------------------------------------------------
# The interpreter. It runs a program over a block of rows at a time, one opcode over the
# whole block: the dispatch is paid once per block and the loops vectorize.
# error_model="numpy": division by zero gives inf or nan, as in numpy.

_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}
BLOCK = 128
"""Rows per block: the slots and stack (a few KiB a row of the program) stay in L1."""


@numba.njit(**_JIT)
def run_program(ops, operands, args, consts, begin, end, slots, stack, m):
    """Rows ``begin:end`` of the program over the first ``m`` columns of ``slots`` (one row
    per slot); the values are left in ``stack[0, :m]``."""
    top = -1
    for i in range(begin, end):
        op = ops[i]
        if op == SLOT:
            top += 1
            stack[top, :m] = slots[args[i], :m]
        elif op == CONST:
            top += 1
            stack[top, :m] = consts[i]
        elif op < ADD:
            _unary(op, stack[top, :m], consts[i])
        elif operands[i] == STACKED:
            top -= 1
            _binary(op, stack[top, :m], stack[top + 1, :m])
        elif operands[i] == IN_SLOT:
            _binary(op, stack[top, :m], slots[args[i], :m])
        else:  # the stack has room above the top: the operand was pushed there unfolded
            stack[top + 1, :m] = consts[i]
            _binary(op, stack[top, :m], stack[top + 1, :m])


@numba.njit(**_JIT)
def run_scalar(ops, operands, args, consts, begin, end, slots, stack):
    """:func:`run_program` for a single row: ``slots`` and ``stack`` are vectors. No loop
    over rows per operation, which on one row costs more than the arithmetic."""
    top = -1
    for i in range(begin, end):
        op = ops[i]
        if op == SLOT:
            top += 1
            stack[top] = slots[args[i]]
        elif op == CONST:
            top += 1
            stack[top] = consts[i]
        elif op < ADD:
            stack[top] = _unary_scalar(op, stack[top], consts[i])
        else:
            kind = operands[i]
            if kind == STACKED:
                top -= 1
                b = stack[top + 1]
            elif kind == IN_SLOT:
                b = slots[args[i]]
            else:
                b = consts[i]
            stack[top] = _binary_scalar(op, stack[top], b)
    return stack[0]


@numba.njit(inline="always", **_JIT)
def _unary_scalar(op, v, const):
    if op == NEG:
        return -v
    if op == ABS:
        return abs(v)
    if op == INDICATOR:
        return 1.0 if v >= 0.0 else 0.0
    if op == SIGMOID:
        e = np.exp(-abs(v))
        return (1.0 if v >= 0.0 else e) / (1.0 + e)
    if op == EXP:
        return np.exp(v)
    if op == LOG:
        return np.log(v)
    if op == LOG_ODDS:
        return np.log(v) - np.log1p(-v)
    return np.sign(v) * np.abs(v) ** const  # SIGNED_ROOT


@numba.njit(inline="always", **_JIT)
def _binary_scalar(op, a, b):
    if op == ADD:
        return a + b
    if op == SUB:
        return a - b
    if op == MUL:
        return a * b
    if op == DIV:
        return a / b
    if op == POW:  # as in _binary
        return np.sqrt(a) if b == 0.5 else a**b
    if op == REVERSED_SUB:
        return b - a
    if op == REVERSED_DIV:
        return b / a
    if op == MAX:  # as in _binary: numpy's max and min
        return a if a > b or a != a else b
    return a if a < b or a != a else b


@numba.njit(**_JIT)
def _unary(op, v, const):
    """``v`` replaced by ``op`` of it."""
    if op == NEG:
        for r in range(len(v)):
            v[r] = -v[r]
    elif op == ABS:
        for r in range(len(v)):
            v[r] = abs(v[r])
    elif op == INDICATOR:
        for r in range(len(v)):
            v[r] = 1.0 if v[r] >= 0.0 else 0.0
    elif op == SIGMOID:
        # numpy's form (see models.expressions.sigmoid): exp of a non-positive number only.
        for r in range(len(v)):
            e = np.exp(-abs(v[r]))
            v[r] = (1.0 if v[r] >= 0.0 else e) / (1.0 + e)
    elif op == EXP:
        for r in range(len(v)):
            v[r] = np.exp(v[r])
    elif op == LOG:
        for r in range(len(v)):
            v[r] = np.log(v[r])
    elif op == LOG_ODDS:
        for r in range(len(v)):
            v[r] = np.log(v[r]) - np.log1p(-v[r])
    else:  # SIGNED_ROOT
        for r in range(len(v)):
            v[r] = np.sign(v[r]) * np.abs(v[r]) ** const


@numba.njit(**_JIT)
def _binary(op, a, b):
    """``a`` replaced by ``a op b``."""
    if op == ADD:
        for r in range(len(a)):
            a[r] += b[r]
    elif op == SUB:
        for r in range(len(a)):
            a[r] -= b[r]
    elif op == MUL:
        for r in range(len(a)):
            a[r] *= b[r]
    elif op == DIV:
        for r in range(len(a)):
            a[r] /= b[r]
    elif op == POW:  # numpy takes the square root for ** 0.5: (-inf) ** 0.5 is nan, not inf
        for r in range(len(a)):
            a[r] = np.sqrt(a[r]) if b[r] == 0.5 else a[r] ** b[r]
    elif op == REVERSED_SUB:
        for r in range(len(a)):
            a[r] = b[r] - a[r]
    elif op == REVERSED_DIV:
        for r in range(len(a)):
            a[r] = b[r] / a[r]
    elif op == MAX:  # as numpy's: nan propagates; of equal values (0.0, -0.0), b is taken
        for r in range(len(a)):
            a[r] = a[r] if a[r] > b[r] or a[r] != a[r] else b[r]
    else:  # MIN, as MAX
        for r in range(len(a)):
            a[r] = a[r] if a[r] < b[r] or a[r] != a[r] else b[r]


@numba.njit(**_JIT)
def _propagate(ops, operands, args, consts, value_start, depth, x, intervene, values, noise):
    n, f = x.shape
    # Checked, as numba does not check indices: a row of another width would read (and
    # write) outside the arrays.
    if f != len(value_start) - 1 or (
        intervene.shape != x.shape or values.shape != x.shape or noise.shape != x.shape
    ):
        raise ValueError(
            "The rows, interventions, values and noise must have the same shape, with one "
            "column per variable of the model."
        )
    slots = np.empty((2 * f, BLOCK))
    stack = np.empty((depth, BLOCK))
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        for r in range(m):
            slots[f:, r] = noise[start + r]
        for j in range(f):
            run_program(ops, operands, args, consts, value_start[j], value_start[j + 1], slots,
                        stack, m)  # fmt: skip
            for r in range(m):
                slots[j, r] = values[start + r, j] if intervene[start + r, j] else stack[0, r]
        for r in range(m):
            x[start + r] = slots[:f, r]


@numba.njit(**_JIT)
def _abduct(ops, operands, args, consts, noise_start, depth, noise, x):
    n, f = x.shape
    if f != len(noise_start) - 1 or noise.shape != x.shape:  # as in _propagate
        raise ValueError(
            "The rows and the noise must have the same shape, with one column per variable "
            "of the model."
        )
    slots = np.empty((f, BLOCK))
    stack = np.empty((depth, BLOCK))
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        for r in range(m):
            slots[:, r] = x[start + r]
        for j in range(f):
            if noise_start[j + 1] > noise_start[j]:
                run_program(ops, operands, args, consts, noise_start[j], noise_start[j + 1], slots,
                            stack, m)  # fmt: skip
                noise[start : start + m, j] = stack[0, :m]


@numba.njit(**_JIT)
def propagate_one(value_code, slots, stack, intervene, values):
    """One row's counterfactual, in the first half of ``slots`` (its noise half given;
    ``stack`` as in :func:`run_scalar`): the search kernels' evaluation. ``value_code``:
    :attr:`ModelProgram.value_code`."""
    ops, operands, args, consts, value_start = value_code
    for j in range(len(value_start) - 1):
        if intervene[j]:
            slots[j] = values[j]
        else:
            slots[j] = run_scalar(ops, operands, args, consts, value_start[j],
                                  value_start[j + 1], slots, stack)  # fmt: skip
