"""Exact recourse labels for a whole population: elicited constraints, chunks, resume.

A labelling job solves one person after another with :class:`~solver.engine.RecourseSolver`
(or, for the benchmark, a reference method of :mod:`solver.baselines`) and writes one
Parquet row per person:

1. population: the first ``n`` people the classifier rejects in a seeded sample of the
   causal model (:func:`sample_population`), or the rows of a table
   (:func:`read_people`); person ids are 0 .. n-1 in that order;
2. constraints: each person's, drawn by a :class:`~models.elicitation.PreferenceElicitor`
   from ``default_rng([seed, person_id])``;
3. work: chunks of consecutive persons (:func:`plan_chunks`), solved by
   :func:`label_chunk` in this process, in a pool of processes or on a Dask cluster; each
   worker process builds the MILP once per job and re-solves it per person;
4. storage (:class:`ChunkStore`): the driver writes each finished chunk atomically to
   ``<out>.parts/chunk-000012.parquet`` (a temporary file, then ``os.replace``) next to
   ``manifest.json``, the job's identity (arguments and content hashes); when every chunk
   is there it combines them, sorted by person id, into ``<out>`` (atomically again, with
   the identity in the file's metadata) and removes ``<out>.parts``.

A run that stops at any moment (killed, interrupted, a worker lost) is finished by running
it again with the same arguments: finished chunks are kept, temporary files are
discarded, and every person ends up in the output exactly once. A run with different
arguments on the same output raises :class:`OutputConflictError`. A person whose solve
fails or raises is a row with status ``error`` and the message, never a lost row.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from instances import load_classifier, load_scm
from models.classifiers import Classifier
from models.costs import COST_KINDS, CostProfile
from models.elicitation import SCHEMES, GroupAttribute, PreferenceElicitor
from models.preferences import PersonConstraints, WeightScheme, parse_constraints
from models.scm import StructuralCausalModel, Variable, VariableType
from solver.backends import backend_class, backend_names
from solver.backends.base import BackendUnavailableError
from solver.baselines import GridOracleSolver, NonCausalSolver
from solver.engine import RecourseSolver
from solver.milp import SolverSettings, SolveStatus
from solver.result import RecourseResult

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FORMAT_VERSION = 1
"""Version of the output layout; part of a job's identity."""
DEFAULT_CHUNK_SIZE = 64
POPULATION_BATCH = 4096
"""People sampled at a time: fixed, so the first n people do not depend on n."""
MAX_POPULATION_BATCHES = 1000
TIMING_COLUMNS = ("wall_seconds", "runtime_seconds", "solve_seconds")
"""Columns that differ between otherwise identical runs."""
MANIFEST_NAME = "manifest.json"
_LOCK_NAME = ".lock"
_CHUNK_PREFIX, _CHUNK_SUFFIX = "chunk-", ".parquet"
_DASK_CONNECT_SECONDS = 10
_PARENT_POLL_SECONDS = 0.5


LABEL_METHODS = ("milp", "non-causal", "grid-oracle")
"""How a job answers each person: the exact engine (:class:`~solver.engine.RecourseSolver`),
or :class:`~solver.baselines.NonCausalSolver` / :class:`~solver.baselines.GridOracleSolver`."""


class LabelInputError(ValueError):
    """Bad input to a labelling job (a people table, an argument); names the field."""


class OutputConflictError(RuntimeError):
    """The output belongs to another job (different arguments), or another run writes it."""


class LabelRunError(RuntimeError):
    """The job could not run to the end (a worker died, no Dask scheduler, ...)."""


# -- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelJob:
    """What determines each person's label (not how the work is spread).

    Hashable: workers key their cached solver on it.
    """

    dataset: str
    classifier: str
    scheme: str
    cost: str
    seed: int
    backend: str
    time_limit: float
    method: str = "milp"
    """One of :data:`LABEL_METHODS`: the exact engine, or a reference method of the benchmark."""

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("scheme", self.scheme, SCHEMES),
            ("cost", self.cost, COST_KINDS),
            ("backend", self.backend, backend_names()),
            ("method", self.method, LABEL_METHODS),
        ):
            if value not in choices:
                raise LabelInputError(
                    f"The '{name}' must be one of {list(choices)}. Got {value!r} instead."
                )
        if not (math.isfinite(self.time_limit) and self.time_limit > 0):
            raise LabelInputError(
                f"The 'time_limit' must be a finite number > 0. Got {self.time_limit!r} instead."
            )


@dataclass(frozen=True, eq=False)
class Population:
    """The people of a job, in person-id order."""

    source_index: IntArray
    """Each person's position in the sampled stream, or their row in the table."""
    x: FloatArray
    source: dict[str, Any]
    """Where they come from (part of the job's identity)."""

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class LabelSummary:
    """What a run did."""

    out: Path
    people: int
    labelled_now: int
    """People solved by this run (the rest came from chunks of earlier runs)."""
    statuses: dict[str, int]
    seconds: float
    already_complete: bool = False


@dataclass(frozen=True, eq=False)
class ChunkTask:
    """One unit of work: consecutive persons of a job, with their factual rows."""

    job: LabelJob
    index: int
    person_ids: IntArray
    source_index: IntArray
    x: FloatArray
    scm_hash: str
    classifier_hash: str


# -- population --------------------------------------------------------------------------


def sample_population(
    scm: StructuralCausalModel, classifier: Classifier, n: int, seed: int
) -> Population:
    """The first ``n`` people ``classifier`` rejects in a seeded sample of ``scm``.

    People are drawn in batches of :data:`POPULATION_BATCH` from one generator seeded with
    ``seed``, so the result depends on ``seed`` only (a larger ``n`` extends it).
    """
    if n < 1:
        raise LabelInputError(f"The 'n' must be at least 1. Got {n!r} instead.")
    rng = np.random.default_rng(seed)
    rows: list[FloatArray] = []
    positions: list[IntArray] = []
    found = 0
    for batch in range(MAX_POPULATION_BATCHES):
        x, _ = scm.sample(POPULATION_BATCH, rng)
        rejected = np.flatnonzero(~classifier.accepts(x))[: n - found]
        rows.append(x[rejected])
        positions.append(batch * POPULATION_BATCH + rejected)
        found += len(rejected)
        if found == n:
            return Population(
                np.concatenate(positions).astype(np.int64),
                np.concatenate(rows),
                {"kind": "sample", "seed": int(seed), "batch": POPULATION_BATCH},
            )
    raise LabelInputError(
        f"The classifier rejects only {found} of {MAX_POPULATION_BATCHES * POPULATION_BATCH} "
        f"people sampled from the causal model; the 'n' must be at most that. Got {n} instead."
    )


def read_people(path: Path, scm: StructuralCausalModel, n: int | None = None) -> Population:
    """People from a CSV or Parquet table with one column per feature of ``scm``.

    Every value must be a finite number in the feature's domain (a whole number for
    binary and integer features) that the causal model can produce. ``n``: the first
    ``n`` rows (default: all).
    """
    path = Path(path)
    where = f"the people table {path.name!r}"
    frame, content = read_frame(path, where)
    return people_from_frame(frame, scm, where, n, {"sha256": hashlib.sha256(content).hexdigest()})


def read_frame(path: Path, where: str) -> tuple[pd.DataFrame, bytes]:
    """A .csv or .parquet table, and its bytes."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise LabelInputError(
            f"The people table must be a .csv or .parquet file. Got {path.name!r} instead."
        )
    try:
        content = path.read_bytes()
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise LabelInputError(f"{where.capitalize()} cannot be read: {exc}") from None
    return frame, content


def people_from_frame(
    frame: pd.DataFrame,
    scm: StructuralCausalModel,
    where: str,
    n: int | None = None,
    source: Mapping[str, Any] | None = None,
) -> Population:
    """People from a table with exactly one column per feature (see :func:`read_people`)."""
    missing = [name for name in scm.names if name not in frame.columns]
    if missing:
        raise LabelInputError(
            f"{where.capitalize()} has no {_columns(missing)}; it needs one column per "
            f"feature {list(scm.names)}."
        )
    unknown = [str(c) for c in frame.columns if c not in scm.index]
    if unknown:
        raise LabelInputError(
            f"{where.capitalize()} has an unknown {_columns(unknown)}; it must have exactly "
            f"one column per feature {list(scm.names)}."
        )
    if len(frame) == 0:
        raise LabelInputError(f"{where.capitalize()} has no rows.")
    if n is not None and not 1 <= n <= len(frame):
        raise LabelInputError(
            f"The 'n' must be between 1 and the {len(frame)} rows of {where}. Got {n} instead."
        )
    frame = frame.iloc[: n or len(frame)]
    x = np.column_stack([_feature_column(frame[v.name], v, where) for v in scm.variables])
    with np.errstate(all="ignore"):
        noise = scm.abduct_noise(x)
    impossible = ~np.isfinite(noise)
    if impossible.any():
        row, column = (int(i) for i in np.argwhere(impossible)[0])
        raise LabelInputError(
            f"Row {row} of {where} cannot come from the causal model: no noise value "
            f"reproduces its {scm.names[column]!r} ({x[row, column]!r}) through the structural "
            f"equation (a sigmoid, say, never reaches its limits). Move it strictly inside "
            f"its range."
        )
    return Population(
        np.arange(len(frame), dtype=np.int64),
        x,
        {"kind": "table", **(source or {}), "rows": len(frame)},
    )


def _feature_column(column: pd.Series, var: Variable, where: str) -> FloatArray:
    """One feature's values as floats, with the first offending row named on error."""
    what = f"The column {var.name!r} of {where}"
    missing = column.isna().to_numpy()
    numbers = pd.to_numeric(column, errors="coerce")
    not_numbers = numbers.isna().to_numpy() & ~missing
    if not_numbers.any():
        row = int(np.flatnonzero(not_numbers)[0])
        raise LabelInputError(
            f"{what} must hold numbers. Got {column.iloc[row]!r} in row {row} instead."
        )
    if missing.any():
        raise LabelInputError(
            f"{what} must not have missing values (NaN). Row {int(np.flatnonzero(missing)[0])} "
            f"has one."
        )
    values = numbers.to_numpy(dtype=float)
    domain = f"must lie in the feature's domain [{var.lower}, {var.upper}]"
    problems = [
        (~np.isfinite(values), "must be finite"),
        ((values < var.lower) | (values > var.upper), domain),
    ]
    if var.type is not VariableType.CONTINUOUS:
        problems.append((values != np.round(values), f"must hold whole numbers ({var.type.value})"))
    for bad, rule in problems:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise LabelInputError(f"{what} {rule}. Got {values[row]!r} in row {row} instead.")
    return values


def _columns(names: Sequence[str]) -> str:
    return f"column {names[0]!r}" if len(names) == 1 else f"columns {list(names)}"


def plan_chunks(n: int, chunk_size: int) -> list[range]:
    """Person ids of each chunk: consecutive runs of ``chunk_size`` (the last may be short)."""
    if chunk_size < 1:
        raise LabelInputError(f"The 'chunk_size' must be at least 1. Got {chunk_size!r} instead.")
    return [range(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


# -- the worker --------------------------------------------------------------------------


def output_schema(scm: StructuralCausalModel, groups: Sequence[GroupAttribute]) -> pa.Schema:
    """Columns of a label table (see the README's "Labels at scale")."""
    names, actionable = scm.names, scm.actionable
    f64, boolean, text = pa.float64(), pa.bool_(), pa.string()
    fields = [pa.field("person_id", pa.int64()), pa.field("source_index", pa.int64())]
    fields += [pa.field(f"factual.{n}", f64) for n in names]
    fields += [pa.field(f"group.{g.feature}", boolean) for g in groups]
    fields.append(pa.field("constraints", text))
    for prefix, kind in (("lock", boolean), ("weight", f64), ("bound_lo", f64), ("bound_hi", f64)):
        fields += [pa.field(f"{prefix}.{n}", kind) for n in actionable]
    fields += [pa.field("status", text), pa.field("verified", boolean)]
    fields += [pa.field(f"action_mask.{n}", boolean) for n in names]
    fields += [pa.field(f"action_value.{n}", f64) for n in names]
    fields += [pa.field(f"counterfactual.{n}", f64) for n in names]
    for name in ("cost", "cost_bound", "probability", "factual_probability", "gap"):
        fields.append(pa.field(name, f64))
    fields += [
        pa.field("interpolation_error", f64),
        pa.field("solves", pa.int64()),
        pa.field("backend", text),
        pa.field("verification_failures", pa.list_(text)),
        pa.field("message", text),
    ]
    fields += [pa.field(name, f64) for name in TIMING_COLUMNS]
    return pa.schema(fields)


class _Worker:
    """One process's (and thread's) models, solver and elicitor for one job."""

    def __init__(self, job: LabelJob) -> None:
        self.job = job
        self.scm = load_scm(job.dataset)
        self.classifier = load_classifier(job.dataset, job.classifier)
        self.scm_hash = self.scm.content_hash()
        self.classifier_hash = self.classifier.content_hash()
        self.elicitor = PreferenceElicitor(self.scm, job.scheme, job.seed)
        self.schema = output_schema(self.scm, self.elicitor.groups)
        self.solver = self._build_solver()

    def _build_solver(self) -> RecourseSolver | NonCausalSolver | GridOracleSolver:
        job = self.job
        cost = CostProfile.for_model(job.cost, self.scm, self.classifier)
        if job.method == "grid-oracle":
            return GridOracleSolver(self.scm, self.classifier, cost)
        solver = NonCausalSolver if job.method == "non-causal" else RecourseSolver
        return solver(
            self.scm,
            self.classifier,
            cost,
            backend=job.backend,
            settings=SolverSettings(time_limit=job.time_limit),
        )

    def label(self, person_id: int, source_index: int, x: FloatArray) -> dict[str, Any]:
        start = time.perf_counter()
        scm = self.scm
        row: dict[str, Any] = {"person_id": person_id, "source_index": source_index}
        row.update({f"factual.{n}": float(v) for n, v in zip(scm.names, x, strict=True)})
        row.update({f"group.{k}": v for k, v in self.elicitor.disadvantaged(x).items()})
        raw = constraints = result = None
        error = ""
        try:
            raw = self.elicitor.constraints(person_id, x)
            constraints = parse_constraints(raw, scm, who=f"person {person_id}")
            result = self.solver.solve(x, constraints)
        except Exception as exc:  # one person's failure is their row, not the job's end
            error = f"{type(exc).__name__}: {exc}"
            # The backend may hold a half-updated model: start the next person afresh.
            self.solver = self._build_solver()
        row["constraints"] = None if raw is None else json.dumps(raw, sort_keys=True)
        row.update(_constraint_columns(constraints, scm.actionable))
        if result is not None:
            row.update(_result_columns(result, scm.names))
        else:
            row.update(
                {"status": SolveStatus.ERROR.value, "verified": False, "backend": self.job.backend}
            )
            row.update({f"action_mask.{n}": False for n in scm.names})
            row["message"] = error
        row["wall_seconds"] = time.perf_counter() - start
        return row


def _constraint_columns(
    constraints: PersonConstraints | None, actionable: Sequence[str]
) -> dict[str, Any]:
    if constraints is None:
        return {}
    columns: dict[str, Any] = {}
    for name in actionable:
        lower, upper = constraints.bounds.get(name, (None, None))
        columns[f"lock.{name}"] = name in constraints.locks
        columns[f"weight.{name}"] = constraints.weight(name)
        columns[f"bound_lo.{name}"] = lower
        columns[f"bound_hi.{name}"] = upper
    return columns


def _result_columns(result: RecourseResult, names: Sequence[str]) -> dict[str, Any]:
    # The fields of RecourseResult.to_dict(), flat; read directly (to_dict deep-copies).
    info = result.solver
    counterfactual = result.counterfactual or {}
    columns: dict[str, Any] = {
        "status": result.status.value,
        "verified": result.verified,
        "cost": result.cost,
        "cost_bound": result.cost_bound,
        "probability": result.probability,
        "factual_probability": result.factual_probability,
        "gap": info.gap,
        "interpolation_error": result.interpolation_error,
        "solves": info.solves,
        "backend": info.name,
        "verification_failures": list(result.verification_failures),
        "message": result.message,
        "runtime_seconds": info.runtime_seconds,
        "solve_seconds": info.solve_seconds,
    }
    for name in names:
        columns[f"action_mask.{name}"] = name in result.action
        columns[f"action_value.{name}"] = result.action.get(name)
        columns[f"counterfactual.{name}"] = counterfactual.get(name)
    return columns


_WORKERS: dict[tuple[LabelJob, int], _Worker] = {}
"""This process's workers, one per job and thread: the MILP is built once, then re-solved."""


def label_chunk(task: ChunkTask) -> pa.Table:
    """Solve one chunk; the worker entry point (in this process, a pool or on Dask).

    Raises
    ------
    LabelRunError
        When this worker's causal model or classifier differs from the driver's (a Dask
        worker with another installation).
    """
    key = (task.job, threading.get_ident())  # a solver is not shared between threads
    worker = _WORKERS.get(key)
    if worker is None:
        worker = _WORKERS[key] = _Worker(task.job)
    if (worker.scm_hash, worker.classifier_hash) != (task.scm_hash, task.classifier_hash):
        raise LabelRunError(
            f"The worker's {task.job.dataset!r} model or {task.job.classifier!r} classifier "
            f"differs from the driver's (content hashes differ); install the same carma-mip "
            f"version on every worker."
        )
    rows = [
        worker.label(int(pid), int(source), x)
        for pid, source, x in zip(task.person_ids, task.source_index, task.x, strict=True)
    ]
    return pa.Table.from_pylist(rows, schema=worker.schema)


# -- storage -----------------------------------------------------------------------------


class ChunkStore:
    """The chunk files, manifest and final table of one output path (see module docstring).

    Parameters
    ----------
    out : Path
        The final table; chunks live in the sibling directory ``<out>.parts``.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")

    def chunk_path(self, index: int) -> Path:
        return self.parts / f"{_CHUNK_PREFIX}{index:06d}{_CHUNK_SUFFIX}"

    @contextlib.contextmanager
    def claim(self, identity: Mapping[str, Any]) -> Iterator[bool]:
        """Hold the output for a job with ``identity``; yields whether it is already complete.

        Raises
        ------
        OutputConflictError
            The output or its chunks belong to a job with another identity, or another run
            holds them.
        """
        identity = _normalized(identity)
        complete = self._final_identity()
        if complete is not None and complete != identity:
            raise self._conflict(complete, identity)
        self.parts.mkdir(parents=True, exist_ok=True)
        with open(self.parts / _LOCK_NAME, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputConflictError(
                    f"Another run is writing {str(self.out)!r} right now; wait for it to finish "
                    f"or use another --out."
                ) from None
            complete = self._final_identity()  # again: a run may have finished meanwhile
            if complete is not None:
                if complete != identity:
                    raise self._conflict(complete, identity)
                shutil.rmtree(self.parts, ignore_errors=True)  # left if killed after combining
                yield True
                return
            self._check_manifest(identity)
            for stale in [*self.parts.glob("*.tmp"), *self.out.parent.glob(_temp_glob(self.out))]:
                stale.unlink(missing_ok=True)  # left by a run killed mid-write
            yield False

    def finished_chunks(self, plan: Sequence[range]) -> set[int]:
        """Indices of valid chunk files; unreadable or wrong-sized ones are deleted."""
        done = set()
        for index, persons in enumerate(plan):
            path = self.chunk_path(index)
            if not path.exists():
                continue
            try:
                valid = pq.read_metadata(path).num_rows == len(persons)
            except (OSError, pa.ArrowException):
                valid = False
            if valid:
                done.add(index)
            else:
                path.unlink()
        return done

    def write_chunk(self, index: int, table: pa.Table) -> None:
        _write_atomically(table, self.chunk_path(index))

    def combine(self, plan: Sequence[range], metadata: Mapping[str, str]) -> pa.Table:
        """Write every chunk, sorted by person id, with ``metadata`` to the output."""
        tables = [pq.ParquetFile(self.chunk_path(i)).read() for i in range(len(plan))]
        table = pa.concat_tables(tables).sort_by("person_id")
        n = sum(len(persons) for persons in plan)
        ids = table.column("person_id").to_numpy()
        if not np.array_equal(ids, np.arange(n)):
            raise LabelRunError(
                f"The chunks in {str(self.parts)!r} do not hold persons 0 to {n - 1} exactly "
                f"once; remove that directory and run again."
            )
        table = table.replace_schema_metadata(dict(metadata))
        _write_atomically(table, self.out)
        shutil.rmtree(self.parts, ignore_errors=True)
        return table

    def _final_identity(self) -> dict[str, Any] | None:
        if not self.out.exists():
            return None
        try:
            metadata = pq.read_schema(self.out).metadata or {}
            return json.loads(metadata[b"identity"])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            raise OutputConflictError(
                f"The output {str(self.out)!r} exists and was not written by 'recourse label'. "
                f"Use another --out, or remove it."
            ) from None

    def _check_manifest(self, identity: dict[str, Any]) -> None:
        manifest = self.parts / MANIFEST_NAME
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text())["identity"]
            except (OSError, ValueError, KeyError, TypeError):
                stored = None
            if stored != identity:
                raise self._conflict(stored, identity)
            return
        if any(self.parts.glob(f"{_CHUNK_PREFIX}*{_CHUNK_SUFFIX}")):
            raise self._conflict(None, identity)
        text = json.dumps({"identity": identity, "created": time.time()}, indent=2)
        _replace_atomically(manifest, text.encode())

    def _conflict(
        self, stored: Mapping[str, Any] | None, identity: Mapping[str, Any]
    ) -> OutputConflictError:
        if stored is None:
            what = "chunks without a readable manifest"
        else:
            theirs, ours = _flattened(stored), _flattened(identity)
            differences = [
                f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here"
                for key in sorted(set(theirs) | set(ours))
                if theirs.get(key) != ours.get(key)
            ]
            what = f"a labelling job with different arguments ({'; '.join(differences)})"
        return OutputConflictError(
            f"The output {str(self.out)!r} holds {what}. Use another --out, or remove "
            f"{str(self.out)!r} and {str(self.parts)!r} to start over."
        )


def _normalized(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` as it reads back from JSON (tuples as lists, ...), for comparisons."""
    return json.loads(json.dumps(document, sort_keys=True))


def _flattened(document: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested keys joined with dots: {"job": {"seed": 0}} -> {"job.seed": 0}."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, Mapping):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _temp_glob(path: Path) -> str:
    return f"{path.name}.*.tmp"


def _write_atomically(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _replace_atomically(path, sink.getvalue().to_pybytes())


def _replace_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file beside ``path``, sync it, then rename it over."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


# -- running a job -----------------------------------------------------------------------


def package_version() -> str:
    """The installed carma-mip version ("unknown" when run from a source tree)."""
    try:
        return importlib.metadata.version("carma-mip")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def run_job(
    job: LabelJob,
    population: Population,
    out: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    jobs: int = 1,
    dask_address: str | None = None,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
) -> LabelSummary:
    """Label ``population`` under ``job`` into ``out``, resuming an interrupted run.

    Parameters
    ----------
    job : LabelJob
        What determines the labels.
    population : Population
        The people, in person-id order.
    out : Path
        The final Parquet table; chunks go to ``<out>.parts`` until it is written.
    chunk_size : int
        Persons per unit of work (part of the job's identity: it names the chunk files).
    jobs : int
        Worker processes on this machine (1: solve in this process).
    dask_address : str, optional
        A Dask scheduler's address (e.g. ``tcp://scheduler:8786``); replaces ``jobs``.
    progress : bool
        Show a progress bar on stderr.
    arguments : mapping, optional
        The command's arguments, recorded in the output's metadata.

    Raises
    ------
    OutputConflictError
        ``out`` belongs to a job with other arguments, or another run is writing it.
    LabelRunError
        A worker died, or the Dask scheduler cannot be reached; finished chunks are kept.
    BackendUnavailableError
        The solver backend cannot run here.
    """
    if jobs < 1:
        raise LabelInputError(f"The 'jobs' must be at least 1. Got {jobs!r} instead.")
    if dask_address is not None and jobs != 1:
        raise LabelInputError("Give either 'jobs' or 'dask_address', not both.")
    start = time.perf_counter()
    scm = load_scm(job.dataset)
    classifier = load_classifier(job.dataset, job.classifier)
    elicitor = PreferenceElicitor(scm, job.scheme, job.seed)
    backend = backend_class(job.backend)
    if not backend.available():
        raise BackendUnavailableError(f"The backend {job.backend!r} is not available here.")
    identity = {
        "format_version": FORMAT_VERSION,
        "job": asdict(job),
        "people": population.size,
        "population": population.source,
        "chunk_size": chunk_size,
        "scm_hash": scm.content_hash(),
        "classifier_hash": classifier.content_hash(),
        "package_version": package_version(),
        "backend_version": backend.version(),
    }
    metadata = {
        "identity": json.dumps(identity, sort_keys=True),
        "dataset": job.dataset,
        "classifier": job.classifier,
        "classifier_kind": classifier.kind,
        "scheme": job.scheme,
        "method": job.method,
        "seed": str(job.seed),
        "cost_profile": job.cost,
        "scm_hash": identity["scm_hash"],
        "classifier_hash": identity["classifier_hash"],
        "package_version": identity["package_version"],
        "backend": job.backend,
        "backend_version": identity["backend_version"],
        "elicitation": json.dumps(elicitor.describe()),
        "weight_scheme": json.dumps(asdict(WeightScheme())),
        "population": json.dumps(population.source),
        "arguments": json.dumps(dict(arguments or {}), sort_keys=True, default=str),
    }
    store = ChunkStore(out)
    plan = plan_chunks(population.size, chunk_size)
    with store.claim(identity) as complete:
        if complete:
            table = pq.ParquetFile(store.out).read(columns=["status"])
            return _summary(store.out, table, 0, start, already_complete=True)
        done = store.finished_chunks(plan)
        tasks = [
            ChunkTask(
                job,
                index,
                np.asarray(persons, dtype=np.int64),
                population.source_index[persons.start : persons.stop],
                population.x[persons.start : persons.stop],
                identity["scm_hash"],
                identity["classifier_hash"],
            )
            for index, persons in enumerate(plan)
            if index not in done
        ]
        labelled = sum(len(task.person_ids) for task in tasks)
        with (
            tqdm(
                total=population.size,
                initial=population.size - labelled,
                unit="label",
                desc="labels",
                file=sys.stderr,
                disable=not progress,
                smoothing=0.1,
            ) as bar,
            contextlib.closing(_execute(tasks, jobs, dask_address)) as results,
        ):
            for index, table in results:
                store.write_chunk(index, table)
                bar.update(table.num_rows)
        table = store.combine(plan, metadata)
    return _summary(store.out, table, labelled, start)


def _summary(
    out: Path, table: pa.Table, labelled: int, start: float, *, already_complete: bool = False
) -> LabelSummary:
    statuses = Counter(table.column("status").to_pylist())
    return LabelSummary(
        out,
        table.num_rows,
        labelled,
        dict(sorted(statuses.items())),
        time.perf_counter() - start,
        already_complete,
    )


def _execute(
    tasks: list[ChunkTask], jobs: int, dask_address: str | None
) -> Iterator[tuple[int, pa.Table]]:
    """(chunk index, table) for every task, in the order they finish."""
    if not tasks:
        return
    if dask_address is not None:
        yield from _on_dask(tasks, dask_address)
    elif jobs == 1 or len(tasks) == 1:
        for task in tasks:
            yield task.index, label_chunk(task)
    else:
        yield from _on_processes(tasks, min(jobs, len(tasks)))


def _on_processes(tasks: list[ChunkTask], jobs: int) -> Iterator[tuple[int, pa.Table]]:
    # spawn, not fork: the driver runs threads (the progress bar) and native libraries.
    executor = ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = {executor.submit(label_chunk, task): task.index for task in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool:
        raise LabelRunError(
            "A worker process died (killed, or out of memory). Finished chunks are kept; run "
            "the same command again to resume."
        ) from None
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the driver is gone.

    A driver killed with SIGKILL cannot stop its workers, and they would wait forever to
    hand it their results.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _on_dask(tasks: list[ChunkTask], address: str) -> Iterator[tuple[int, pa.Table]]:
    from dask.distributed import Client
    from dask.distributed import as_completed as dask_completed

    try:
        client = Client(address, timeout=_DASK_CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise LabelRunError(f"Cannot connect to the Dask scheduler at {address!r}: {exc}") from None
    futures: list[Any] = []
    try:
        futures = client.map(label_chunk, tasks, pure=False)
        index = {future.key: task.index for future, task in zip(futures, tasks, strict=True)}
        for future, table in dask_completed(futures, loop=client.loop, with_results=True):
            yield index[future.key], table
    finally:
        client.cancel(futures)
        client.close()
