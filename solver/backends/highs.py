"""HiGHS through highspy: the default backend.

One ``Highs`` object per backend instance for MIPs. When the next program has the same
``pattern_key`` (same person-independent structure), only the numbers that changed are
passed: column and row bounds, costs, and the coefficients whose value moved. HiGHS
presolve then removes what the new bounds fix (stable neurons, locked features). A
program whose integer columns are all fixed by their bounds but for a few binaries is
solved as one LP per assignment of those, by a second ``Highs`` object that gets each
program whole (so that its answer does not depend on the programs solved before); an
assignment that violates a row on integer columns only gets no LP.
"""

from __future__ import annotations

import functools
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


# A program whose integer columns are all fixed by their bounds but for at most this many
# binaries is solved as one LP per assignment of those binaries (exact: the best
# assignment is the optimum). The MIP machinery costs a few milliseconds even then
# (presolve, cut separation): Loan-MLP mask MILPs with at most 3 free binaries took a
# median 5.1 ms as a MIP and 2.3 ms as LPs, with the same optima to 1e-8.
_ENUMERATED_BINARIES = 3


@functools.cache
def _assignments(count: int) -> tuple[np.ndarray, ...]:
    """Every 0/1 assignment of ``count`` binaries, as bound arrays for ``changeColsBounds``,
    in Gray-code order: each differs from the one before in one binary, so the last basis
    is closer to the next optimum (measured: 2% less time per Loan-LR person)."""
    codes = [i ^ (i >> 1) for i in range(2**count)]
    return tuple(
        np.array([float(code >> (count - 1 - bit) & 1) for bit in range(count)]) for code in codes
    )


class HighsBackend(Backend):
    """HiGHS MIP solver, one thread, gaps 0, model kept between solves of one pattern."""

    name = "highs"
    enumerated_binaries = _ENUMERATED_BINARIES

    def __init__(self, heuristics: bool = False) -> None:
        if highspy is None:
            raise RuntimeError("highspy is not installed: pip install highspy")
        mip = highspy.Highs()
        # The process-wide scheduler keeps the first thread count it sees: set 1 first.
        mip.setOptionValue("threads", 1)
        mip.setOptionValue("output_flag", False)
        for option, value in _SEARCH.items():
            mip.setOptionValue(option, value)
        if not heuristics:
            for option, value in _HEURISTICS_OFF.items():
                mip.setOptionValue(option, value)
        self._mip = _KeptModel(mip, relaxed=False)
        lp = highspy.Highs()
        lp.setOptionValue("threads", 1)
        lp.setOptionValue("output_flag", False)
        # The LPs of one program differ in a few bounds: the last basis beats a presolve.
        lp.setOptionValue("presolve", "off")
        # Scaling these small, well-conditioned LPs costs more than it saves: 8% less time
        # in the enumeration of Loan-LR programs (interleaved, 200 people, same optima).
        lp.setOptionValue("simplex_scale_strategy", 0)
        self._lp = _KeptModel(lp, relaxed=True)
        # Per program pattern: the rows on integer columns only (see _within_integer_rows).
        self._integer_rows: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
        self._settings: tuple[float, ...] | None = None

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
        self._apply(settings)
        free = self._free_binaries(milp)
        if free is not None:
            result = self._solve_by_enumeration(milp, free)
            if result is not None:
                return result
        h = self._mip.highs
        self._mip.load(milp)
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

    def _apply(self, settings: SolverSettings) -> None:
        for h in (self._mip.highs, self._lp.highs):
            h.setOptionValue("time_limit", float(settings.time_limit))
        rest = (
            settings.threads,
            settings.mip_rel_gap,
            settings.mip_abs_gap,
            settings.feasibility_tolerance,
        )
        if rest == self._settings:  # the same for every solve of one engine
            return
        mip, lp = self._mip.highs, self._lp.highs
        mip.setOptionValue("threads", settings.threads)
        mip.setOptionValue("mip_rel_gap", settings.mip_rel_gap)
        mip.setOptionValue("mip_abs_gap", settings.mip_abs_gap)
        mip.setOptionValue("mip_feasibility_tolerance", settings.feasibility_tolerance)
        # The LPs are held to the MIP's feasibility tolerance, and optimal as tightly.
        lp.setOptionValue("primal_feasibility_tolerance", settings.feasibility_tolerance)
        lp.setOptionValue("dual_feasibility_tolerance", settings.feasibility_tolerance)
        self._settings = rest

    @staticmethod
    def _free_binaries(milp: NumericMILP) -> np.ndarray | None:
        """The integer columns not fixed by their bounds, when they are few binaries whose
        fixed companions hold whole numbers; None otherwise."""
        lower, upper = milp.col_lower[milp.integer], milp.col_upper[milp.integer]
        free = lower < upper
        if np.count_nonzero(free) > _ENUMERATED_BINARIES:
            return None
        if not (np.all(lower[free] == 0.0) and np.all(upper[free] == 1.0)):
            return None
        if not np.all(lower[~free] == np.round(lower[~free])):
            return None
        return np.flatnonzero(milp.integer)[free].astype(np.int32)

    def _solve_by_enumeration(self, milp: NumericMILP, free: np.ndarray) -> BackendResult | None:
        """The best of one LP per assignment of the ``free`` binaries; None (solve it as a
        MIP) when an LP ends other than optimal or infeasible (a time limit, say)."""
        h = self._lp.highs
        # Passed whole, with no basis: with ties, the vertex returned must not depend on
        # which program was solved before (labels are the same however they are chunked).
        self._lp.pass_model(milp)
        best: tuple[float, np.ndarray] | None = None
        runtime = 0.0
        assignments = _assignments(len(free))
        possible = self._within_integer_rows(milp, free, assignments)
        for fixed, row_feasible in zip(assignments, possible, strict=True):
            if not row_feasible:
                continue  # a row on integer columns only is violated: the LP is infeasible
            if len(free):
                h.changeColsBounds(len(free), free, fixed, fixed)
            start = time.perf_counter()
            h.run()
            runtime += time.perf_counter() - start
            status_name = h.getModelStatus().name
            if status_name in ("kInfeasible", "kUnboundedOrInfeasible"):
                continue
            if status_name != "kOptimal":
                return None
            objective = h.getObjectiveValue()
            if best is None or objective < best[0]:
                solution = np.array(h.getSolution().col_value)
                solution[free] = fixed
                best = (objective, solution)
        if best is None:
            return BackendResult(SolveStatus.INFEASIBLE, None, None, None, runtime, "kInfeasible")
        objective, solution = best
        return BackendResult(
            SolveStatus.OPTIMAL, solution, objective, objective, runtime, "kOptimal"
        )

    def _within_integer_rows(
        self, milp: NumericMILP, free: np.ndarray, assignments: tuple[np.ndarray, ...]
    ) -> np.ndarray:
        """Per assignment of the ``free`` binaries: whether the rows whose every entry is
        on an integer column (all fixed then) hold, with a margin far above the LPs'
        tolerances, so that only assignments whose LP is infeasible are left out."""
        rows = self._integer_rows.get(milp.pattern_key) if milp.pattern_key else None
        if rows is None:
            continuous = ~milp.integer[milp.col_index]
            row_of_entry = np.repeat(np.arange(milp.num_rows), np.diff(milp.row_start))
            rows = np.bincount(row_of_entry, weights=continuous, minlength=milp.num_rows) == 0
            rows = (row_of_entry, rows[row_of_entry], np.flatnonzero(rows))
            if milp.pattern_key:
                self._integer_rows[milp.pattern_key] = rows
        row_of_entry, on_integer_rows, integer_rows = rows
        if not len(integer_rows):
            return np.ones(len(assignments), dtype=bool)
        values = np.repeat(milp.col_lower[None, :], len(assignments), axis=0)
        values[:, free] = assignments
        entries = np.flatnonzero(on_integer_rows)
        contributions = values[:, milp.col_index[entries]] * milp.values[entries]
        activity = np.zeros((len(assignments), milp.num_rows))
        np.add.at(activity.T, row_of_entry[entries], contributions.T)
        activity = activity[:, integer_rows]
        lower, upper = milp.row_lower[integer_rows], milp.row_upper[integer_rows]
        margin = 1e-6 * (1 + np.abs(activity))
        return np.all((activity >= lower - margin) & (activity <= upper + margin), axis=1)


class _KeptModel:
    """One Highs object and the program it holds: :meth:`load` passes a program with the
    same ``pattern_key`` as the last one by its bounds, costs and changed coefficients
    only. ``relaxed``: every column continuous (the enumeration's LPs)."""

    def __init__(self, highs: Any, relaxed: bool) -> None:
        self.highs, self.relaxed = highs, relaxed
        self.loaded: NumericMILP | None = None
        self.entry_rows: np.ndarray | None = None

    def load(self, milp: NumericMILP) -> None:
        h = self.highs
        previous = self.loaded
        if previous is None or previous.pattern_key != milp.pattern_key or not milp.pattern_key:
            self.pass_model(milp)
            self.entry_rows = np.repeat(np.arange(milp.num_rows), np.diff(milp.row_start))
            return
        cols = np.arange(milp.num_cols, dtype=np.int32)
        h.changeColsBounds(milp.num_cols, cols, milp.col_lower, milp.col_upper)
        h.changeColsCost(milp.num_cols, cols, milp.objective)
        rows = np.arange(milp.num_rows, dtype=np.int32)
        h.changeRowsBounds(milp.num_rows, rows, milp.row_lower, milp.row_upper)
        changed = np.flatnonzero(milp.values != previous.values)
        assert self.entry_rows is not None
        for entry in changed:
            h.changeCoeff(
                int(self.entry_rows[entry]), int(milp.col_index[entry]), float(milp.values[entry])
            )
        self.loaded = milp

    def pass_model(self, milp: NumericMILP) -> None:
        h = self.highs
        h.clearModel()
        # The array form of passModel: filling a HighsLp field by field took 3x longer.
        integrality = np.zeros(milp.num_cols, dtype=np.int32)
        if not self.relaxed:
            integrality[milp.integer] = int(highspy.HighsVarType.kInteger)
        status = h.passModel(
            milp.num_cols,
            milp.num_rows,
            len(milp.values),
            int(highspy.MatrixFormat.kRowwise),
            int(highspy.ObjSense.kMinimize),
            milp.objective_offset,
            milp.objective,
            milp.col_lower,
            milp.col_upper,
            milp.row_lower,
            milp.row_upper,
            milp.row_start.astype(np.int32),
            milp.col_index.astype(np.int32),
            milp.values,
            integrality,
        )
        if status == highspy.HighsStatus.kError:
            raise RuntimeError("HiGHS refused the program (passModel returned an error)")
        self.loaded = milp
