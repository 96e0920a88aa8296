"""What the engine returns for one person."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from solver.milp import SolveStatus


@dataclass(frozen=True)
class SolverInfo:
    name: str
    version: str
    runtime_seconds: float
    """Wall time of the whole answer: incumbent search, building, solving, verifying."""
    solve_seconds: float
    """Time spent inside the MILP solver."""
    gap: float | None
    """Absolute gap between the returned cost and the proven lower bound (0: optimal)."""
    solves: int = 1
    """MILP solves behind the answer (cut rounds of the squared cost, verification repairs)."""
    incumbent_cost: float | None = None
    """Cost of the grid action that bounded the search box, if one was found."""


@dataclass(frozen=True)
class RecourseResult:
    """A recourse answer: status, action, counterfactual, cost, probability, verification."""

    status: SolveStatus
    factual: dict[str, float]
    action: dict[str, float]
    """Feature -> new value, for the intervened features only."""
    counterfactual: dict[str, float] | None
    cost: float | None
    """The action's cost under the person's cost profile, recomputed exactly."""
    probability: float | None
    """The classifier's probability for the counterfactual (exact causal model)."""
    factual_probability: float
    verified: bool
    verification_failures: tuple[str, ...]
    solver: SolverInfo
    cost_bound: float | None = None
    """Proven lower bound on the optimal cost (equals ``cost`` when the gap is 0)."""
    interpolation_error: float = 0.0
    """Largest error of piecewise-linear terms of the causal model (0 when all exact)."""
    message: str = ""
    constraints: dict[str, Any] = field(default_factory=dict)
    answered_by: str = "milp"
    """``milp`` (the exact engine), or for amortized answers ``amortizer``, ``mask-repair``
    (the exact MILP over the predicted features) or ``milp-repair`` (the full MILP); for
    the benchmark's reference methods ``non-causal`` or ``grid-oracle``."""

    @classmethod
    def without_action(
        cls,
        status: SolveStatus,
        factual: dict[str, float],
        factual_probability: float,
        solver: SolverInfo,
        message: str,
        constraints: dict[str, Any],
        answered_by: str = "milp",
    ) -> RecourseResult:
        """An answer with no action to return (none exists, none found, or an error)."""
        return cls(
            status=status,
            factual=factual,
            action={},
            counterfactual=None,
            cost=None,
            probability=None,
            factual_probability=factual_probability,
            verified=False,
            verification_failures=(),
            solver=solver,
            message=message,
            constraints=constraints,
            answered_by=answered_by,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["verification_failures"] = list(self.verification_failures)
        return data

    def __repr__(self) -> str:
        changes = ", ".join(f"{k}={v:.4g}" for k, v in self.action.items()) or "none"
        cost = "-" if self.cost is None else f"{self.cost:.6g}"
        return (
            f"RecourseResult(status={self.status.value}, action=[{changes}], cost={cost}, "
            f"verified={self.verified})"
        )
