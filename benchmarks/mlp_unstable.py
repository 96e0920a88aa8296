"""Why MLP recourse is slow: unstable neurons and solve time with a near-optimal budget.

Run:  python benchmarks/mlp_unstable.py --n 12
For each rejected Loan person (MLP classifier, L1 cost, no personal constraints): the
optimum from the engine, then one HiGHS solve with the incumbent budget set to 1.001 x
that optimum, printing the unstable neurons per hidden layer and the solve time.
"""

from __future__ import annotations

import argparse

import numpy as np

from instances import load_classifier, load_scm
from models.costs import CostProfile
from models.preferences import parse_constraints
from solver.engine import RecourseSolver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    scm, clf = load_scm("loan"), load_classifier("loan", "mlp")
    solver = RecourseSolver(scm, clf, CostProfile.for_model("l1", scm, clf))
    x, _ = scm.sample(40 * args.n, args.seed)
    constraints = parse_constraints({}, scm)
    print("| person | optimum | unstable per layer | solve ms with budget 1.001 x optimum |")
    print("|---|---|---|---|")
    for i, person in enumerate(x[~clf.accepts(x)][: args.n]):
        optimum = solver.solve(person, constraints).cost
        ctx = solver.formulation.context(person, constraints, cost_budget=optimum * 1.001)
        unstable = [int(np.sum((lo < 0) & (hi > 0))) for lo, hi in ctx.neuron_bounds[:-1]]
        outcome = solver.backend.solve(solver.formulation.instantiate(ctx), solver.settings)
        print(f"| {i} | {optimum:.4f} | {unstable} | {1000 * outcome.runtime_seconds:.0f} |")


if __name__ == "__main__":
    main()
