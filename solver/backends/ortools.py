"""SCIP through OR-Tools' ``pywraplp``: a second, independent MILP engine for cross-checks.

The model is rebuilt from the :class:`~solver.milp.NumericMILP` arrays on every solve
(``pywraplp`` gives SCIP no incremental updates).
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np

from solver.backends.base import Backend, BackendUnavailableError
from solver.milp import BackendResult, NumericMILP, SolverSettings, SolveStatus

try:
    import ortools
    from ortools.linear_solver import pywraplp
except ImportError:  # available() then answers False
    ortools = None  # type: ignore[assignment]
    pywraplp = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SCIP_FEASTOL_RANGE = (1e-17, 1e-3)
"""Range SCIP 10 accepts for ``numerics/feastol``; it rejects anything outside."""

SCIP_INFINITY = 1e20
"""SCIP's infinity: ``BestBound()`` is -1e20 when SCIP has no bound."""


@functools.cache
def _native_status() -> dict[int, SolveStatus]:
    """The one map from ``pywraplp.Solver`` result status to :class:`SolveStatus`."""
    native = pywraplp.Solver
    return {
        native.OPTIMAL: SolveStatus.OPTIMAL,
        # OR-Tools also reports SCIP's "infeasible or unbounded" as INFEASIBLE.
        native.INFEASIBLE: SolveStatus.INFEASIBLE,
        # FEASIBLE and NOT_SOLVED become TIME_LIMIT when the time limit was hit (see solve).
        native.FEASIBLE: SolveStatus.ERROR,
        native.NOT_SOLVED: SolveStatus.ERROR,
        # Recourse costs are bounded below: an unbounded program is a formulation bug.
        native.UNBOUNDED: SolveStatus.ERROR,
        native.ABNORMAL: SolveStatus.ERROR,
        native.MODEL_INVALID: SolveStatus.ERROR,
    }


class OrToolsBackend(Backend):
    """Solve a :class:`NumericMILP` with SCIP through ``ortools.linear_solver.pywraplp``."""

    name = "ortools"

    @classmethod
    def available(cls) -> bool:
        """Whether OR-Tools imports and was built with SCIP."""
        return pywraplp is not None and pywraplp.Solver.CreateSolver("SCIP") is not None

    @classmethod
    def version(cls) -> str:
        """``"ortools <version> / SCIP <version> [LP solver: ...]"``, or '' when unavailable."""
        solver = None if pywraplp is None else pywraplp.Solver.CreateSolver("SCIP")
        if solver is None:
            return ""
        return f"ortools {ortools.__version__} / {solver.SolverVersion()}"

    def solve(self, milp: NumericMILP, settings: SolverSettings) -> BackendResult:
        """Solve ``milp`` with SCIP.

        Parameters
        ----------
        milp
            The program to solve; a fresh SCIP model is built from its arrays.
        settings
            Time limit, threads, relative and absolute MIP gap, feasibility tolerance.

        Returns
        -------
        BackendResult
            The status; the solution and objective only when SCIP holds a solution and the
            status is optimal or time limit; the best bound when SCIP has a finite one. The
            runtime covers building and solving.

        Raises
        ------
        BackendUnavailableError
            When OR-Tools is missing or was built without SCIP.
        """
        start = time.perf_counter()
        solver = None if pywraplp is None else pywraplp.Solver.CreateSolver("SCIP")
        if solver is None:
            raise BackendUnavailableError("OR-Tools with SCIP is not available")
        variables = _build_model(solver, milp)
        error = _apply_settings(solver, settings)
        if error:
            return BackendResult(
                SolveStatus.ERROR, None, None, None, time.perf_counter() - start, error
            )
        parameters = pywraplp.MPSolverParameters()
        # OR-Tools' default relative gap is 1e-4: not exact.
        parameters.SetDoubleParam(
            pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, settings.mip_rel_gap
        )

        solve_start = time.perf_counter()
        code = solver.Solve(parameters)
        solve_seconds = time.perf_counter() - solve_start

        status = _native_status().get(code)
        if status is None:
            logger.warning("OR-Tools returned an unmapped result status %s", code)
            status = SolveStatus.UNKNOWN
        # SCIP's time limit surfaces as FEASIBLE (with a solution) or NOT_SOLVED (without).
        # Our clock spans SCIP's own solving clock, so it has passed the limit too.
        if code in (pywraplp.Solver.FEASIBLE, pywraplp.Solver.NOT_SOLVED) and (
            solve_seconds >= settings.time_limit
        ):
            status = SolveStatus.TIME_LIMIT

        solution = objective = bound = None
        if status in (SolveStatus.OPTIMAL, SolveStatus.TIME_LIMIT):
            # Objective().Value() is 0.0 when SCIP has no solution: read it only with one.
            if code in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
                solution = np.array([var.solution_value() for var in variables], dtype=np.float64)
                objective = solver.Objective().Value()
            best_bound = solver.Objective().BestBound()
            if abs(best_bound) < SCIP_INFINITY:
                bound = best_bound
        return BackendResult(
            status,
            solution,
            objective,
            bound,
            time.perf_counter() - start,
            f"pywraplp result status {code}",
        )


def _build_model(solver: pywraplp.Solver, milp: NumericMILP) -> list[pywraplp.Variable]:
    """Add the columns, rows and objective of ``milp`` to the empty ``solver``."""
    infinity = solver.infinity()
    # NumericMILP's np.inf becomes OR-Tools' infinity (today the same float).
    col_lower, col_upper, row_lower, row_upper = (
        np.clip(bounds, -infinity, infinity).tolist()
        for bounds in (milp.col_lower, milp.col_upper, milp.row_lower, milp.row_upper)
    )
    variables = [
        (solver.IntVar if is_integer else solver.NumVar)(lower, upper, name)
        for name, lower, upper, is_integer in zip(
            milp.col_names, col_lower, col_upper, milp.integer.tolist(), strict=True
        )
    ]
    for row, name in enumerate(milp.row_names):
        constraint = solver.Constraint(row_lower[row], row_upper[row], name)
        cols, vals = milp.row_entries(row)
        for col, val in zip(cols.tolist(), vals.tolist(), strict=True):
            var = variables[col]
            # SetCoefficient overwrites: repeated entries must add up, as in to_dense().
            constraint.SetCoefficient(var, constraint.GetCoefficient(var) + val)
    objective = solver.Objective()
    for var, cost in zip(variables, milp.objective.tolist(), strict=True):
        if cost:
            objective.SetCoefficient(var, cost)
    objective.SetOffset(float(milp.objective_offset))
    objective.SetMinimization()
    return variables


def _apply_settings(solver: pywraplp.Solver, settings: SolverSettings) -> str:
    """Set the limits and tolerances of ``solver``; return an error message, '' on success.

    The relative gap is a solve parameter (``MPSolverParameters``), set by the caller.
    """
    solver.SuppressOutput()
    if math.isfinite(settings.time_limit):
        # 0 ms means "no limit" to OR-Tools: keep at least 1 ms.
        solver.SetTimeLimit(max(1, math.ceil(settings.time_limit * 1000)))
    if not solver.SetNumThreads(settings.threads):
        logger.warning("SCIP refused %d threads and keeps its default", settings.threads)

    lowest, highest = SCIP_FEASTOL_RANGE
    feastol = min(max(settings.feasibility_tolerance, lowest), highest)
    if feastol != settings.feasibility_tolerance:
        logger.warning(
            "SCIP takes numerics/feastol in [%g, %g]: using %g, not %g",
            lowest,
            highest,
            feastol,
            settings.feasibility_tolerance,
        )
    # Applied after MPSolverParameters at solve time, so these win over OR-Tools' defaults
    # (its default primal tolerance, 1e-7, also sets numerics/feastol).
    scip_parameters = f"limits/absgap = {settings.mip_abs_gap!r}\nnumerics/feastol = {feastol!r}\n"
    if not solver.SetSolverSpecificParametersAsString(scip_parameters):
        # OR-Tools would solve anyway, with these parameters at their defaults: not exact.
        return f"SCIP rejected the parameters {scip_parameters!r}"
    return ""
