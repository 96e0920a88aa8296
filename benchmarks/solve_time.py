"""Median time per rejected person: exact MILP per backend vs a brute-force grid oracle.

Run:  python benchmarks/solve_time.py --n-lr 100 --n-mlp 20 [--dataset gsmc]
Prints a Markdown table (median / 90th percentile / max ms per person, share optimal and
verified, mean cost) and the grid oracle (CARMA's M*: 15 values per feature) on the same
people, side by side in one run. No personal constraints (universal actionability), L1 and
carma costs.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from instances import DATASETS, load_classifier, load_scm
from models.costs import CostProfile
from models.preferences import parse_constraints
from solver.backends import available_backends
from solver.engine import RecourseSolver
from solver.milp import SolveStatus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="loan", choices=DATASETS)
    parser.add_argument("--n-lr", type=int, default=100)
    parser.add_argument("--n-mlp", type=int, default=20)
    parser.add_argument("--costs", default="l1,carma")
    parser.add_argument("--backends", default=",".join(available_backends()))
    parser.add_argument("--mlp-backends", default="highs")
    parser.add_argument("--grid-values", type=int, default=15)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    scm = load_scm(args.dataset)
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        "| classifier | cost | method | n | median ms | p90 ms | max ms "
        "| optimal+verified | mean cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, n, backends in (
        ("lr", args.n_lr, args.backends.split(",")),
        ("mlp", args.n_mlp, args.mlp_backends.split(",")),
    ):
        clf = load_classifier(args.dataset, kind)
        x, _ = scm.sample(20 * n + 200, args.seed)
        people = x[~clf.accepts(x)][:n]
        constraints = parse_constraints({}, scm)
        for cost_kind in args.costs.split(","):
            cost = CostProfile.for_model(cost_kind, scm, clf)
            for backend in backends:
                solver = RecourseSolver(scm, clf, cost, backend=backend)
                times, good, costs = [], 0, []
                for person in people:
                    result = solver.solve(person, constraints)
                    times.append(result.solver.runtime_seconds)
                    good += result.status is SolveStatus.OPTIMAL and result.verified
                    costs.append(result.cost if result.cost is not None else np.nan)
                row(kind, cost_kind, f"MILP {backend}", times, good, costs)
            times, good, costs = [], 0, []
            for person in people:
                start = time.perf_counter()
                found = solver.grid_oracle(person, constraints, values_per_feature=args.grid_values)
                times.append(time.perf_counter() - start)
                good += found is not None
                costs.append(found.cost if found is not None else np.nan)
            row(kind, cost_kind, f"grid oracle ({args.grid_values} values)", times, good, costs)


def row(kind: str, cost: str, method: str, times: list, good: int, costs: list) -> None:
    ms = 1000 * np.array(times)
    print(
        f"| {kind} | {cost} | {method} | {len(ms)} | {np.median(ms):.1f} | "
        f"{np.percentile(ms, 90):.1f} | {ms.max():.1f} | {good}/{len(ms)} "
        f"| {np.nanmean(costs):.4f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
