"""``recourse bench``: every method on the same rejected people, per scheme and cost.

Stages, per cost profile (every solve goes through the resumable label pipeline of
:mod:`solver.labels`, its tables under ``work/<cost>/``; a run stopped at any point
finishes when started again with the same arguments, and reuses every finished table):

1. ``exact``: the MILP with each person's constraints, for every scheme, on the first
   ``n`` people the classifier rejects in the sample seeded with ``seed``. The
   ``universal`` scheme is always solved: its answers are also the method
   ``exact-universal``, the universal recommendation checked against each person's real
   constraints under every other scheme;
2. the reference methods on the first ``n_baseline`` of those people (they are slow):
   ``grid-oracle`` (CARMA's M*) and ``non-causal`` (solved with edits that move nothing
   else, checked in the causal model);
3. the amortizer: exact ``mixed`` labels for ``n_train`` other people (seed ``seed + 1``),
   trained (a few seconds, redone every run, saved in ``work/<cost>/amortizer``), then
   run batched on each scheme's people: ``amortizer`` is its raw answer, ``amortizer +
   repair`` the answer after the exact repairs of :class:`~solver.amortized.AmortizedSolver`;
4. measures (:mod:`solver.bench.measures`) of every answer, the same for every method,
   into one per-person table; summaries and group gaps (:mod:`solver.bench.stats`); the
   report (:mod:`solver.bench.report`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from instances import load_classifier, load_scm
from models.amortizer import save_amortizer
from models.classifiers import Classifier
from models.costs import CostProfile
from models.elicitation import SCHEMES
from models.preferences import ConstraintArrays, PersonConstraints, parse_constraints
from models.scm import StructuralCausalModel
from solver.amortized import AmortizedSolver, read_labels, train_amortizer
from solver.bench.measures import Actions, PlausibilityScorer, measure
from solver.bench.stats import Bootstrap, group_gaps, summarize
from solver.engine import RecourseSolver
from solver.labels import LabelJob, LabelSummary, package_version, run_job, sample_population
from solver.milp import SolverSettings, SolveStatus

DEFAULT_SCHEMES = ("universal", "hard", "rank", "score", "mixed")
METHODS = (
    "exact",
    "exact-universal",
    "amortizer",
    "amortizer + repair",
    "grid-oracle",
    "non-causal",
)
"""The methods, in the order the report lists them."""
KEYS = ("cost_profile", "scheme", "method")
"""What one summary row is about."""
TRAINING_SCHEME = "mixed"
BELOW_BOUND = 1e-6
"""Relative margin under which a cost counts as below the exact optimum's lower bound."""
RATIO_FLOOR = 1e-6
"""Optimal costs below this get no cost ratio: a person a hair from the boundary (squared
costs of 1e-10) would turn rounding and the reported cut gap into ratios far from 1."""


class BenchInputError(ValueError):
    """An argument of the benchmark that cannot be used; the message names it."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines the benchmark's figures."""

    dataset: str = "loan"
    classifier: str = "mlp"
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    costs: tuple[str, ...] = ("l1",)
    n: int = 2000
    n_train: int = 1000
    n_baseline: int = 200
    seed: int = 0
    backend: str = "highs"
    time_limit: float = 60.0
    bootstrap: int = 1000
    batch1_people: int = 50
    """People the amortizer answers one call each, for its batch-size-1 time."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.schemes) - set(SCHEMES))
        if unknown or not self.schemes:
            raise BenchInputError(
                f"The 'schemes' must be a non-empty list from {list(SCHEMES)}. Got "
                f"{list(self.schemes)!r} instead."
            )
        for name in ("n", "n_train", "bootstrap", "batch1_people"):
            if getattr(self, name) < 1:
                raise BenchInputError(
                    f"The '{name}' must be at least 1. Got {getattr(self, name)!r} instead."
                )
        if not 0 <= self.n_baseline <= self.n:
            raise BenchInputError(
                f"The 'n_baseline' must be between 0 and n ({self.n}). Got "
                f"{self.n_baseline!r} instead."
            )

    @property
    def solved_schemes(self) -> tuple[str, ...]:
        """The schemes solved exactly: ``universal`` first (``exact-universal`` needs it)."""
        return ("universal", *(s for s in self.schemes if s != "universal"))


@dataclass
class BenchOutcome:
    people: pd.DataFrame
    summary: pd.DataFrame
    gaps: pd.DataFrame
    timings: pd.DataFrame
    run: dict[str, Any] = field(default_factory=dict)


def run_bench(
    config: BenchConfig,
    work: Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> BenchOutcome:
    """Run every stage (module docstring); label tables go to ``work``."""
    start = time.perf_counter()
    scm = load_scm(config.dataset)
    classifier = load_classifier(config.dataset, config.classifier)
    classifier.check_features(scm.names)
    plausibility = PlausibilityScorer(scm)
    frames, timings, labelled = [], [], []
    for cost_kind in config.costs:
        stage = _Stage(config, cost_kind, scm, classifier, work / cost_kind, jobs, progress, log)
        frames += stage.exact_and_baselines(plausibility, labelled)
        amortized, timing = stage.amortizer(plausibility, labelled)
        frames += amortized
        timings += timing
    people = pd.concat(frames, ignore_index=True)
    bootstrap = Bootstrap(config.bootstrap, config.seed)
    attributes = [c.removeprefix("group.") for c in people.columns if c.startswith("group.")]
    log("summaries and bootstrap intervals ...")
    summary = summarize(people, KEYS)
    gaps = group_gaps(people, KEYS, attributes, bootstrap)
    run = {
        "config": asdict(config),
        "jobs": jobs,
        "labels": labelled,
        "seconds": round(time.perf_counter() - start, 1),
        **environment(),
    }
    return BenchOutcome(people, summary, gaps, pd.DataFrame(timings), run)


class _Stage:
    """The stages for one cost profile."""

    def __init__(
        self,
        config: BenchConfig,
        cost_kind: str,
        scm: StructuralCausalModel,
        classifier: Classifier,
        work: Path,
        jobs: int,
        progress: bool,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.cost_kind = config, cost_kind
        self.scm, self.classifier = scm, classifier
        self.cost = CostProfile.for_model(cost_kind, scm, classifier)
        self.work, self.jobs, self.progress, self.log = work, jobs, progress, log
        self.work.mkdir(parents=True, exist_ok=True)
        self._tables: dict[str, pd.DataFrame] = {}
        self._people: dict[str, _People] = {}
        """Per reported scheme: its exact table's people, parsed once for every method."""

    def label(
        self, scheme: str, method: str, n: int, seed: int, name: str, record: list[dict[str, Any]]
    ) -> pd.DataFrame:
        """A finished label table (solving what is missing), as a frame in person order."""
        config = self.config
        job = LabelJob(
            config.dataset,
            config.classifier,
            scheme,
            self.cost_kind,
            seed,
            config.backend,
            config.time_limit,
            method,
        )
        out = self.work / f"{name}.parquet"
        self.log(f"[{self.cost_kind}] {name}: {method} on {n} people, scheme {scheme}")
        summary = run_job(
            job,
            sample_population(self.scm, self.classifier, n, seed),
            out,
            jobs=self.jobs,
            progress=self.progress,
        )
        record.append(_label_record(self.cost_kind, name, summary))
        return pq.read_table(out).to_pandas()

    def exact_and_baselines(
        self, plausibility: PlausibilityScorer, record: list[dict[str, Any]]
    ) -> list[pd.DataFrame]:
        config = self.config
        for scheme in config.solved_schemes:
            self._tables[scheme] = self.label(
                scheme, "milp", config.n, config.seed, f"{scheme}-exact", record
            )
        universal = self._tables["universal"]
        frames = []
        for scheme in config.schemes:
            table = self._tables[scheme]
            known = self._people[scheme] = _People.of(table, self.scm)
            x, arrays = known.x, known.arrays
            methods = {"exact": table, "exact-universal": universal}
            if config.n_baseline:
                for method in ("grid-oracle", "non-causal"):
                    methods[method] = self.label(
                        scheme,
                        method,
                        config.n_baseline,
                        config.seed,
                        f"{scheme}-{method}",
                        record,
                    )
            for method, answers in methods.items():
                rows = len(answers)
                if not np.array_equal(answers["person_id"], table["person_id"][:rows]):
                    raise BenchInputError(
                        f"The {method} table of scheme {scheme!r} holds other people than the "
                        f"exact one; remove {self.work} and run again."
                    )
                actions = Actions.from_table(answers, self.scm.names, x[:rows])
                frame = measure(
                    self.scm,
                    self.classifier,
                    self.cost,
                    plausibility,
                    x[:rows],
                    arrays.take(np.arange(rows)),
                    actions,
                )
                frames.append(
                    self._framed(
                        frame,
                        table.iloc[:rows],
                        scheme,
                        method,
                        answers["runtime_seconds"].to_numpy(dtype=float),
                    )
                )
        return frames

    def amortizer(
        self, plausibility: PlausibilityScorer, record: list[dict[str, Any]]
    ) -> tuple[list[pd.DataFrame], list[dict[str, Any]]]:
        config = self.config
        name = f"train-{TRAINING_SCHEME}"
        self.label(TRAINING_SCHEME, "milp", config.n_train, config.seed + 1, name, record)
        self.log(f"[{self.cost_kind}] training the amortizer on {name}")
        model, _ = train_amortizer(
            read_labels(self.work / f"{name}.parquet"),
            seed=config.seed,
            label_file=str(self.work / f"{name}.parquet"),
        )
        save_amortizer(model, self.work / "amortizer")
        exact = RecourseSolver(
            self.scm,
            self.classifier,
            self.cost,
            backend=config.backend,
            settings=SolverSettings(time_limit=config.time_limit),
        )
        solver = AmortizedSolver(model, self.scm, self.classifier, exact=exact)
        frames, timings = [], []
        for scheme in config.schemes:
            table = self._tables[scheme]
            known = self._people[scheme]
            x, people, arrays = known.x, known.constraints, known.arrays
            batch = solver.predict(x, arrays)
            each = batch.seconds / len(x)
            single = [
                solver.predict(x[i : i + 1], arrays.take(np.array([i]))).seconds
                for i in range(min(config.batch1_people, len(x)))
            ]
            timings.append(
                {
                    "cost_profile": self.cost_kind,
                    "scheme": scheme,
                    "people": len(x),
                    "us_per_person_batched": 1e6 * each,
                    "us_per_person_batch1": 1e6 * float(np.median(single)),
                }
            )
            raw = Actions(batch.intervene, batch.values, np.ones(len(x), dtype=bool))
            failed = np.flatnonzero(~batch.verified)
            self.log(
                f"[{self.cost_kind}] amortizer, scheme {scheme}: {len(failed)} of {len(x)} "
                f"answers to repair"
            )
            repaired = solver.solve(x[failed], [people[i] for i in failed]) if failed.size else []
            fixed = Actions.from_results(repaired, self.scm.names, x[failed])
            after = Actions(
                _replaced(raw.intervene, failed, fixed.intervene),
                _replaced(raw.values, failed, fixed.values),
                _replaced(raw.answered, failed, fixed.answered),
            )
            seconds = np.full(len(x), each)
            repair_seconds = seconds.copy()
            repair_seconds[failed] = [r.solver.runtime_seconds for r in repaired]
            paths = np.full(len(x), "amortizer", dtype=object)
            paths[failed] = [r.answered_by for r in repaired]
            for method, actions, spent in (
                ("amortizer", raw, seconds),
                ("amortizer + repair", after, repair_seconds),
            ):
                frame = measure(
                    self.scm, self.classifier, self.cost, plausibility, x, arrays, actions
                )
                framed = self._framed(frame, table, scheme, method, spent)
                if method != "amortizer":
                    framed["answered_by"] = paths
                frames.append(framed)
        return frames, timings

    def _framed(
        self,
        frame: pd.DataFrame,
        table: pd.DataFrame,
        scheme: str,
        method: str,
        seconds: np.ndarray,
    ) -> pd.DataFrame:
        """``frame`` with who, what and the comparison with the exact optimum of ``table``
        (the scheme's exact labels, one row per row of ``frame``)."""
        frame.insert(0, "person_id", table["person_id"].to_numpy())
        frame.insert(0, "method", method)
        frame.insert(0, "scheme", scheme)
        frame.insert(0, "cost_profile", self.cost_kind)
        for column in table.columns:
            if column.startswith("group."):
                frame[column] = table[column].to_numpy(dtype=bool)
        # The exact engine found a verified recourse (optimal, or the best by the time limit).
        frame["feasible"] = table["verified"].fillna(False).to_numpy(dtype=bool)
        optimal = (table["status"] == SolveStatus.OPTIMAL.value) & table["verified"].fillna(False)
        optimum = np.where(optimal, table["cost"].to_numpy(dtype=float), np.nan)
        bound = np.where(optimal, table["cost_bound"].to_numpy(dtype=float), np.nan)
        frame["optimal_cost"] = optimum
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = frame["cost"].to_numpy() / optimum
        has_ratio = optimum > RATIO_FLOOR
        frame["cost_ratio"] = np.where(has_ratio, ratio, np.nan)
        # Below the proven lower bound, not merely within the reported gap (the squared
        # cost's cuts): possible only where the MILP interpolates a non-linear equation.
        below = frame["cost"].to_numpy() < bound - BELOW_BOUND * np.abs(bound)
        frame["below_optimum"] = np.where(has_ratio, below, np.nan)
        frame["seconds"] = seconds
        frame["answered_by"] = method
        return frame


@dataclass(frozen=True, eq=False)
class _People:
    """A label table's people: factual rows and constraints, as objects and as arrays."""

    x: np.ndarray
    constraints: list[PersonConstraints]
    arrays: ConstraintArrays

    @classmethod
    def of(cls, table: pd.DataFrame, scm: StructuralCausalModel) -> _People:
        x = table[[f"factual.{n}" for n in scm.names]].to_numpy(dtype=float)
        constraints = [
            parse_constraints(json.loads(raw), scm, who=f"person {pid}")
            for raw, pid in zip(table["constraints"], table["person_id"], strict=True)
        ]
        return cls(x, constraints, ConstraintArrays.from_constraints(scm, x, constraints))


def _replaced(array: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = array.copy()
    out[rows] = values
    return out


def _label_record(cost_kind: str, name: str, summary: LabelSummary) -> dict[str, Any]:
    return {
        "cost_profile": cost_kind,
        "table": name,
        "people": summary.people,
        "solved_now": summary.labelled_now,
        "statuses": summary.statuses,
        "seconds": round(summary.seconds, 1),
    }


def environment() -> dict[str, Any]:
    """Versions and machine, for the report's provenance."""
    versions = {}
    for distribution in ("numpy", "pandas", "pyarrow", "scikit-learn", "highspy", "matplotlib"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = "not installed"
    return {
        "package_version": package_version(),
        "python": platform.python_version(),
        **versions,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def write_people(people: pd.DataFrame, path: Path) -> None:
    """The per-person table, written atomically: zstd-compressed Parquet, measures in
    float32 (seven digits are plenty for analysis and halve the file the reports commit;
    every summary is computed from the float64 values before)."""
    temporary = path.with_name(f".{path.name}.tmp")
    floats = people.select_dtypes("float64").columns
    table = pa.Table.from_pandas(
        people.astype(dict.fromkeys(floats, "float32")), preserve_index=False
    )
    pq.write_table(table, temporary, compression="zstd", compression_level=19)
    os.replace(temporary, path)


def split_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma-separated CLI list, checked against ``allowed``."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise BenchInputError(
            f"The '{what}' must be a comma-separated list from {list(allowed)}. Got {text!r}."
        )
    return items
