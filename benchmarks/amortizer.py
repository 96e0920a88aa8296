"""The amortizer against the exact MILP on held-out rejected people, per elicitation scheme.

Run:  python benchmarks/amortizer.py --dataset loan --classifier mlp --n-train 6000 \\
          --n-universal 3000 --n-test 300 --work /tmp/amortizer-bench

Steps, in one run (label tables go through the resumable label pipeline under ``--work``;
a complete table from an earlier run with the same arguments is reused, not re-solved):

1. exact labels: ``mixed`` elicitation on the first ``--n-train`` rejected people of seed
   0 (training), no constraints (``universal``) on the first ``--n-universal`` (training
   the universal model), and every scheme of ``--schemes`` on ``--n-test`` people of a
   different population (seed 1, held out; ``--n-test-mixed`` for the mixed scheme);
2. training: the personalized amortizer (constraint inputs) on the mixed labels, and the
   universal one (features only, CARMA's setting) on the universal labels;
3. per scheme, on the held-out people with an exact optimum (the infeasible ones, proven
   so by the MILP, have no answer to check):
   - raw validity: share of the amortizer's answers that verify (exact causal model and
     classifier, every hard constraint), before any repair;
   - validity after repair (mask-restricted MILP, then the full MILP): must be 100%;
   - cost ratio to the exact optimum per person (mean, 95th percentile) over raw-valid
     answers, and exact mask agreement (the same features acted on as the MILP);
   - the same raw validity and mean cost ratio with each person answered alone (batch
     size 1 takes the small-batch path, compiled, which also tries every candidate's
     corners);
   - time per person batched (the held-out people repeated to ``--batch`` rows, median
     of 3 runs), at batch size 1 (median over people, median of 3 passes), and the
     MILP's median time per person re-measured now on ``--n-milp`` of the same people
     (HiGHS, the default engine), and the speed-ups.
   The universal model is given the same personalized people: its output layer still
   enforces their hard constraints, but it cannot see them.

Prints Markdown tables and writes every figure to ``--work``/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from instances import load_classifier, load_scm
from models.amortizer import Amortizer
from models.costs import CostProfile
from models.elicitation import SCHEMES
from solver.amortized import AmortizedSolver, LabelData, read_labels, train_amortizer
from solver.engine import RecourseSolver
from solver.labels import LabelJob, run_job, sample_population
from solver.milp import SolveStatus


def labels(
    args: argparse.Namespace, scheme: str, seed: int, n: int, name: str
) -> tuple[LabelData, dict[str, Any]]:
    scm, clf = load_scm(args.dataset), load_classifier(args.dataset, args.classifier)
    out = args.work / f"{name}.parquet"
    job = LabelJob(args.dataset, args.classifier, scheme, args.cost, seed, "highs", 60.0)
    start = time.perf_counter()
    summary = run_job(job, sample_population(scm, clf, n, seed), out, jobs=args.jobs)
    info = {
        "path": str(out),
        "people": summary.people,
        "statuses": summary.statuses,
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "reused": summary.already_complete,
    }
    print(f"labels {name}: {info}", flush=True)
    return read_labels(out), info


def evaluate(
    amortizer: Amortizer, test: LabelData, exact: RecourseSolver, args: argparse.Namespace
) -> dict[str, Any]:
    solver = AmortizedSolver(amortizer, test.scm, test.classifier, exact=exact)
    batch = solver.predict(test.x, test.constraints)
    valid = batch.verified
    columns = amortizer.spec.actionable_columns
    ratio = batch.cost[valid] / test.cost[valid]
    agree = (batch.intervene[:, columns] == test.mask).all(axis=1)

    # Repair every failed answer; after it, every person must have a verified answer.
    failed = np.flatnonzero(~valid)
    people = [test.people[i] for i in failed]
    repaired = solver.solve(test.x[failed], people) if failed.size else []
    repaired_ok = sum(r.verified for r in repaired)
    paths: dict[str, int] = {}
    for result in repaired:
        paths[result.answered_by] = paths.get(result.answered_by, 0) + 1

    repeats = max(1, args.batch // len(test.x))
    rows = np.tile(np.arange(len(test.x)), repeats)
    big_x, big_c = test.x[rows], test.constraints.take(rows)
    batched = [solver.predict(big_x, big_c).seconds / len(rows) for _ in range(3)]
    # Three passes, one person at a time; time: the median of the passes' medians.
    passes = [
        [
            solver.predict(test.x[i : i + 1], test.constraints.take(np.array([i])))
            for i in range(len(test.x))
        ]
        for _ in range(3)
    ]
    alone = passes[0]
    alone_valid = np.array([answer.verified[0] for answer in alone])
    alone_cost = np.array([answer.cost[0] for answer in alone])
    return {
        "people": len(test.x),
        "raw_validity": float(valid.mean()),
        "validity_after_repair": float((valid.sum() + repaired_ok) / len(test.x)),
        "repair_paths": paths,
        "cost_ratio_mean": float(ratio.mean()),
        "cost_ratio_p95": float(np.percentile(ratio, 95)),
        "cost_ratio_median": float(np.median(ratio)),
        "mask_agreement": float(agree.mean()),
        "raw_validity_batch1": float(alone_valid.mean()),
        "cost_ratio_mean_batch1": float((alone_cost[alone_valid] / test.cost[alone_valid]).mean()),
        "us_per_person_batched": float(np.median(batched) * 1e6),
        "us_per_person_batch1": float(
            np.median([np.median([answer.seconds for answer in one]) for one in passes]) * 1e6
        ),
    }


def milp_seconds(exact: RecourseSolver, test: LabelData, n: int) -> float:
    times = []
    for i in range(min(n, len(test.x))):
        start = time.perf_counter()
        result = exact.solve(test.x[i], test.people[i])
        times.append(time.perf_counter() - start)
        assert result.status is SolveStatus.OPTIMAL, result
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="loan", choices=["loan", "gsmc"])
    parser.add_argument("--classifier", default="mlp", choices=["lr", "mlp"])
    parser.add_argument("--cost", default="l1", choices=["l1", "carma"])
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-universal", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument(
        "--n-test-mixed", type=int, help="Held-out mixed people (default: --n-test)."
    )
    parser.add_argument("--n-milp", type=int, default=50)
    parser.add_argument("--schemes", default="mixed,universal,hard,rank,score")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.dataset}-{args.classifier}-{args.cost}"
    record: dict[str, Any] = {
        "command": "python benchmarks/amortizer.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "labels": {},
        "models": {},
        "schemes": {},
    }

    train, record["labels"]["train"] = labels(args, "mixed", 0, args.n_train, f"{tag}-mixed-s0")
    universal, record["labels"]["universal"] = labels(
        args, "universal", 0, args.n_universal, f"{tag}-universal-s0"
    )
    tests = {}
    for scheme in schemes:
        n = args.n_test_mixed if scheme == "mixed" and args.n_test_mixed else args.n_test
        tests[scheme], record["labels"][f"test-{scheme}"] = labels(
            args, scheme, 1, n, f"{tag}-{scheme}-s1"
        )

    models = {}
    for name, data, inputs in (
        ("personalized", train, True),
        ("universal", universal, False),
    ):
        start = time.perf_counter()
        models[name], report = train_amortizer(
            data, constraint_inputs=inputs, seed=args.seed, label_file=f"{name} labels"
        )
        chosen = report["candidates"][report["chosen"]]
        record["models"][name] = {"seconds": round(time.perf_counter() - start, 1), **chosen}
        print(f"model {name}: {record['models'][name]}", flush=True)

    scm, clf = train.scm, train.classifier
    exact = RecourseSolver(scm, clf, CostProfile.for_model(args.cost, scm, clf))
    for scheme, test in tests.items():
        entry: dict[str, Any] = {"milp_seconds_median": milp_seconds(exact, test, args.n_milp)}
        for name, model in models.items():
            entry[name] = evaluate(model, test, exact, args)
            milp = entry["milp_seconds_median"] * 1e6
            entry[name]["speedup_batched"] = milp / entry[name]["us_per_person_batched"]
            entry[name]["speedup_batch1"] = milp / entry[name]["us_per_person_batch1"]
        record["schemes"][scheme] = entry
        print(f"scheme {scheme}: {json.dumps(entry)}", flush=True)

    (args.work / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print()
    print(f"`{record['command']}`  ({record['machine']})")
    print()
    print(
        "| scheme | model | people | raw validity | after repair | cost ratio mean | p95 | "
        "mask agreement | batch 1: raw validity | batch 1: cost ratio mean | "
        "us/person batched | us/person batch 1 | MILP ms | speed-up batched |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scheme, entry in record["schemes"].items():
        for name in models:
            e = entry[name]
            print(
                f"| {scheme} | {name} | {e['people']} | {e['raw_validity']:.2%} | "
                f"{e['validity_after_repair']:.2%} | {e['cost_ratio_mean']:.4f} | "
                f"{e['cost_ratio_p95']:.4f} | {e['mask_agreement']:.2%} | "
                f"{e['raw_validity_batch1']:.2%} | {e['cost_ratio_mean_batch1']:.4f} | "
                f"{e['us_per_person_batched']:.1f} | {e['us_per_person_batch1']:.0f} | "
                f"{entry['milp_seconds_median'] * 1e3:.1f} | {e['speedup_batched']:,.0f}x |"
            )


if __name__ == "__main__":
    main()
