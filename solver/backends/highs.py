"""HiGHS through highspy: the default backend.

One ``Highs`` object per backend instance. When the next program has the same
``pattern_key`` (same person-independent structure), only the numbers that changed are
passed: column and row bounds, costs, and the coefficients whose value moved. HiGHS
presolve then removes what the new bounds fix (stable neurons, locked features).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from solver.backends.base import Backend
from solver.milp import BackendResult, NumericMILP, SolverSettings, SolveStatus

try:
    import highspy
except ImportError:  # pragma: no cover - highspy is a dependency, but report it cleanly
    highspy = None

log = logging.getLogger(__name__)

_STATUS: dict[str, SolveStatus] = {
    "kOptimal": SolveStatus.OPTIMAL,
    "kModelEmpty": SolveStatus.OPTIMAL,
    "kInfeasible": SolveStatus.INFEASIBLE,
    # Recourse programs are bounded below (costs >= 0); HiGHS says this when presolve
    # finds no feasible point without telling which.
    "kUnboundedOrInfeasible": SolveStatus.INFEASIBLE,
    "kTimeLimit": SolveStatus.TIME_LIMIT,
    "kInterrupt": SolveStatus.TIME_LIMIT,
    "kHighsInterrupt": SolveStatus.TIME_LIMIT,
    "kNotset": SolveStatus.ERROR,
    "kLoadError": SolveStatus.ERROR,
    "kModelError": SolveStatus.ERROR,
    "kPresolveError": SolveStatus.ERROR,
    "kSolveError": SolveStatus.ERROR,
    "kPostsolveError": SolveStatus.ERROR,
    "kUnbounded": SolveStatus.ERROR,
    "kMemoryLimit": SolveStatus.ERROR,
    "kIterationLimit": SolveStatus.TIME_LIMIT,
    "kSolutionLimit": SolveStatus.TIME_LIMIT,
}

# Primal heuristics cost more than they find on these small models (measured on a
# prototype: 3x faster on Loan-LR, optimum unchanged); an incumbent box replaces them.
_HEURISTICS_OFF = {
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_root_reduced_cost": False,
}
# Restarting the search after root presolve reductions cost 30% in total on ReLU
# classifiers (benchmarks/RESULTS.md) and did not help the small linear ones. Presolving
# again below the root spent most of a ReLU mask MILP's time for nothing: root-only
# presolve cut the median HiGHS time per Loan-MLP person 116 -> 70 ms (43 captured mask
# MILPs, same optima and infeasibilities); no change on Loan-LR.
_SEARCH = {"mip_allow_restart": False, "mip_root_presolve_only": True}


class HighsBackend(Backend):
    """HiGHS MIP solver, one thread, gaps 0, model kept between solves of one pattern."""

    name = "highs"

    def __init__(self, heuristics: bool = False) -> None:
        if highspy is None:
            raise RuntimeError("highspy is not installed: pip install highspy")
        self._highs = highspy.Highs()
        # The process-wide scheduler keeps the first thread count it sees: set 1 first.
        self._highs.setOptionValue("threads", 1)
        self._highs.setOptionValue("output_flag", False)
        for option, value in _SEARCH.items():
            self._highs.setOptionValue(option, value)
        if not heuristics:
            for option, value in _HEURISTICS_OFF.items():
                self._highs.setOptionValue(option, value)
        self._loaded: NumericMILP | None = None
        self._settings: tuple[float, ...] | None = None
        self._entry_rows: np.ndarray | None = None

    @classmethod
    def available(cls) -> bool:
        return highspy is not None

    @classmethod
    def version(cls) -> str:
        if highspy is None:
            return ""
        h = highspy.Highs()
        return f"{h.versionMajor()}.{h.versionMinor()}.{h.versionPatch()}"

    def solve(self, milp: NumericMILP, settings: SolverSettings) -> BackendResult:
        h = self._highs
        h.setOptionValue("time_limit", float(settings.time_limit))
        rest = (
            settings.threads,
            settings.mip_rel_gap,
            settings.mip_abs_gap,
            settings.feasibility_tolerance,
        )
        if rest != self._settings:  # the same for every solve of one engine
            h.setOptionValue("threads", settings.threads)
            h.setOptionValue("mip_rel_gap", settings.mip_rel_gap)
            h.setOptionValue("mip_abs_gap", settings.mip_abs_gap)
            h.setOptionValue("mip_feasibility_tolerance", settings.feasibility_tolerance)
            self._settings = rest
        self._load(milp)
        start = time.perf_counter()
        h.run()
        runtime = time.perf_counter() - start
        status_name = h.getModelStatus().name
        status = _STATUS.get(status_name)
        if status is None:
            log.warning("HiGHS returned status %s, which this backend does not map", status_name)
            status = SolveStatus.UNKNOWN
        info = h.getInfo()
        has_solution = info.primal_solution_status == 2 and status in (
            SolveStatus.OPTIMAL,
            SolveStatus.TIME_LIMIT,
        )
        solution = np.array(h.getSolution().col_value) if has_solution else None
        if milp.num_cols == 0 and status is SolveStatus.OPTIMAL:
            solution = np.zeros(0)
        objective = float(info.objective_function_value) if solution is not None else None
        bound = None
        if status is SolveStatus.OPTIMAL:
            bound = objective
        elif np.isfinite(info.mip_dual_bound):
            bound = float(info.mip_dual_bound)
        return BackendResult(status, solution, objective, bound, runtime, status_name)

    def _load(self, milp: NumericMILP) -> None:
        h = self._highs
        previous = self._loaded
        if previous is None or previous.pattern_key != milp.pattern_key or not milp.pattern_key:
            self._pass_model(milp)
            return
        cols = np.arange(milp.num_cols, dtype=np.int32)
        h.changeColsBounds(milp.num_cols, cols, milp.col_lower, milp.col_upper)
        h.changeColsCost(milp.num_cols, cols, milp.objective)
        rows = np.arange(milp.num_rows, dtype=np.int32)
        h.changeRowsBounds(milp.num_rows, rows, milp.row_lower, milp.row_upper)
        changed = np.flatnonzero(milp.values != previous.values)
        assert self._entry_rows is not None
        for entry in changed:
            h.changeCoeff(
                int(self._entry_rows[entry]), int(milp.col_index[entry]), float(milp.values[entry])
            )
        self._loaded = milp

    def _pass_model(self, milp: NumericMILP) -> None:
        h = self._highs
        h.clearModel()
        lp: Any = highspy.HighsLp()
        lp.num_col_ = milp.num_cols
        lp.num_row_ = milp.num_rows
        lp.col_cost_ = milp.objective
        lp.col_lower_ = milp.col_lower
        lp.col_upper_ = milp.col_upper
        lp.row_lower_ = milp.row_lower
        lp.row_upper_ = milp.row_upper
        lp.offset_ = milp.objective_offset
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = milp.row_start.astype(np.int32)
        lp.a_matrix_.index_ = milp.col_index.astype(np.int32)
        lp.a_matrix_.value_ = milp.values
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous
            for flag in milp.integer
        ]
        h.passModel(lp)
        self._loaded = milp
        self._entry_rows = np.repeat(np.arange(milp.num_rows), np.diff(milp.row_start)).astype(
            np.int64
        )
