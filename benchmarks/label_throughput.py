"""Labels per second of ``recourse label`` on Loan: 1 process, 2 processes, 2 Dask workers.

Run:  python benchmarks/label_throughput.py --n-lr 2000 --n-mlp 40

For each classifier, the same job (rejected people of the seeded population, the default
``mixed`` elicitation scheme, L1 cost, HiGHS) runs three ways: in this process (1 worker),
on 2 worker processes (``--jobs 2``: process start-up is inside the clock) and on a Dask
``LocalCluster`` with 2 single-threaded worker processes (started before the clock, as a
cluster outlives jobs). Prints a Markdown table:

- labels/s: people per second of wall time of the whole job (chunks, files, combining);
- speed-up: labels/s over the 1-process run of the same classifier;
- solve ms: mean time the engine reports per person (``solver.runtime_seconds``:
  incumbent search, MILP solves, verification);
- in-worker overhead: a worker's time per person beyond that solve time (elicitation,
  parsing, building the row), as a % of solve time;
- end-to-end overhead: wall time x workers, minus the total solve time, as a % of solve
  time: also counts start-up, building the MILP, moving results and writing files.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import pyarrow.parquet as pq
from dask.distributed import LocalCluster

from instances import load_classifier, load_scm
from solver.backends import backend_class
from solver.labels import LabelJob, Population, run_job, sample_population

WORKERS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-lr", type=int, default=2000)
    parser.add_argument("--n-mlp", type=int, default=40)
    parser.add_argument("--chunk-lr", type=int, default=32)
    parser.add_argument("--chunk-mlp", type=int, default=2)
    parser.add_argument("--scheme", default="mixed")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    machine = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, HiGHS {backend_class('highs').version()}, dask "
        f"{dask.__version__}, load average at start {os.getloadavg()[0]:.2f}"
    )
    # Printed at the end: workers write HiGHS's banner to stdout as they start.
    table = [
        "| classifier | mode | n | chunk | wall s | labels/s | speed-up | solve ms "
        "| in-worker overhead | end-to-end overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    scm = load_scm("loan")
    runs = [("lr", args.n_lr, args.chunk_lr), ("mlp", args.n_mlp, args.chunk_mlp)]
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
    ):
        for kind, n, chunk in runs:
            population = sample_population(scm, load_classifier("loan", kind), n, args.seed)
            job = LabelJob("loan", kind, args.scheme, "l1", args.seed, "highs", 60.0)
            modes = [
                ("1 process", 1, {"jobs": 1}),
                (f"{WORKERS} processes", WORKERS, {"jobs": WORKERS}),
                (f"Dask, {WORKERS} workers", WORKERS, {"dask_address": cluster.scheduler_address}),
            ]
            baseline = None
            for mode, workers, how in modes:
                out = Path(directory) / f"{kind}-{mode.split()[0]}.parquet"
                m = measure(job, population, out, chunk, workers, how)
                baseline = baseline or m.rate
                table.append(
                    f"| {kind} | {mode} | {n} | {chunk} | {m.wall:.2f} | {m.rate:.1f} "
                    f"| {m.rate / baseline:.2f}x | {1000 * m.solve_per_person:.1f} "
                    f"| {100 * m.in_worker:.1f} % | {100 * m.end_to_end:.1f} % |"
                )
    print(machine, f"load average at the end {os.getloadavg()[0]:.2f}", "", *table, sep="\n")


@dataclass(frozen=True)
class Measurement:
    wall: float
    rate: float
    """Labels per second of wall time."""
    solve_per_person: float
    in_worker: float
    """Worker time per person beyond the engine's own, relative to the engine's."""
    end_to_end: float
    """Wall time x workers beyond the engine's total, relative to the engine's total."""


def measure(
    job: LabelJob,
    population: Population,
    out: Path,
    chunk: int,
    workers: int,
    how: dict[str, Any],
) -> Measurement:
    """Run the job once into ``out`` and time it."""
    start = time.perf_counter()
    run_job(job, population, out, chunk_size=chunk, progress=False, **how)
    wall = time.perf_counter() - start
    table = pq.read_table(out, columns=["wall_seconds", "runtime_seconds"]).to_pandas()
    solve = float(table["runtime_seconds"].sum())
    return Measurement(
        wall=wall,
        rate=len(table) / wall,
        solve_per_person=solve / len(table),
        in_worker=(float(table["wall_seconds"].sum()) - solve) / solve,
        end_to_end=(wall * workers - solve) / solve,
    )


if __name__ == "__main__":
    main()
