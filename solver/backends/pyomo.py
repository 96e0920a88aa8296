"""Pyomo: the same MILP as an algebraic model, for any solver Pyomo drives and for export.

:func:`build_pyomo_model` turns a :class:`~solver.milp.NumericMILP` into a Pyomo
``ConcreteModel`` whose variables and constraints carry the program's column and row names
(sanitised for LP/MPS files); :func:`export_model` writes it as ``.lp`` or ``.mps``.
:class:`PyomoBackend` solves it through Pyomo's (legacy) ``SolverFactory``, whose results
share one ``TerminationCondition`` for every solver interface (classic, APPSI, contrib).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from solver.backends.base import Backend, BackendUnavailableError
from solver.milp import BackendResult, NumericMILP, SolverSettings, SolveStatus

try:
    import pyomo.environ as pyo
    from pyomo.common.log import LoggingIntercept
    from pyomo.opt import SolverFactory, TerminationCondition
    from pyomo.version import version as pyomo_version
except ImportError:  # available() then answers False
    pyo = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from os import PathLike

logger = logging.getLogger(__name__)

DEFAULT_SOLVER = "appsi_highs"

HIGHS_SOLVERS = frozenset({"appsi_highs", "highs"})
"""Pyomo solver names that run highspy in this process, and take HiGHS option names."""

HIGHS_MIN_FEASIBILITY_TOLERANCE = 1e-10
"""HiGHS rejects a smaller ``mip_feasibility_tolerance``, and Pyomo ignores the rejection."""

EXPORT_FORMATS = {".lp": "lp", ".mps": "mps"}
"""File extension -> Pyomo writer format."""

_UNSAFE_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_]")

T = TypeVar("T")


@functools.cache
def _native_status() -> dict[TerminationCondition, SolveStatus]:
    """The one map from Pyomo's ``TerminationCondition`` to :class:`SolveStatus`."""
    tc = TerminationCondition
    return {
        tc.optimal: SolveStatus.OPTIMAL,
        tc.globallyOptimal: SolveStatus.OPTIMAL,
        tc.infeasible: SolveStatus.INFEASIBLE,
        # Promoted to INFEASIBLE in solve() when the objective is bounded below.
        tc.infeasibleOrUnbounded: SolveStatus.ERROR,
        tc.maxTimeLimit: SolveStatus.TIME_LIMIT,
        # A local optimum or a solution stopped by some other limit proves nothing exact.
        tc.locallyOptimal: SolveStatus.ERROR,
        tc.feasible: SolveStatus.ERROR,
        tc.maxIterations: SolveStatus.ERROR,
        tc.maxEvaluations: SolveStatus.ERROR,
        tc.minFunctionValue: SolveStatus.ERROR,
        tc.minStepLength: SolveStatus.ERROR,
        tc.intermediateNonInteger: SolveStatus.ERROR,
        # Recourse costs are bounded below: an unbounded program is a formulation bug.
        tc.unbounded: SolveStatus.ERROR,
        tc.invalidProblem: SolveStatus.ERROR,
        tc.noSolution: SolveStatus.ERROR,
        tc.solverFailure: SolveStatus.ERROR,
        tc.internalSolverError: SolveStatus.ERROR,
        tc.error: SolveStatus.ERROR,
        tc.userInterrupt: SolveStatus.ERROR,
        tc.resourceInterrupt: SolveStatus.ERROR,
        tc.licensingProblems: SolveStatus.ERROR,
        tc.other: SolveStatus.UNKNOWN,
        tc.unknown: SolveStatus.UNKNOWN,
    }


def _solver_available(solver_name: str) -> bool:
    """Whether Pyomo imports and can run the solver named ``solver_name``."""
    return pyo is not None and bool(SolverFactory(solver_name).available(exception_flag=False))


def _solver_version(solver_name: str) -> str:
    """``"pyomo <version> / <solver_name> <version>"``, or '' when the solver cannot run."""
    if not _solver_available(solver_name):
        return ""
    solver_version = SolverFactory(solver_name).version()
    shown = ".".join(map(str, solver_version)) if solver_version else "unknown"
    return f"pyomo {pyomo_version} / {solver_name} {shown}"


class _PerSolver(Generic[T]):
    """A query answered for an instance's solver, or for :data:`DEFAULT_SOLVER` on the class.

    ``Backend.available()`` and ``version()`` are class methods, but what Pyomo runs is
    chosen per instance: through an instance they answer for that instance's solver.
    """

    def __init__(self, query: Callable[[str], T]) -> None:
        self._query = query
        self.__doc__ = query.__doc__

    def __get__(self, instance: PyomoBackend | None, owner: type) -> Callable[[], T]:
        solver_name = DEFAULT_SOLVER if instance is None else instance.solver_name
        return functools.partial(self._query, solver_name)


class PyomoBackend(Backend):
    """Solve a :class:`NumericMILP` as a Pyomo model with any solver Pyomo can run.

    Parameters
    ----------
    solver_name
        A name for Pyomo's ``SolverFactory``: ``"appsi_highs"``, ``"highs"``, ``"cbc"``,
        ``"glpk"``, ``"scip"``, ... HiGHS (the first two) gets the gap, thread, time and
        tolerance settings as options; other solvers get the time limit only, and keep their
        own defaults for the rest unless ``options`` sets them.
    options
        Solver options passed on every solve, over the ones derived from the settings.

    Raises
    ------
    BackendUnavailableError
        When Pyomo is missing or cannot run ``solver_name``.
    """

    name = "pyomo"
    available = _PerSolver(_solver_available)
    version = _PerSolver(_solver_version)

    def __init__(
        self,
        solver_name: str = DEFAULT_SOLVER,
        options: Mapping[str, float | int | str | bool] | None = None,
    ) -> None:
        self.solver_name = solver_name
        self.options = dict(options or {})
        if not _solver_available(solver_name):
            raise BackendUnavailableError(f"Pyomo cannot run the solver {solver_name!r}")
        self._solver = SolverFactory(solver_name)
        if solver_name not in HIGHS_SOLVERS:
            logger.warning(
                "PyomoBackend passes only the time limit to %r: set its gaps, threads and "
                "tolerances through `options`, or the solver's defaults apply",
                solver_name,
            )

    def solve(self, milp: NumericMILP, settings: SolverSettings) -> BackendResult:
        """Build ``milp`` as a Pyomo model and solve it.

        Parameters
        ----------
        milp
            The program to solve.
        settings
            Time limit for every solver; gaps, threads and feasibility tolerance for HiGHS.

        Returns
        -------
        BackendResult
            The status; the solution (column order) and its objective only when the solver
            returned one and the status is optimal or time limit; the best bound when the
            solver reports a finite one. The runtime covers building and solving.
        """
        start = time.perf_counter()
        model = build_pyomo_model(milp)
        # load_solutions=False: otherwise Pyomo raises on infeasible and time-limit results.
        results = self._solver.solve(
            model,
            load_solutions=False,
            tee=False,
            timelimit=settings.time_limit if math.isfinite(settings.time_limit) else None,
            options=self._solver_options(settings),
        )
        condition = results.solver.termination_condition
        status = _native_status().get(condition, SolveStatus.UNKNOWN)
        if status is SolveStatus.UNKNOWN:
            logger.warning("Pyomo/%s ended with %s", self.solver_name, condition)
        if condition == TerminationCondition.infeasibleOrUnbounded and _bounded_below(milp):
            status = SolveStatus.INFEASIBLE
        has_solution = len(results.solution) > 0
        if status is SolveStatus.OPTIMAL and not has_solution:
            status = SolveStatus.ERROR

        solution = objective = bound = None
        if status in (SolveStatus.OPTIMAL, SolveStatus.TIME_LIMIT):
            if has_solution:
                solution = _load_solution(
                    model, results, milp, quiet=status is SolveStatus.TIME_LIMIT
                )
                objective = float(milp.objective @ solution + milp.objective_offset)
            lower_bound = results.problem.lower_bound
            if isinstance(lower_bound, int | float) and math.isfinite(lower_bound):
                bound = float(lower_bound)
        return BackendResult(
            status,
            solution,
            objective,
            bound,
            time.perf_counter() - start,
            f"pyomo/{self.solver_name} termination condition {condition}",
        )

    def _solver_options(self, settings: SolverSettings) -> dict[str, float | int | str | bool]:
        """Options for one solve: HiGHS ones from ``settings``, then ``self.options``."""
        options: dict[str, float | int | str | bool] = {}
        if self.solver_name in HIGHS_SOLVERS:
            if settings.threads != 1:
                logger.warning(
                    "HiGHS runs with 1 thread, not %d: its thread scheduler is process-wide "
                    "and a later 1-thread run in this process would silently do nothing",
                    settings.threads,
                )
            tolerance = max(settings.feasibility_tolerance, HIGHS_MIN_FEASIBILITY_TOLERANCE)
            if tolerance != settings.feasibility_tolerance:
                logger.warning(
                    "HiGHS takes mip_feasibility_tolerance >= %g: using %g, not %g",
                    HIGHS_MIN_FEASIBILITY_TOLERANCE,
                    tolerance,
                    settings.feasibility_tolerance,
                )
            options = {
                # Set on every solve: see HIGHS_SOLVERS and the thread warning above.
                "threads": 1,
                "mip_rel_gap": settings.mip_rel_gap,
                "mip_abs_gap": settings.mip_abs_gap,
                "mip_feasibility_tolerance": tolerance,
                "output_flag": False,
            }
        options.update(self.options)
        return options


def build_pyomo_model(milp: NumericMILP) -> pyo.ConcreteModel:
    """The Pyomo model of ``milp``: ``min cost`` subject to ``c[row]``, ``x[col]`` bounds.

    Parameters
    ----------
    milp
        The program to build.

    Returns
    -------
    pyomo.environ.ConcreteModel
        Variables ``x`` and constraints ``c`` are indexed by labels made from the column and
        row names (characters outside ``[A-Za-z0-9_]`` become ``_``, repeats get a suffix).
        ``model.cols.at(j + 1)`` is the label of column ``j`` and ``model.rows.at(i + 1)``
        that of row ``i``. Free rows are left out; empty rows become trivially feasible
        (left out) or trivially infeasible constraints.
    """
    model = pyo.ConcreteModel(name="carma_mip")
    col_labels = _labels(milp.col_names, "col")
    row_labels = _labels(milp.row_names, "row")
    model.cols = pyo.Set(initialize=col_labels, ordered=True)
    model.rows = pyo.Set(initialize=row_labels, ordered=True)

    domains, bounds = {}, {}
    for label, lower, upper, is_integer in zip(
        col_labels,
        milp.col_lower.tolist(),
        milp.col_upper.tolist(),
        milp.integer.tolist(),
        strict=True,
    ):
        if not is_integer:
            domains[label] = pyo.Reals
        elif lower >= 0 and upper <= 1:
            domains[label] = pyo.Binary
        else:
            domains[label] = pyo.Integers
        bounds[label] = (_finite_or_none(lower), _finite_or_none(upper))
    model.x = pyo.Var(model.cols, domain=domains, bounds=bounds)

    row_index = {label: row for row, label in enumerate(row_labels)}

    def row_rule(model: pyo.ConcreteModel, label: str) -> object:
        row = row_index[label]
        lower, upper = float(milp.row_lower[row]), float(milp.row_upper[row])
        cols, vals = milp.row_entries(row)
        if len(cols) == 0:
            # Pyomo refuses a constant body: decide the row here.
            feasible = lower <= 0.0 <= upper
            return pyo.Constraint.Skip if feasible else pyo.Constraint.Infeasible
        if lower == -math.inf and upper == math.inf:
            return pyo.Constraint.Skip
        body = _linear(model, col_labels, cols.tolist(), vals.tolist())
        if lower == upper:
            return body == lower
        return (_finite_or_none(lower), body, _finite_or_none(upper))

    model.c = pyo.Constraint(model.rows, rule=row_rule)
    costs = milp.objective.tolist()
    used = [col for col, cost in enumerate(costs) if cost]
    model.cost = pyo.Objective(
        expr=_linear(model, col_labels, used, [costs[col] for col in used])
        + float(milp.objective_offset),
        sense=pyo.minimize,
    )
    return model


def export_model(milp: NumericMILP, path: str | PathLike[str]) -> None:
    """Write ``milp`` as an LP or MPS file, chosen by the extension of ``path``.

    Parameters
    ----------
    milp
        The program to write.
    path
        Destination ending in ``.lp`` or ``.mps`` (any case).

    Raises
    ------
    ValueError
        For any other extension.
    """
    suffix = Path(path).suffix
    file_format = EXPORT_FORMATS.get(suffix.lower())
    if file_format is None:
        raise ValueError(
            f"cannot export a model to {suffix or 'a file without extension'!r} "
            f"({path}): use one of {', '.join(EXPORT_FORMATS)}"
        )
    build_pyomo_model(milp).write(
        str(path), format=file_format, io_options={"symbolic_solver_labels": True}
    )


def _labels(names: Iterable[str], fallback: str) -> list[str]:
    """Unique LP/MPS-safe labels for ``names``, in order."""
    labels: list[str] = []
    seen: set[str] = set()
    for position, name in enumerate(names):
        label = _UNSAFE_LABEL_CHARS.sub("_", name) or f"{fallback}{position}"
        while label in seen:
            label = f"{label}_{position}"
        seen.add(label)
        labels.append(label)
    return labels


def _finite_or_none(value: float) -> float | None:
    """Pyomo's form of a bound: ``None`` for an infinite one."""
    return value if math.isfinite(value) else None


def _linear(
    model: pyo.ConcreteModel, col_labels: list[str], cols: list[int], vals: list[float]
) -> object:
    """The expression ``sum(vals[k] * x[cols[k]])``; repeated columns add up."""
    return pyo.quicksum(val * model.x[col_labels[col]] for col, val in zip(cols, vals, strict=True))


def _bounded_below(milp: NumericMILP) -> bool:
    """Whether the objective is bounded below on the column bounds (so never unbounded)."""
    cost = milp.objective
    return bool(
        np.all(np.isfinite(milp.col_lower[cost > 0]))
        and np.all(np.isfinite(milp.col_upper[cost < 0]))
    )


def _load_solution(
    model: pyo.ConcreteModel, results: object, milp: NumericMILP, *, quiet: bool
) -> np.ndarray:
    """Load the solution in ``results`` into ``model``; return it in column order.

    ``quiet`` drops Pyomo's warning about loading from an "aborted" solve, which is what a
    time-limit result is.
    """
    silence = (
        LoggingIntercept(io.StringIO(), "pyomo.core", logging.WARNING)
        if quiet
        else contextlib.nullcontext()
    )
    with silence:
        model.solutions.load_from(results)
    values = np.array(
        [np.nan if var.value is None else var.value for var in model.x.values()], dtype=np.float64
    )
    unused = np.isnan(values)
    if unused.any():
        # Pyomo only sends the solver columns that appear in a row or the objective. Any
        # value within bounds is optimal for the others: take the one nearest 0.
        lower = np.where(milp.integer, np.ceil(milp.col_lower), milp.col_lower)
        upper = np.where(milp.integer, np.floor(milp.col_upper), milp.col_upper)
        values[unused] = np.clip(0.0, lower, upper)[unused]
    return values
