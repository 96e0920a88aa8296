"""A numeric mixed-integer linear program, the one thing every backend consumes.

The formulation (``solver.formulation``) turns a causal model, a classifier and one
person's constraints into a :class:`NumericMILP`; a backend solves it and returns a
:class:`BackendResult`. Backends never see the causal model: they only solve.

Two programs built by the same formulation for different people share their
``pattern_key``: the same columns, the same rows and the same sparsity pattern, so a
backend may keep its model and update only bounds, costs and coefficient values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class SolveStatus(enum.StrEnum):
    """Outcome of one solve, for a backend and for the recourse answer."""

    OPTIMAL = "optimal"
    """Solved to proven optimality (relative and absolute gap 0)."""
    FEASIBLE = "feasible"
    """A verified action, not proven optimal: an amortized answer or its repair on the
    predicted features."""
    NOT_FOUND = "not_found"
    """A heuristic (the grid oracle) found no valid action; none is proven not to exist."""
    INFEASIBLE = "infeasible"
    """Proven infeasible: no recourse exists under this person's constraints."""
    TIME_LIMIT = "time_limit"
    """Stopped by the time limit; the best solution found so far, if any, is returned."""
    ERROR = "error"
    """The solver failed or returned something that cannot be trusted."""
    UNKNOWN = "unknown"
    """The backend returned a status this project does not map; logged as a warning."""


@dataclass(frozen=True, eq=False)
class NumericMILP:
    """min c.x subject to row_lower <= A x <= row_upper, col_lower <= x <= col_upper.

    ``A`` is stored row-wise (CSR: ``row_start``, ``col_index``, ``values``). Infinite
    bounds are ``np.inf``. ``integer[j]`` marks integer columns (binaries are integer
    columns with bounds [0, 1]).
    """

    col_names: tuple[str, ...]
    col_lower: FloatArray
    col_upper: FloatArray
    objective: FloatArray
    integer: BoolArray
    row_names: tuple[str, ...]
    row_lower: FloatArray
    row_upper: FloatArray
    row_start: IntArray
    col_index: IntArray
    values: FloatArray
    objective_offset: float = 0.0
    pattern_key: tuple[int, ...] = field(default=(), compare=False)
    """Equal for programs with identical columns, rows and sparsity pattern."""

    @property
    def num_cols(self) -> int:
        return len(self.col_names)

    @property
    def num_rows(self) -> int:
        return len(self.row_names)

    def row_entries(self, row: int) -> tuple[IntArray, FloatArray]:
        """Column indices and coefficients of one row."""
        start, end = self.row_start[row], self.row_start[row + 1]
        return self.col_index[start:end], self.values[start:end]

    def to_dense(self) -> FloatArray:
        """The constraint matrix as a dense array (for tests and small exports)."""
        dense = np.zeros((self.num_rows, self.num_cols))
        for row in range(self.num_rows):
            cols, vals = self.row_entries(row)
            np.add.at(dense[row], cols, vals)
        return dense


@dataclass(frozen=True)
class BackendResult:
    """What a backend returns: a status, and a solution when it has one."""

    status: SolveStatus
    solution: FloatArray | None
    objective: float | None
    bound: float | None
    """Best proven lower bound on the objective (equal to ``objective`` when optimal)."""
    runtime_seconds: float
    message: str = ""

    @property
    def gap(self) -> float | None:
        """Absolute gap between the solution found and the proven bound."""
        if self.objective is None or self.bound is None:
            return None
        return max(0.0, self.objective - self.bound)


@dataclass(frozen=True)
class SolverSettings:
    """Settings every backend honours."""

    time_limit: float = 60.0
    """Seconds for one person: every solve behind one answer shares it."""
    threads: int = 1
    mip_rel_gap: float = 0.0
    mip_abs_gap: float = 0.0
    feasibility_tolerance: float = 1e-9
