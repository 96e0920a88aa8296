"""Reference methods the benchmark compares the exact engine with.

Both answer like :class:`~solver.engine.RecourseSolver` (``solve(x, constraints)`` returns
a :class:`~solver.result.RecourseResult`) and both are verified the same way: through the
full causal model and the real classifier, with every hard constraint of the person.

- :class:`NonCausalSolver`: the cheapest action in a world without causal effects (each
  edited feature moves nothing else), the assumption of non-causal counterfactual
  explanations. It is optimal in that world; whether it still flips the decision once
  the real world responds is what verification reports.
- :class:`GridOracleSolver`: CARMA's brute-force oracle M*: every combination of "leave
  it" or one of ``values_per_feature`` evenly spaced values per feature the person may act
  on, simulated through the causal model; the cheapest valid one. Only optimal on its
  grid; ``not_found`` when no grid point is valid (which proves nothing).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import PersonConstraints
from models.scm import StructuralCausalModel
from solver.engine import RecourseSolver
from solver.milp import FloatArray, SolverSettings, SolveStatus
from solver.result import RecourseResult, SolverInfo
from solver.verify import verify_action

GRID_VALUES = 15
"""Values per feature of the grid oracle (CARMA's M*)."""


class NonCausalSolver:
    """Exact recourse in the world without causal effects, checked in the real one."""

    def __init__(
        self,
        scm: StructuralCausalModel,
        classifier: Classifier,
        cost: CostProfile,
        *,
        backend: str,
        settings: SolverSettings | None = None,
    ) -> None:
        self.scm, self.classifier, self.cost = scm, classifier, cost
        self._independent = RecourseSolver(
            scm.independent(), classifier, cost, backend=backend, settings=settings
        )

    def solve(self, x: FloatArray, constraints: PersonConstraints) -> RecourseResult:
        start = time.perf_counter()
        x = np.asarray(x, dtype=float)
        result = self._independent.solve(x, constraints)
        if result.counterfactual is None or not result.action:
            return dataclasses.replace(result, answered_by="non-causal")
        names = self.scm.names
        intervene = np.array([name in result.action for name in names])
        values = np.array([result.action.get(name, x[k]) for k, name in enumerate(names)])
        noise = self.scm.abduct_noise(x[None, :])[0]
        check = verify_action(
            self.scm, self.classifier, self.cost, x, noise, constraints, intervene, values
        )
        seconds = result.solver.runtime_seconds + time.perf_counter() - start
        return dataclasses.replace(
            result,
            counterfactual=dict(zip(names, map(float, check.counterfactual), strict=True)),
            probability=check.probability,
            verified=check.verified,
            verification_failures=check.failures,
            solver=dataclasses.replace(result.solver, runtime_seconds=seconds),
            answered_by="non-causal",
            message="optimal where edits move no other feature; checked in the causal model",
        )


class GridOracleSolver:
    """CARMA's M*: the cheapest valid action on a grid, simulated in the causal model."""

    def __init__(
        self,
        scm: StructuralCausalModel,
        classifier: Classifier,
        cost: CostProfile,
        *,
        values_per_feature: int = GRID_VALUES,
    ) -> None:
        self.scm, self.classifier, self.cost = scm, classifier, cost
        self.values_per_feature = values_per_feature
        # The engine supplies each person's ranges and abduction; no MILP is solved.
        self._engine = RecourseSolver(scm, classifier, cost, backend="highs")

    def solve(self, x: FloatArray, constraints: PersonConstraints) -> RecourseResult:
        start = time.perf_counter()
        scm, clf = self.scm, self.classifier
        x = np.asarray(x, dtype=float)
        row = scm.named(x)
        factual_probability = float(clf.probability(x[None, :])[0])
        found = self._engine.grid_oracle(x, constraints, values_per_feature=self.values_per_feature)
        seconds = time.perf_counter() - start
        info = SolverInfo(
            f"grid-oracle-{self.values_per_feature}", "", seconds, 0.0, None, solves=0
        )
        if found is None:
            return RecourseResult.without_action(
                SolveStatus.NOT_FOUND,
                row,
                factual_probability,
                info,
                "no point of the grid makes the classifier accept",
                constraints.to_dict(),
                answered_by="grid-oracle",
            )
        noise = scm.abduct_noise(x[None, :])[0]
        check = verify_action(
            scm, clf, self.cost, x, noise, constraints, found.intervene, found.values
        )
        return RecourseResult(
            status=SolveStatus.FEASIBLE,
            factual=row,
            action={scm.names[k]: float(found.values[k]) for k in np.flatnonzero(found.intervene)},
            counterfactual=scm.named(check.counterfactual),
            cost=check.cost,
            probability=check.probability,
            factual_probability=factual_probability,
            verified=check.verified,
            verification_failures=check.failures,
            solver=dataclasses.replace(info, runtime_seconds=time.perf_counter() - start),
            message=f"cheapest valid action of {found.candidates} grid points",
            constraints=constraints.to_dict(),
            answered_by="grid-oracle",
        )
