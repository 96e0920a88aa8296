"""The backend contract on small MILPs whose optima were worked out by hand.

Every backend must return the same status, solution and objective; the HiGHS backend is
checked too once ``solver.backends.highs`` exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from solver.backends.base import Backend
from solver.backends.ortools import OrToolsBackend
from solver.backends.pyomo import PyomoBackend, export_model
from solver.milp import NumericMILP, SolverSettings, SolveStatus

try:
    from solver.backends.highs import HighsBackend
except ImportError:
    HighsBackend = None

INF = np.inf
SETTINGS = SolverSettings(time_limit=10.0)

BACKENDS: dict[str, type[Backend] | None] = {
    "highs": HighsBackend,
    "ortools": OrToolsBackend,
    "pyomo": PyomoBackend,
}


def make_milp(
    dense: list[list[float]],
    row_lower: list[float],
    row_upper: list[float],
    objective: list[float],
    col_lower: list[float],
    col_upper: list[float],
    integer: list[bool],
    objective_offset: float = 0.0,
    col_names: tuple[str, ...] | None = None,
) -> NumericMILP:
    """A NumericMILP from a dense constraint matrix (CSR arrays computed here)."""
    matrix = np.asarray(dense, dtype=np.float64)
    num_rows, num_cols = matrix.shape
    rows, cols = np.nonzero(matrix)  # row-major order: exactly the CSR order
    row_start = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=num_rows))))
    return NumericMILP(
        col_names=col_names or tuple(f"x{j}" for j in range(num_cols)),
        col_lower=np.asarray(col_lower, dtype=np.float64),
        col_upper=np.asarray(col_upper, dtype=np.float64),
        objective=np.asarray(objective, dtype=np.float64),
        integer=np.asarray(integer, dtype=np.bool_),
        row_names=tuple(f"r{i}" for i in range(num_rows)),
        row_lower=np.asarray(row_lower, dtype=np.float64),
        row_upper=np.asarray(row_upper, dtype=np.float64),
        row_start=row_start.astype(np.int64),
        col_index=cols.astype(np.int64),
        values=matrix[rows, cols],
        objective_offset=objective_offset,
    )


def knapsack() -> NumericMILP:
    """Binary knapsack: max 10a + 13b + 7c + 8d s.t. 4a + 6b + 3c + 5d <= 10.

    Weight-feasible pairs: ab 23, bc 20, ad 18, ac 17, cd 15; no triple fits. Unique
    optimum a = b = 1 with value 23, i.e. objective -23 as a minimisation.
    """
    return make_milp(
        [[4, 6, 3, 5]],
        [-INF],
        [10],
        [-10, -13, -7, -8],
        [0] * 4,
        [1] * 4,
        [True] * 4,
        col_names=("buy_a", "buy_b", "buy_c", "buy_d"),
    )


def parity_infeasible() -> NumericMILP:
    """2x + 2y = 3 over integers in [0, 10]: the LP relaxation is feasible, the MILP not."""
    return make_milp([[2, 2]], [3], [3], [1, 1], [0, 0], [10, 10], [True, True])


def offset_ranged_free() -> NumericMILP:
    """Objective offset, ranged rows binding on either side, and a free column.

    min x + y - 0.5 w + 2 with x in {0..10}, y free, w in [0, 4]; rows
    1.5 <= 2x + y <= 7.5, y <= 3, 2 <= x + w <= 12.

    y = 1.5 - 2x (the ranged row's lower side binds), so the objective is
    3.5 - x - 0.5 w: maximise x + 0.5 w under x + w <= 12 (upper side binds), x <= 10:
    x = 10, w = 2, y = -18.5, objective 3.5 - 10 - 1 = -7.5.
    """
    return make_milp(
        [[2, 1, 0], [0, 1, 0], [1, 0, 1]],
        [1.5, -INF, 2],
        [7.5, 3, 12],
        [1, 1, -0.5],
        [0, -INF, 0],
        [10, INF, 4],
        [True, False, False],
        objective_offset=2.0,
    )


def fractional_relaxation(integer: bool = True) -> NumericMILP:
    """A mixed program whose LP relaxation is fractional and far from the integer optimum.

    min -y + 0.1x + 0.2z with x, y integer >= 0, z in [0, 10] continuous; rows
    -x + y <= 1, 3x + 2y <= 12, 2x + 3y <= 12, z - x >= 0.3.

    z = x + 0.3, so the objective is -y + 0.3x + 0.06. LP optimum at the vertex
    -x + y = 1, 2x + 3y = 12: x = 1.8, y = 2.8, objective -2.2. Integers: y = 3 needs
    x >= 2 and 2x <= 3 (none); y = 2 needs 1 <= x <= 2, best x = 1: -1.64; y = 1: -0.94.
    Unique optimum x = 1, y = 2, z = 1.3, objective -1.64.
    """
    return make_milp(
        [[-1, 1, 0], [3, 2, 0], [2, 3, 0], [-1, 0, 1]],
        [-INF, -INF, -INF, 0.3],
        [1, 12, 12, INF],
        [0.1, -1, 0.2],
        [0, 0, 0],
        [INF, INF, 10],
        [integer, integer, False],
    )


def binaries_with_a_pure_row(at_least: float = -INF) -> NumericMILP:
    """Three binaries a, b, c and w in [0, 5]: min -3a - 2b - c + w with rows
    at_least <= a + b + c, a + b <= 1 (on integer columns only), w - 0.5 c >= 0.5.

    w = 0.5 c + 0.5, so the objective is -3a - 2b - 0.5c + 0.5; without the pure row a = b
    = 1 would win. With it: a = 1, b = 0, c = 1, w = 1, objective -3 (unique). With
    ``at_least`` 3 no assignment satisfies both pure rows: infeasible.
    """
    return make_milp(
        [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, -0.5, 1]],
        [at_least, -INF, 0.5],
        [INF, 1, INF],
        [-3, -2, -1, 1],
        [0, 0, 0, 0],
        [1, 1, 1, 5],
        [True, True, True, False],
    )


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    backend_class = BACKENDS[request.param]
    if backend_class is None:
        pytest.skip(f"solver.backends.highs.HighsBackend does not exist yet ({request.param})")
    if not backend_class.available():
        pytest.skip(f"{request.param} backend is not available here")
    return backend_class()


def assert_optimal(
    backend: Backend, milp: NumericMILP, objective: float, solution: list[float]
) -> None:
    """Solve ``milp`` and check the status, objective, solution and bound."""
    result = backend.solve(milp, SETTINGS)
    assert result.status is SolveStatus.OPTIMAL, result.message
    assert result.objective == pytest.approx(objective, abs=1e-7)
    assert result.solution is not None
    np.testing.assert_allclose(result.solution, solution, atol=1e-7)
    assert result.bound == pytest.approx(objective, abs=1e-7)
    assert result.runtime_seconds > 0


def test_version_names_the_solver(backend: Backend) -> None:
    assert backend.version()


def test_knapsack_unique_optimum(backend: Backend) -> None:
    assert_optimal(backend, knapsack(), -23.0, [1, 1, 0, 0])


def test_infeasible_has_no_solution(backend: Backend) -> None:
    result = backend.solve(parity_infeasible(), SETTINGS)
    assert result.status is SolveStatus.INFEASIBLE, result.message
    assert result.solution is None
    assert result.objective is None


def test_rows_on_binaries_only_exclude_assignments(backend: Backend) -> None:
    # HiGHS enumerates these three binaries as LPs, skipping the excluded assignments.
    assert_optimal(backend, binaries_with_a_pure_row(), -3.0, [1, 0, 1, 1])
    result = backend.solve(binaries_with_a_pure_row(at_least=3), SETTINGS)
    assert result.status is SolveStatus.INFEASIBLE, result.message
    assert result.solution is None


def test_offset_ranged_row_and_free_column(backend: Backend) -> None:
    assert_optimal(backend, offset_ranged_free(), -7.5, [10, -18.5, 2])


def test_integer_optimum_differs_from_fractional_relaxation(backend: Backend) -> None:
    assert_optimal(backend, fractional_relaxation(integer=False), -2.2, [1.8, 2.8, 2.1])
    assert_optimal(backend, fractional_relaxation(), -1.64, [1, 2, 1.3])


@pytest.mark.parametrize("suffix", [".lp", ".mps"])
def test_pyomo_export_names_columns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"knapsack{suffix}"
    export_model(knapsack(), path)
    text = path.read_text()
    for name in knapsack().col_names:
        assert name in text


@pytest.mark.parametrize(
    "make_path",
    [lambda tmp: tmp / "model.txt", lambda tmp: tmp / "model"],
    ids=["txt", "none"],
)
def test_pyomo_export_rejects_other_extensions(
    tmp_path: Path, make_path: Callable[[Path], Path]
) -> None:
    path = make_path(tmp_path)
    expected = r"'\.txt'" if path.suffix else "without extension"
    with pytest.raises(ValueError, match=expected):
        export_model(knapsack(), path)
    assert not path.exists()
