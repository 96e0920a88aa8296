"""The contract a solver backend fulfils: available(), version(), solve()."""

from __future__ import annotations

import abc

from solver.milp import BackendResult, NumericMILP, SolverSettings


class BackendUnavailableError(RuntimeError):
    """The backend's solver library is not installed or cannot run here."""


class Backend(abc.ABC):
    """A MILP solver. One instance per process; it may cache a model between solves."""

    name: str = ""
    enumerated_binaries: int = 0
    """A program with at most this many free binaries is solved as one LP per assignment
    (cheap next to a MIP's fixed costs): the engine may then leave such choices to it."""

    @classmethod
    @abc.abstractmethod
    def available(cls) -> bool:
        """Whether the solver library can be imported and run."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """The solver's version string, or '' when unavailable."""

    @abc.abstractmethod
    def solve(self, milp: NumericMILP, settings: SolverSettings) -> BackendResult:
        """Solve ``milp`` to optimality (gap settings in ``settings``) or the time limit."""
