"""The recourse MILP: built once per (causal model, classifier, cost profile), filled per person.

Notation: x^F the person's factual row, u the abducted noise, R the features an action can
reach (actionable features and their descendants), A the actionable ones. Per person, the
intervals of every quantity over the values an action can produce are computed by interval
arithmetic (:meth:`RecourseFormulation.context`); they supply every big-M constant, so no
global constant appears.

Columns: ``x'_j`` (j in R) the counterfactual value; ``m_k`` (k in A) binary, act on k;
``c_k`` >= 0 the cost of k; ``v_k`` >= 0 the excess over a soft limit; auxiliary columns of
the linearized equations; per hidden neuron of a ReLU classifier ``a`` >= 0 and binary ``s``.
Features outside R keep their factual value and enter as constants.

Rows, with ``n_j = g_j(x'_parents) + u_j`` the value j's equation gives:

- causal model, j in R not actionable: ``x'_j = n_j``;
- k in A: ``-M_dn m_k <= x'_k - n_k <= M_up m_k`` (m_k = 0: k follows its parents; m_k = 1:
  the hard intervention do(x_k := x'_k)), and the person's range for a value they set,
  ``lo_k - M (1 - m_k) <= x'_k <= hi_k + M (1 - m_k)`` (bounds, direction, and the incumbent
  box below); a locked k has ``m_k = 0``;
- ``g_j`` linearized exactly for sums, products with a factor no action can change (a
  per-person coefficient), max / min / abs / indicator (one binary each, big-M from the
  intervals; a max / min of an actionable feature also gets two cuts tying its binary to
  that feature's ``m_k`` where the intervals decide the choice), and by piecewise-linear
  interpolation (incremental formulation, ``breakpoints``
  segments over the argument's interval) for sigmoid / exp / log / powers of reachable terms;
- classifier, on standardized inputs (standardization folded into the coefficients):
  logistic regression ``w.x' + b >= logit(threshold) + margin``; a ReLU MLP neuron
  ``z = W a_prev + b``, ``a = max(z, 0)`` with bounds [l, u] of z:
  ``a >= z, a <= z - l (1 - s), a <= u s`` (Tjeng, Xiao and Tedrake, 2019); a neuron with
  u <= 0 or l >= 0 is fixed by its bounds (the solver's presolve removes it). The bounds
  (DeepPoly back-substitution over the person's box and cost budget) need only hold for
  counterfactuals the classifier accepts: outside [l, u] this encoding has no feasible
  point, inside it is exact, so cutting the box by the half-space where the logit's
  linear upper bound reaches the threshold (``Classifier.preactivation_bounds_affine``)
  keeps every accepted counterfactual and leaves far fewer neurons unstable;
- cost, with ``delta_k = x'_k - x^F_k``, ``W`` a big-M: L1 ``c_k >= +-a_k delta_k - W (1 -
  m_k)``; squared (carma) tangent cuts ``c_k >= a_k (2 t delta_k - t^2) - W (1 - m_k)`` at
  ``tangents`` points t spread over delta_k's range (an outer approximation: the engine
  adds cuts at the solution and reports the remaining gap); soft limits
  ``v_k >= +-delta_k - limit_k - W (1 - m_k)``; at most ``max_changes`` actions:
  ``sum m_k <= K``;
- a categorical feature's one-hot levels that an action can reach: ``sum_l x'_l = 1``.

Objective: ``sum_k c_k + sparsity * sum_k m_k + sum_k penalty_k v_k``.

Incumbent box: when an action of cost C0 is known, any cheaper action changes each feature
by at most the |delta| whose cost alone is C0. Shrinking the intervention ranges to that box
tightens every interval, so fewer neurons are unstable and big-M constants are smaller.

The matrix's sparsity pattern is the same for every person; only bounds, right-hand sides,
objective coefficients and coefficient values change (:class:`MILPTemplate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from models.classifiers import Classifier
from models.costs import CostProfile
from models.expressions import (
    BinOp,
    Call,
    Expr,
    Interval,
    Neg,
    Var,
    children,
    evaluate_interval,
    free_names,
    sigmoid,
    to_text,
)
from models.preferences import PersonConstraints
from models.scm import NOISE, Role, StructuralCausalModel, VariableType
from solver.milp import FloatArray, NumericMILP

INF = np.inf
# Slack added to interval-derived bounds and big-M constants so that rounding in the
# interval arithmetic never cuts off a feasible point. The absolute part stays above
# 1e-9: HiGHS drops matrix entries at or below that (small_matrix_value), and a dropped
# big-M of a feature fixed by a lock made it report its own optimum as a solve error.
_PAD_REL, _PAD_ABS = 1e-9, 1e-8


class FormulationError(ValueError):
    """The causal model or classifier cannot be written as this MILP; says which term."""


@dataclass
class PersonContext:
    """Everything about one person that the MILP's numbers depend on."""

    x: FloatArray
    noise: FloatArray
    constraints: PersonConstraints
    intervention: dict[str, tuple[float, float]]
    """The range of a value this person may set, per feature they may act on."""
    box: dict[str, tuple[float, float]]
    """Interval of every feature's counterfactual value (a point outside R)."""
    natural: dict[str, tuple[float, float]]
    """Interval of n_j, the value feature j's equation gives, for j in R."""
    nodes: dict[int, Interval]
    neuron_bounds: list[tuple[FloatArray, FloatArray]]
    cost_budget: float | None
    margin: float
    """Validity margin in logit units for this solve."""
    cost_coefficients: dict[str, float] = field(default_factory=dict)
    """a_k of the cost profile with this person's weight, per actionable feature."""
    tangent_points: dict[str, FloatArray] = field(default_factory=dict)
    forced: frozenset[str] = frozenset()
    """Features this solve acts on for sure (m_k = 1): the engine's mask decomposition."""

    def point(self, node: Expr) -> float:
        return float(self.nodes[id(node)][0])

    def interval(self, node: Expr) -> tuple[float, float]:
        lo, hi = self.nodes[id(node)]
        return float(lo), float(hi)


Param = Callable[[PersonContext], float]
Coef = float | Param


def _value(coef: Coef, ctx: PersonContext) -> float:
    return coef if isinstance(coef, float | int) else coef(ctx)


def _add(a: Coef, b: Coef) -> Coef:
    # A constant side is bound as a number: these closures run once per person and
    # coefficient, and nest as deep as the expressions they come from.
    if isinstance(a, float | int):
        if isinstance(b, float | int):
            return float(a + b)
        return lambda ctx: a + b(ctx)
    if isinstance(b, float | int):
        return lambda ctx: a(ctx) + b
    return lambda ctx: a(ctx) + b(ctx)


def _mul(a: Coef, b: Coef) -> Coef:
    if isinstance(a, float | int):
        if isinstance(b, float | int):
            return float(a * b)
        return lambda ctx: a * b(ctx)
    if isinstance(b, float | int):
        return lambda ctx: a(ctx) * b
    return lambda ctx: a(ctx) * b(ctx)


def _pad(m: float) -> float:
    """A big-M constant: never negative, a hair larger than the interval says."""
    return (m if m > 0.0 else 0.0) * (1 + _PAD_REL) + _PAD_ABS


def _finite(v: FloatArray) -> FloatArray:
    return np.where(np.isfinite(v), v, 0.0)


def _widen_low(v: float) -> float:
    return v - _PAD_REL * abs(v) - _PAD_ABS


def _widen_high(v: float) -> float:
    return v + _PAD_REL * abs(v) + _PAD_ABS


@dataclass
class LinearForm:
    """``const + sum_j coef_j * column_j`` with per-person coefficients."""

    terms: dict[int, Coef] = field(default_factory=dict)
    const: Coef = 0.0

    def scaled(self, factor: Coef) -> LinearForm:
        return LinearForm(
            {c: _mul(v, factor) for c, v in self.terms.items()}, _mul(self.const, factor)
        )

    def plus(self, other: LinearForm) -> LinearForm:
        terms = dict(self.terms)
        for col, coef in other.terms.items():
            terms[col] = _add(terms[col], coef) if col in terms else coef
        return LinearForm(terms, _add(self.const, other.const))


class MILPTemplate:
    """Columns and rows whose numbers are constants or functions of a :class:`PersonContext`."""

    def __init__(self) -> None:
        self.col_names: list[str] = []
        self._col_lower: list[Coef] = []
        self._col_upper: list[Coef] = []
        self._col_cost: list[Coef] = []
        self._col_integer: list[bool] = []
        self.row_names: list[str] = []
        self._rows: list[list[tuple[int, Coef]]] = []
        self._row_lower: list[Coef] = []
        self._row_upper: list[Coef] = []
        self._frozen = False

    def add_col(
        self, name: str, lower: Coef, upper: Coef, cost: Coef = 0.0, integer: bool = False
    ) -> int:
        self.col_names.append(name)
        self._col_lower.append(lower)
        self._col_upper.append(upper)
        self._col_cost.append(cost)
        self._col_integer.append(integer)
        return len(self.col_names) - 1

    def add_row(self, name: str, entries: Mapping[int, Coef], lower: Coef, upper: Coef) -> int:
        self.row_names.append(name)
        self._rows.append(list(entries.items()))
        self._row_lower.append(lower)
        self._row_upper.append(upper)
        return len(self.row_names) - 1

    def add_linear_row(
        self, name: str, form: LinearForm, extra: Mapping[int, Coef], lower: Coef, upper: Coef
    ) -> int:
        """``lower <= form + extra <= upper``, the form's constant moved to the bounds."""
        entries = dict(form.terms)
        for col, coef in extra.items():
            entries[col] = _add(entries[col], coef) if col in entries else coef
        neg_const = _mul(form.const, -1.0)
        lo = lower if lower == -INF else _add(lower, neg_const)
        hi = upper if upper == INF else _add(upper, neg_const)
        return self.add_row(name, entries, lo, hi)

    def freeze(self) -> None:
        """Fix the pattern: split constants from per-person parameters once."""
        self._frozen = True
        self._pattern_key = (len(self.col_names), len(self.row_names), id(self))

        def split(coefs: list[Coef]) -> tuple[FloatArray, list[tuple[int, Param]]]:
            base = np.array([c if isinstance(c, float | int) else np.nan for c in coefs], float)
            params = [(i, c) for i, c in enumerate(coefs) if not isinstance(c, float | int)]
            return base, params

        self._arrays = {
            "col_lower": split(self._col_lower),
            "col_upper": split(self._col_upper),
            "objective": split(self._col_cost),
            "row_lower": split(self._row_lower),
            "row_upper": split(self._row_upper),
        }
        flat = [entry for row in self._rows for entry in row]
        self._row_start = np.cumsum([0] + [len(row) for row in self._rows]).astype(np.int64)
        self._col_index = np.array([col for col, _ in flat], dtype=np.int64)
        self._arrays["values"] = split([coef for _, coef in flat])
        self._integer = np.array(self._col_integer, dtype=bool)

    def instantiate(self, ctx: PersonContext) -> NumericMILP:
        """The numeric program for one person."""
        if not self._frozen:
            self.freeze()
        filled = {}
        for key, (base, params) in self._arrays.items():
            array = base.copy()
            for position, param in params:
                array[position] = param(ctx)
            filled[key] = array
        return NumericMILP(
            col_names=tuple(self.col_names),
            col_lower=filled["col_lower"],
            col_upper=filled["col_upper"],
            objective=filled["objective"],
            integer=self._integer,
            row_names=tuple(self.row_names),
            row_lower=filled["row_lower"],
            row_upper=filled["row_upper"],
            row_start=self._row_start,
            col_index=self._col_index,
            values=filled["values"],
            pattern_key=self._pattern_key,
        )


@dataclass(frozen=True)
class ApproximatedTerm:
    """A smooth non-linear term of a reachable feature, replaced by interpolation."""

    owner: str
    node: Expr
    func: Callable[[FloatArray], FloatArray]


class RecourseFormulation:
    """The recourse MILP for one causal model, classifier and cost profile (see module doc).

    Parameters
    ----------
    margin:
        Validity margin in logit units: the MILP asks for ``logit >= logit(threshold) +
        margin`` so that solver tolerances never produce an answer just below the threshold.
    tangents:
        Tangent cuts per feature for the squared (carma) cost.
    breakpoints:
        Segments of each piecewise-linear interpolation.
    """

    def __init__(
        self,
        scm: StructuralCausalModel,
        classifier: Classifier,
        cost: CostProfile,
        *,
        margin: float = 1e-4,
        tangents: int = 9,
        breakpoints: int = 16,
    ) -> None:
        classifier.check_features(scm.names)
        if margin < 0:
            raise ValueError(f"The validity 'margin' must be >= 0. Got {margin} instead.")
        self.scm, self.classifier, self.cost = scm, classifier, cost
        self.margin, self.tangents, self.breakpoints = margin, tangents, breakpoints
        self.actionable = scm.actionable
        self.reachable = [n for n in scm.names if n in scm.descendants(self.actionable)]
        self.approximated: list[ApproximatedTerm] = []
        # Equations of non-actionable features that are affine in counterfactual values:
        # the classifier's bounds keep these features tied to their parents.
        self._affine_equations: dict[str, LinearForm] = {}
        # Nodes the linearization creates that are not in any equation's tree (folded
        # n-ary max/min pairs, the -a inside abs(a)); their intervals come from their parts.
        self._intermediates: list[tuple[Expr, Expr, Expr, str]] = []
        self._negations: list[Neg] = []
        self.template = MILPTemplate()
        self._build()
        self.template.freeze()
        # The coordinates y of the classifier bounds' input map (see _neuron_bounds), their
        # columns in x, and which of them no action reaches but by acting on them.
        self._free = [n for n in self.reachable if n not in self._affine_equations]
        self._free_columns = np.array([scm.index[n] for n in self._free], dtype=np.int64)
        reachable = set(self.reachable)
        self._free_roots = np.array(
            [
                n in self.actionable and not set(scm.variables[scm.index[n]].parents) & reachable
                for n in self._free
            ],
            dtype=bool,
        )

    # -- per model ---------------------------------------------------------------------

    def _build(self) -> None:
        t = self.template
        scm = self.scm
        self.x_col: dict[str, int] = {}
        for name in self.reachable:
            var = scm.variables[scm.index[name]]
            integer = var.type is not VariableType.CONTINUOUS
            self.x_col[name] = t.add_col(
                f"x[{name}]",
                lambda ctx, n=name: _widen_low(ctx.box[n][0]),
                lambda ctx, n=name: _widen_high(ctx.box[n][1]),
                integer=integer,
            )
        self.m_col = {
            k: t.add_col(
                f"act[{k}]",
                lambda ctx, k=k: 1.0 if k in ctx.forced else 0.0,
                lambda ctx, k=k: 1.0 if k in ctx.intervention else 0.0,
                cost=self.cost.sparsity,
                integer=True,
            )
            for k in self.actionable
        }
        self.c_col = {k: t.add_col(f"cost[{k}]", 0.0, INF, cost=1.0) for k in self.actionable}
        self.v_col = {
            k: t.add_col(
                f"excess[{k}]",
                0.0,
                lambda ctx, k=k: INF if k in ctx.constraints.soft_limits else 0.0,
                cost=lambda ctx, k=k: (
                    ctx.constraints.soft_limits[k].penalty
                    if k in ctx.constraints.soft_limits
                    else 0.0
                ),
            )
            for k in self.actionable
        }
        for name in self.reachable:
            self._add_structural_rows(name)
        for feature, levels in self.scm.one_hot.items():
            if levels[0] in self.x_col:  # levels share a role: all reachable or none
                t.add_row(f"one_hot[{feature}]", {self.x_col[n]: 1.0 for n in levels}, 1.0, 1.0)
        for k in self.actionable:
            self._add_cost_rows(k)
        t.add_row(
            "max_changes",
            {self.m_col[k]: 1.0 for k in self.actionable},
            -INF,
            lambda ctx: (
                INF if ctx.constraints.max_changes is None else float(ctx.constraints.max_changes)
            ),
        )
        # The objective is at most the cost of a known action (the budget): redundant for
        # the MILP, but the LP relaxation then spends one budget over all features instead
        # of granting each feature its own.
        objective: dict[int, Coef] = {self.c_col[k]: 1.0 for k in self.actionable}
        if self.cost.sparsity:
            objective.update({self.m_col[k]: self.cost.sparsity for k in self.actionable})
        objective.update(
            {
                self.v_col[k]: lambda ctx, k=k: (
                    ctx.constraints.soft_limits[k].penalty
                    if k in ctx.constraints.soft_limits
                    else 0.0
                )
                for k in self.actionable
            }
        )
        t.add_row(
            "cost_budget",
            objective,
            -INF,
            lambda ctx: INF if ctx.cost_budget is None else _widen_high(ctx.cost_budget),
        )
        self._add_classifier_rows()

    def _add_structural_rows(self, name: str) -> None:
        t = self.template
        var = self.scm.variables[self.scm.index[name]]
        j = self.scm.index[name]
        form = self._linearize(var.equation, name, j)
        x = self.x_col[name]
        if var.role is not Role.ACTIONABLE:
            t.add_linear_row(f"equation[{name}]", form.scaled(-1.0), {x: 1.0}, 0.0, 0.0)
            if set(form.terms) <= set(self.x_col.values()):
                self._affine_equations[name] = form
            return
        m = self.m_col[name]
        neg = form.scaled(-1.0)

        def m_up(ctx: PersonContext) -> float:
            return -_pad(ctx.box[name][1] - ctx.natural[name][0])

        def m_dn(ctx: PersonContext) -> float:
            return _pad(ctx.natural[name][1] - ctx.box[name][0])

        # x' - n <= M_up m  and  x' - n >= -M_dn m
        t.add_linear_row(f"follow_up[{name}]", neg, {x: 1.0, m: m_up}, -INF, 0.0)
        t.add_linear_row(f"follow_down[{name}]", neg, {x: 1.0, m: m_dn}, 0.0, INF)

        def low(ctx: PersonContext) -> float:
            return ctx.intervention.get(name, ctx.box[name])[0]

        def high(ctx: PersonContext) -> float:
            return ctx.intervention.get(name, ctx.box[name])[1]

        def m_low(ctx: PersonContext) -> float:
            return _pad(low(ctx) - ctx.box[name][0])

        def m_high(ctx: PersonContext) -> float:
            return _pad(ctx.box[name][1] - high(ctx))

        # x' >= lo - M (1 - m)  and  x' <= hi + M (1 - m)
        t.add_row(
            f"set_low[{name}]",
            {x: 1.0, m: lambda c: -m_low(c)},
            lambda c: low(c) - m_low(c),
            INF,
        )
        t.add_row(f"set_high[{name}]", {x: 1.0, m: m_high}, -INF, lambda c: high(c) + m_high(c))

    def _add_cost_rows(self, k: str) -> None:
        t = self.template
        j = self.scm.index[k]
        x, m, c, v = self.x_col[k], self.m_col[k], self.c_col[k], self.v_col[k]

        def a(ctx: PersonContext) -> float:
            return ctx.cost_coefficients[k]

        def delta_range(ctx: PersonContext) -> tuple[float, float]:
            lo, hi = ctx.box[k]
            return lo - ctx.x[j], hi - ctx.x[j]

        if self.cost.kind == "l1":
            for sign in (1.0, -1.0):

                def big_m(ctx: PersonContext, sign: float = sign) -> float:
                    low, high = delta_range(ctx)
                    return _pad(a(ctx) * (max(low, high) if sign > 0 else max(-low, -high)))

                # c >= sign a (x' - x^F) - W (1 - m)
                t.add_row(
                    f"cost_{'up' if sign > 0 else 'down'}[{k}]",
                    {c: 1.0, x: lambda ctx, s=sign: -s * a(ctx), m: lambda ctx, b=big_m: -b(ctx)},
                    lambda ctx, s=sign, b=big_m: -s * a(ctx) * ctx.x[j] - b(ctx),
                    INF,
                )
        else:
            for i in range(self.tangents):

                def point(ctx: PersonContext, i: int = i) -> float:
                    return float(ctx.tangent_points[k][i])

                def big_m(ctx: PersonContext, i: int = i) -> float:
                    tp = point(ctx, i)
                    return _pad(a(ctx) * max(2 * tp * d - tp * tp for d in delta_range(ctx)))

                # c >= a (2 t (x' - x^F) - t^2) - W (1 - m)
                t.add_row(
                    f"cost_tangent{i}[{k}]",
                    {
                        c: 1.0,
                        x: lambda ctx, p=point: -2 * a(ctx) * p(ctx),
                        m: lambda ctx, b=big_m: -b(ctx),
                    },
                    lambda ctx, p=point, b=big_m: (
                        -2 * a(ctx) * p(ctx) * ctx.x[j] - a(ctx) * p(ctx) ** 2 - b(ctx)
                    ),
                    INF,
                )
        for sign in (1.0, -1.0):

            def soft_m(ctx: PersonContext, sign: float = sign) -> float:
                limit = ctx.constraints.soft_limits[k].limit
                return _pad(max(sign * d for d in delta_range(ctx)) - limit)

            def soft_lower(ctx: PersonContext, sign: float = sign, b: Param = soft_m) -> float:
                if k not in ctx.constraints.soft_limits:
                    return -INF
                return -sign * ctx.x[j] - ctx.constraints.soft_limits[k].limit - b(ctx)

            # v >= sign (x' - x^F) - limit - W (1 - m)
            t.add_row(
                f"soft_limit_{'up' if sign > 0 else 'down'}[{k}]",
                {
                    v: 1.0,
                    x: -sign,
                    m: lambda ctx, b=soft_m: -b(ctx) if k in ctx.constraints.soft_limits else 0.0,
                },
                soft_lower,
                INF,
            )

    def _add_classifier_rows(self) -> None:
        t = self.template
        clf = self.classifier
        names = clf.feature_names
        previous: list[LinearForm] = []
        # The first layer's input: standardized features, a column or a per-person constant.
        for i, name in enumerate(names):
            if name in self.x_col:
                previous.append(
                    LinearForm({self.x_col[name]: 1.0 / clf.scale[i]}, -clf.mean[i] / clf.scale[i])
                )
            else:
                previous.append(
                    LinearForm({}, lambda ctx, i=i: (ctx.x[i] - clf.mean[i]) / clf.scale[i])
                )
        for layer_index, layer in enumerate(clf.layers):
            pre = [
                self._affine(previous, layer.weights[:, n], float(layer.bias[n]))
                for n in range(layer.weights.shape[1])
            ]
            if layer_index == len(clf.layers) - 1:
                t.add_linear_row(
                    "classifier_accepts",
                    pre[0],
                    {},
                    lambda ctx: clf.logit_threshold + ctx.margin,
                    INF,
                )
                return
            previous = [self._relu(form, layer_index, n) for n, form in enumerate(pre)]

    @staticmethod
    def _affine(inputs: list[LinearForm], weights: FloatArray, bias: float) -> LinearForm:
        form = LinearForm({}, bias)
        for w, inp in zip(weights, inputs, strict=True):
            if w != 0.0:
                form = form.plus(inp.scaled(float(w)))
        return form

    def _relu(self, z: LinearForm, layer: int, n: int) -> LinearForm:
        t = self.template

        def lo(ctx: PersonContext) -> float:
            return float(ctx.neuron_bounds[layer][0][n])

        def hi(ctx: PersonContext) -> float:
            return float(ctx.neuron_bounds[layer][1][n])

        a = t.add_col(f"relu{layer}_{n}", 0.0, lambda ctx: _pad(max(hi(ctx), 0.0)))
        s = t.add_col(
            f"relu{layer}_{n}_on",
            lambda ctx: 1.0 if lo(ctx) >= 0 else 0.0,
            lambda ctx: 0.0 if hi(ctx) <= 0 else 1.0,
            integer=True,
        )
        neg = z.scaled(-1.0)
        # a >= z;  a <= z - l (1 - s);  a <= u s
        t.add_linear_row(f"relu{layer}_{n}_above", neg, {a: 1.0}, 0.0, INF)
        t.add_linear_row(
            f"relu{layer}_{n}_below",
            neg,
            {a: 1.0, s: lambda ctx: -min(lo(ctx), 0.0) + _PAD_ABS},
            -INF,
            lambda ctx: -min(lo(ctx), 0.0) + _PAD_ABS,
        )
        t.add_row(
            f"relu{layer}_{n}_off", {a: 1.0, s: lambda ctx: -_pad(max(hi(ctx), 0.0))}, -INF, 0.0
        )
        return LinearForm({a: 1.0})

    # -- linearization of structural equations -----------------------------------------

    def _linearize(self, expr: Expr, owner: str, j: int) -> LinearForm:
        reachable = set(self.reachable)
        if not (free_names(expr) & reachable):
            return LinearForm({}, lambda ctx, node=expr: ctx.point(node))
        if isinstance(expr, Var):
            return LinearForm({self.x_col[expr.name]: 1.0})
        if isinstance(expr, Neg):
            return self._linearize(expr.arg, owner, j).scaled(-1.0)
        if isinstance(expr, BinOp):
            left_fixed = not (free_names(expr.left) & reachable)
            right_fixed = not (free_names(expr.right) & reachable)
            if expr.op in "+-":
                left = self._linearize(expr.left, owner, j)
                right = self._linearize(expr.right, owner, j)
                return left.plus(right.scaled(-1.0) if expr.op == "-" else right)
            if expr.op == "*" and (left_fixed or right_fixed):
                fixed, other = (expr.left, expr.right) if left_fixed else (expr.right, expr.left)
                return self._linearize(other, owner, j).scaled(
                    lambda ctx, node=fixed: ctx.point(node)
                )
            if expr.op == "/" and right_fixed:
                return self._linearize(expr.left, owner, j).scaled(
                    lambda ctx, node=expr.right: 1.0 / ctx.point(node)
                )
            if expr.op == "**":
                exponent = float(expr.right.value)  # type: ignore[attr-defined]
                return self._interpolate(
                    expr, expr.left, lambda v, p=exponent: np.power(v, p), owner, j
                )
            raise FormulationError(
                f"The equation of {owner!r} multiplies or divides two terms that an action can "
                f"change ({to_text(expr)}); this is not linear. Fix one factor or rewrite it."
            )
        if isinstance(expr, Call):
            if expr.func in ("max", "min"):
                return self._max_min(expr, owner, j)
            if expr.func == "abs":
                arg = expr.args[0]
                return self._max_pair(expr, arg, Neg(arg), owner, j, sense=1.0)
            if expr.func == "indicator":
                return self._indicator(expr, owner, j)
            func = {"sigmoid": sigmoid, "exp": np.exp, "log": np.log}[expr.func]
            return self._interpolate(expr, expr.args[0], func, owner, j)
        raise FormulationError(f"Cannot linearize {to_text(expr)} in the equation of {owner!r}.")

    def _max_min(self, expr: Call, owner: str, j: int) -> LinearForm:
        sense = 1.0 if expr.func == "max" else -1.0
        current: Expr = expr.args[0]
        form = self._linearize(current, owner, j)
        for position, arg in enumerate(expr.args[1:], start=1):
            # Fold n-ary max/min into pairs; the intermediate node carries the bounds.
            node: Expr = expr if position == len(expr.args) - 1 else Call(expr.func, (current, arg))
            self._register_intermediate(node, current, arg, expr.func)
            form = self._max_pair(node, current, arg, owner, j, sense=sense, left_form=form)
            current = node
        return form

    def _register_intermediate(self, node: Expr, left: Expr, right: Expr, func: str) -> None:
        self._intermediates.append((node, left, right, func))

    def _max_pair(
        self,
        node: Expr,
        left: Expr,
        right: Expr,
        owner: str,
        j: int,
        *,
        sense: float,
        left_form: LinearForm | None = None,
    ) -> LinearForm:
        """y = max(a, b) (sense +1) or min(a, b) (sense -1), exactly, with one binary.

        With sense s: s y >= s a, s y >= s b, s y <= s a + M1 (1 - z), s y <= s b + M2 z.
        """
        t = self.template
        if isinstance(right, Neg) and right.arg is left:
            self._negations.append(right)
        fa = left_form if left_form is not None else self._linearize(left, owner, j)
        fb = self._linearize(right, owner, j)
        label = f"{'max' if sense > 0 else 'min'}{len(t.col_names)}[{owner}]"

        def bounds(ctx: PersonContext, node_: Expr) -> tuple[float, float]:
            lo, hi = ctx.interval(node_)
            return (lo, hi) if sense > 0 else (-hi, -lo)

        def m1(ctx: PersonContext) -> float:  # (s b) - (s a) at most
            return _pad(bounds(ctx, right)[1] - bounds(ctx, left)[0])

        def m2(ctx: PersonContext) -> float:
            return _pad(bounds(ctx, left)[1] - bounds(ctx, right)[0])

        y = t.add_col(
            label,
            lambda ctx: _widen_low(ctx.interval(node)[0]),
            lambda ctx: _widen_high(ctx.interval(node)[1]),
        )
        z = t.add_col(
            f"{label}_first",
            lambda ctx: 1.0 if bounds(ctx, left)[0] >= bounds(ctx, right)[1] else 0.0,
            lambda ctx: 0.0 if bounds(ctx, right)[0] > bounds(ctx, left)[1] else 1.0,
            integer=True,
        )
        sa, sb = fa.scaled(-sense), fb.scaled(-sense)
        t.add_linear_row(f"{label}_ge_first", sa, {y: sense}, 0.0, INF)
        t.add_linear_row(f"{label}_ge_second", sb, {y: sense}, 0.0, INF)
        # s y - s a + M1 z <= M1
        t.add_linear_row(f"{label}_le_first", sa, {y: sense, z: m1}, -INF, m1)
        # s y - s b - M2 z <= 0
        t.add_linear_row(f"{label}_le_second", sb, {y: sense, z: lambda ctx: -m2(ctx)}, -INF, 0.0)
        for side in (left, right):
            if isinstance(side, Var) and side.name in self.m_col:
                self._add_choice_cuts(label, z, side, left, right, sense)
        return LinearForm({y: 1.0})

    def _add_choice_cuts(
        self, label: str, z: int, side: Var, left: Expr, right: Expr, sense: float
    ) -> None:
        """Which argument a max/min picks, per value of the act binary of one argument.

        With m_k = 0 the actionable feature k takes the value its equation gives (within
        ``natural``), with m_k = 1 a value within its intervention range: either may fix
        the choice z (1: the first argument) that the bounds of z, taken over k's whole box,
        leave open. Rows z >= l0 (1 - m) + l1 m and z <= u0 (1 - m) + u1 m: valid cuts, and
        a program with few free binaries drops an assignment that violates them without an
        LP (on Loan, savings' max(income, 0) when income follows its parents).
        """
        k = side.name
        m = self.m_col[k]

        def choices(ctx: PersonContext) -> tuple[float, float, float, float]:
            ranges = [ctx.natural[k], ctx.intervention.get(k)]
            out = []
            for values in ranges:
                if values is None:  # m_k = 1 is excluded by its bounds
                    out.append((0.0, 1.0))
                    continue
                intervals = [
                    values if node is side else ctx.interval(node) for node in (left, right)
                ]
                (alo, ahi), (blo, bhi) = [
                    (lo, hi) if sense > 0 else (-hi, -lo) for lo, hi in intervals
                ]
                # Padded like the columns' bounds: a choice is fixed only beyond rounding.
                first = 1.0 if _widen_low(alo) >= _widen_high(bhi) else 0.0
                second = 0.0 if _widen_low(blo) > _widen_high(ahi) else 1.0
                out.append((first, second))
            (l0, u0), (l1, u1) = out
            return l0, u0, l1, u1

        t = self.template
        # z + (l0 - l1) m >= l0  and  z + (u0 - u1) m <= u0
        t.add_row(
            f"{label}_choice_low[{k}]",
            {z: 1.0, m: lambda ctx: choices(ctx)[0] - choices(ctx)[2]},
            lambda ctx: choices(ctx)[0],
            INF,
        )
        t.add_row(
            f"{label}_choice_high[{k}]",
            {z: 1.0, m: lambda ctx: choices(ctx)[1] - choices(ctx)[3]},
            -INF,
            lambda ctx: choices(ctx)[1],
        )

    def _indicator(self, expr: Call, owner: str, j: int) -> LinearForm:
        """z = 1 if a >= 0 else 0: a >= l (1 - z), a <= (u + eps) z - eps."""
        t = self.template
        arg = expr.args[0]
        fa = self._linearize(arg, owner, j)
        eps = 1e-6
        label = f"indicator{len(t.col_names)}[{owner}]"
        z = t.add_col(
            label,
            lambda ctx: 1.0 if ctx.interval(arg)[0] >= 0 else 0.0,
            lambda ctx: 0.0 if ctx.interval(arg)[1] < 0 else 1.0,
            integer=True,
        )
        t.add_linear_row(
            f"{label}_on",
            fa,
            {z: lambda ctx: -_pad(-ctx.interval(arg)[0])},
            lambda ctx: -_pad(-ctx.interval(arg)[0]),
            INF,
        )
        t.add_linear_row(
            f"{label}_off", fa, {z: lambda ctx: -_pad(ctx.interval(arg)[1] + eps)}, -INF, -eps
        )
        return LinearForm({z: 1.0})

    def _interpolate(
        self, node: Expr, arg: Expr, func: Callable[[FloatArray], FloatArray], owner: str, j: int
    ) -> LinearForm:
        """Piecewise-linear interpolation of func(arg) on equal segments of arg's interval.

        Incremental formulation: arg = b_0 + sum_i h d_i, y = f(b_0) + sum_i (f(b_i) -
        f(b_{i-1})) d_i, 0 <= d_i <= 1, d_{i+1} <= z_i <= d_i with z_i binary.
        """
        t = self.template
        fa = self._linearize(arg, owner, j)
        n = self.breakpoints
        label = f"pwl{len(t.col_names)}[{owner}]"
        self.approximated.append(ApproximatedTerm(owner, node, func))

        def knots(ctx: PersonContext) -> tuple[FloatArray, FloatArray]:
            lo, hi = ctx.interval(arg)
            points = np.linspace(lo, hi, n + 1)
            return points, np.asarray(func(points), dtype=float)

        y = t.add_col(label, -INF, INF)
        d = [t.add_col(f"{label}_segment{i}", 0.0, 1.0) for i in range(n)]
        z = [t.add_col(f"{label}_past{i}", 0.0, 1.0, integer=True) for i in range(n - 1)]
        entries: dict[int, Coef] = {
            di: lambda ctx, i=i: -(knots(ctx)[0][i + 1] - knots(ctx)[0][i])
            for i, di in enumerate(d)
        }
        t.add_linear_row(
            f"{label}_argument", fa, entries, lambda c: knots(c)[0][0], lambda c: knots(c)[0][0]
        )
        values: dict[int, Coef] = {y: 1.0}
        values.update(
            {
                di: lambda ctx, i=i: -(knots(ctx)[1][i + 1] - knots(ctx)[1][i])
                for i, di in enumerate(d)
            }
        )
        t.add_row(f"{label}_value", values, lambda c: knots(c)[1][0], lambda c: knots(c)[1][0])
        for i, zi in enumerate(z):
            t.add_row(f"{label}_order{i}a", {d[i + 1]: 1.0, zi: -1.0}, -INF, 0.0)
            t.add_row(f"{label}_order{i}b", {zi: 1.0, d[i]: -1.0}, -INF, 0.0)
        return LinearForm({y: 1.0})

    # -- per person --------------------------------------------------------------------

    def intervention_ranges(
        self, x: FloatArray, constraints: PersonConstraints, cost_budget: float | None = None
    ) -> dict[str, tuple[float, float]]:
        """Per feature this person may act on: the interval of values they may set.

        Domain, personal bounds and direction, and the incumbent box when ``cost_budget``
        is given; integer features get integer ends. Features with an empty range are left
        out.
        """
        scm = self.scm
        intervention: dict[str, tuple[float, float]] = {}
        for k in self.actionable:
            if k in constraints.locks:
                continue
            var = scm.variables[scm.index[k]]
            xk = x[scm.index[k]]
            lo, hi = constraints.interval(var, xk)
            if cost_budget is not None:
                reach = self.cost.max_change(k, constraints.weight(k), cost_budget)
                reach = reach * (1 + 1e-7) + 1e-9
                lo, hi = max(lo, xk - reach), min(hi, xk + reach)
            if var.type is not VariableType.CONTINUOUS:
                lo, hi = float(np.ceil(lo - 1e-9)), float(np.floor(hi + 1e-9))
            if lo <= hi:
                intervention[k] = (float(lo), float(hi))
        return intervention

    def context(
        self,
        x: FloatArray,
        constraints: PersonConstraints,
        *,
        noise: FloatArray | None = None,
        cost_budget: float | None = None,
        margin: float | None = None,
        forced: frozenset[str] = frozenset(),
        memo: dict[tuple, tuple[float, float, dict[int, Interval]]] | None = None,
    ) -> PersonContext:
        """Intervals, ranges and neuron bounds for one person (the per-person numbers).

        ``cost_budget``: the cost of a known valid action; restricts every intervention to
        the box of changes that could still be cheaper (see the module docstring).
        ``forced``: features this solve acts on for sure (m_k fixed to 1); their value is the
        value set, within the intervention range, and they pay for their whole change.
        ``memo``: a dict shared by the contexts of one person (same ``x`` and noise), which
        then bound each equation once per distinct box of its parents.
        """
        scm = self.scm
        x = np.asarray(x, dtype=float)
        if noise is None:
            noise = scm.abduct_noise(x[None, :])[0]
        intervention = self.intervention_ranges(x, constraints, cost_budget)
        box: dict[str, tuple[float, float]] = {}
        natural: dict[str, tuple[float, float]] = {}
        nodes: dict[int, Interval] = {}
        reachable = set(self.reachable)
        for j, var in enumerate(scm.variables):
            if var.name not in reachable:
                box[var.name] = (float(x[j]), float(x[j]))
                continue
            key = (j, *(box[p] for p in var.parents))
            if memo is not None and key in memo:
                lo, hi, equation_nodes = memo[key]
            else:
                env: dict[str, Interval] = {p: box[p] for p in var.parents}
                env[NOISE] = (float(noise[j]), float(noise[j]))
                equation_nodes = {}
                lo, hi = evaluate_interval(var.equation, env, equation_nodes)
                if memo is not None:
                    memo[key] = (lo, hi, equation_nodes)
            nodes.update(equation_nodes)
            self._bound_extra_nodes(nodes)
            natural[var.name] = (float(lo), float(hi))
            if var.name in forced and var.name in intervention:
                lo, hi = intervention[var.name]
            elif var.name in intervention:
                ilo, ihi = intervention[var.name]
                lo, hi = min(lo, ilo), max(hi, ihi)
            box[var.name] = (float(lo), float(hi))
        ctx = PersonContext(
            x=x,
            noise=np.asarray(noise, dtype=float),
            constraints=constraints,
            intervention=intervention,
            box=box,
            natural=natural,
            nodes=nodes,
            neuron_bounds=[],
            cost_budget=cost_budget,
            margin=self.margin if margin is None else margin,
            forced=frozenset(forced) & frozenset(intervention),
            cost_coefficients={
                k: self.cost.coefficient(k, constraints.weight(k)) for k in self.actionable
            },
        )
        ctx.neuron_bounds = self._neuron_bounds(ctx, memo)
        if self.cost.kind == "carma":
            for k in self.actionable:
                j = scm.index[k]
                lo, hi = box[k]
                ctx.tangent_points[k] = np.linspace(lo - x[j], hi - x[j], self.tangents)
        return ctx

    def _neuron_bounds(
        self, ctx: PersonContext, memo: dict | None = None
    ) -> list[tuple[FloatArray, FloatArray]]:
        """Classifier bounds over this person's counterfactuals, inputs written as x = P y + q.

        y holds one coordinate per actionable feature and per non-actionable one whose
        equation is not affine, each within its box; affine non-actionable features are
        expressed through their parents; features outside R are constants. P and q depend
        on the person only (coefficients read off features no action reaches): ``memo``
        keeps them for the person's next contexts.
        """
        free = self._free
        if memo is not None and "input_map" in memo:
            P, q = memo["input_map"]
        else:
            P, q = self._input_map(ctx, free)
            if memo is not None:
                memo["input_map"] = (P, q)
        lower = np.array([ctx.box[n][0] for n in free])
        upper = np.array([ctx.box[n][1] for n in free])
        linear_max = None
        if ctx.cost_budget is not None:
            linear_max = self._budget_maximum(ctx, free, lower, upper)
        # The MILP only admits accepted counterfactuals (up to its feasibility tolerance),
        # so the bounds need only hold for those.
        accepted = self.classifier.logit_threshold + ctx.margin - 1e-7
        bounds = self.classifier.preactivation_bounds_affine(
            P, q, lower, upper, linear_max, logit_at_least=accepted
        )
        # Rounding must not make a set with accepted points look empty. Bounds of an empty
        # set may be infinite (lower +inf, upper -inf): they stay so.
        return [
            (lo - _PAD_REL * (np.abs(_finite(lo)) + 1), hi + _PAD_REL * (np.abs(_finite(hi)) + 1))
            for lo, hi in bounds
        ]

    def _input_map(self, ctx: PersonContext, free: list[str]) -> tuple[FloatArray, FloatArray]:
        """P and q of :meth:`_neuron_bounds` for this person."""
        names = self.classifier.feature_names
        column_name = {col: name for name, col in self.x_col.items()}
        rows: dict[str, tuple[FloatArray, float]] = {}
        for name in self.reachable:
            if name in self._affine_equations:
                form = self._affine_equations[name]
                row, offset = np.zeros(len(free)), _value(form.const, ctx)
                for col, coef in form.terms.items():
                    parent_row, parent_offset = rows[column_name[col]]
                    value = _value(coef, ctx)
                    row, offset = row + value * parent_row, offset + value * parent_offset
                rows[name] = (row, offset)
            else:
                row = np.zeros(len(free))
                row[free.index(name)] = 1.0
                rows[name] = (row, 0.0)
        P = np.zeros((len(names), len(free)))
        q = np.zeros(len(names))
        for i, name in enumerate(names):
            if name in rows:
                P[i], q[i] = rows[name]
            else:
                q[i] = ctx.box[name][0]
        return P, q

    def proves_no_recourse(self, ctx: PersonContext) -> bool:
        """Whether the classifier bounds alone show that no counterfactual of this context
        is accepted (the logit's upper bound is below the threshold, or some layer's
        bounds cross), so that its MILP is infeasible."""
        logit_upper = ctx.neuron_bounds[-1][1][0]
        return bool(
            logit_upper < self.classifier.logit_threshold + ctx.margin
            or any(np.any(lo > hi) for lo, hi in ctx.neuron_bounds)
        )

    def _budget_maximum(
        self, ctx: PersonContext, free: list[str], lower: FloatArray, upper: FloatArray
    ) -> Callable[[FloatArray], FloatArray]:
        """Maximum of each row of G @ y over the box cut by the cost budget C0.

        A feature whose parents no action can reach sits at its factual value unless acted
        on, and then pays for its whole change, so the changes of such features share the
        budget: for the L1 cost ``sum_k a_k |delta_k| <= C0`` (maximising a linear function
        over it within the box is a fractional knapsack); for the squared cost
        ``sum_k a_k delta_k^2 <= C0`` (an ellipsoid, and the box). Other coordinates keep
        their box.
        """
        factual = ctx.x[self._free_columns]
        # A feature acted on for sure (forced) also pays for its whole change; the knapsack
        # below starts from the factual value, so that value must lie in its box.
        roots = self._free_roots | (
            np.array([name in ctx.forced for name in free], dtype=bool)
            & (lower <= factual)
            & (factual <= upper)
        )
        rate = np.array(
            [ctx.cost_coefficients[n] if root else 1.0 for n, root in zip(free, roots, strict=True)]
        )
        budget = float(ctx.cost_budget or 0.0) * (1 + 1e-7) + 1e-9
        # Split the coordinates once: the per-row work below is a few numpy calls, which
        # matters for the many small contexts of one person (one per mask).
        root, other = np.flatnonzero(roots), np.flatnonzero(~roots)
        other_lower, other_upper = lower[other], upper[other]
        root_factual, root_rate = factual[root], rate[root]
        room_up, room_down = upper[root] - root_factual, root_factual - lower[root]

        def maximum(G: FloatArray) -> FloatArray:
            G_other, G_root = G[:, other], G[:, root]
            base = (
                np.maximum(G_other, 0) @ other_upper
                + np.minimum(G_other, 0) @ other_lower
                + G_root @ root_factual
            )
            room = np.where(G_root > 0, room_up, room_down)
            gain = np.abs(G_root)
            if self.cost.kind == "carma":
                box = (gain * room).sum(axis=1)
                ball = np.sqrt(budget * (gain**2 / root_rate).sum(axis=1))
                return base + np.minimum(box, ball)
            # Fractional knapsack: spend the budget on the best gain per unit of cost first.
            order = np.argsort(-gain / root_rate, axis=1)
            rows = np.arange(len(G))[:, None]
            gain_sorted, room_sorted = gain[rows, order], room[rows, order]
            full_cost = room_sorted * root_rate[order]
            spent_before = np.cumsum(full_cost, axis=1) - full_cost
            fraction = np.clip(
                (budget - spent_before) / np.where(full_cost > 0, full_cost, 1.0), 0.0, 1.0
            )
            return base + (gain_sorted * room_sorted * fraction).sum(axis=1)

        return maximum

    def _bound_extra_nodes(self, nodes: dict[int, Interval]) -> None:
        # Nodes the linearization created (folded max/min pairs, -a inside abs) are not in
        # the equation's tree; bound them from their arguments.
        for node, left, right, func in self._intermediates:
            if id(left) in nodes and id(right) in nodes and id(node) not in nodes:
                (alo, ahi), (blo, bhi) = nodes[id(left)], nodes[id(right)]
                pick = np.maximum if func == "max" else np.minimum
                nodes[id(node)] = (pick(alo, blo), pick(ahi, bhi))
        for neg in self._negations:
            if id(neg.arg) in nodes:
                lo, hi = nodes[id(neg.arg)]
                nodes[id(neg)] = (-hi, -lo)

    def interpolation_error(self, ctx: PersonContext) -> float:
        """Largest gap between each interpolated term and its function, over its interval."""
        worst = 0.0
        for term in self.approximated:
            arg = next(iter(children(term.node)))
            lo, hi = ctx.interval(arg)
            knots = np.linspace(lo, hi, self.breakpoints + 1)
            dense = np.linspace(lo, hi, 64 * self.breakpoints + 1)
            with np.errstate(all="ignore"):
                exact = np.asarray(term.func(dense), dtype=float)
                interp = np.interp(dense, knots, np.asarray(term.func(knots), dtype=float))
            worst = max(worst, float(np.nanmax(np.abs(exact - interp))))
        return worst

    def instantiate(self, ctx: PersonContext) -> NumericMILP:
        return self.template.instantiate(ctx)
