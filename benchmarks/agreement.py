"""The exact engine's acceptance check on rejected Loan people, every backend side by side.

Run:  python benchmarks/agreement.py --n 200
For each classifier (lr, mlp) and cost profile (l1, carma), the first ``--n`` rejected
people of a seeded population get constraints from the ``mixed`` elicitation scheme
(locks, value bounds, rankings or scores, soft limits; models/elicitation.py) and are
solved by every backend. Printed per combination, as a Markdown table: how many people
every backend solved to optimality with the same cost (relative 1e-6), how many answers
verified through the exact causal model and classifier, moved a locked feature, or were
beaten by a brute-force grid (8 values per feature), and each backend's median time.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from instances import load_classifier, load_scm
from models.costs import CostProfile
from models.elicitation import PreferenceElicitor
from models.preferences import parse_constraints
from solver.backends import available_backends
from solver.engine import EngineOptions, RecourseSolver
from solver.milp import SolverSettings, SolveStatus

RELATIVE = 1e-6


def check(kind: str, cost_kind: str, n: int, backends: list[str], seed: int, limit: float) -> str:
    scm = load_scm("loan")
    clf = load_classifier("loan", kind)
    x, _ = scm.sample(40 * n + 200, seed)
    people = x[~clf.accepts(x)][:n]
    elicitor = PreferenceElicitor(scm, "mixed", seed)
    cost = CostProfile.for_model(cost_kind, scm, clf)
    settings = SolverSettings(time_limit=limit)
    solvers = {b: RecourseSolver(scm, clf, cost, backend=b, settings=settings) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    statuses: dict[str, dict[str, int]] = {b: {} for b in backends}
    agree = verified = answers = locked_moved = grid_beaten = infeasible = 0
    for i, person in enumerate(people):
        constraints = parse_constraints(elicitor.constraints(i, person), scm)
        results = {}
        for backend, solver in solvers.items():
            start = time.perf_counter()
            results[backend] = solver.solve(person, constraints)
            times[backend].append(time.perf_counter() - start)
            status = str(results[backend].status)
            statuses[backend][status] = statuses[backend].get(status, 0) + 1
        reference = results[backends[0]]
        if all(r.status is SolveStatus.INFEASIBLE for r in results.values()):
            agree, infeasible = agree + 1, infeasible + 1
            continue
        if all(
            r.status is SolveStatus.OPTIMAL
            and r.cost is not None
            and abs(r.cost - reference.cost) <= RELATIVE * max(1e-3, abs(reference.cost))
            for r in results.values()
        ):
            agree += 1
        for r in results.values():
            if r.cost is None:
                continue
            answers += 1
            verified += r.verified
            locked_moved += bool(set(r.action) & constraints.locks)
        grid = solvers[backends[0]].grid_oracle(
            person, constraints, values_per_feature=8, logit_margin=EngineOptions().margin
        )
        if grid is not None and reference.cost is not None:
            grid_beaten += reference.cost > grid.cost + 1e-7 * (1 + grid.cost)
    medians = ", ".join(f"{b} {1000 * np.median(times[b]):.1f}" for b in backends)
    counts = "; ".join(
        f"{b}: " + ", ".join(f"{s} {c}" for s, c in sorted(statuses[b].items())) for b in backends
    )
    return (
        f"| {kind} | {cost_kind} | {len(people)} | {agree}/{len(people)} ({infeasible} without "
        f"recourse) | {verified}/{answers} | {locked_moved} | {grid_beaten} | {medians} "
        f"| {counts} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--classifiers", default="lr,mlp")
    parser.add_argument("--costs", default="l1,carma")
    parser.add_argument("--backends", default=",".join(available_backends()))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--time-limit", type=float, default=300.0)
    args = parser.parse_args()
    backends = args.backends.split(",")
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}, "
        f"backends {backends}, time limit {args.time_limit:g} s per person"
    )
    print(
        "| classifier | cost | people | all backends optimal, same cost | verified "
        "| locked moved | beaten by grid | median ms per backend | statuses |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.classifiers.split(","):
        for cost_kind in args.costs.split(","):
            print(check(kind, cost_kind, args.n, backends, args.seed, args.time_limit), flush=True)


if __name__ == "__main__":
    main()
