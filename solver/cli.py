"""The ``recourse`` command line: parse a person and their constraints, solve, explain.

Commands: ``solve`` (one person's optimal, verified recourse, as text or JSON),
``backends`` (which solver backends this installation can run), ``train-classifier``
(retrain the built-in classifiers), ``fit`` (a causal model and classifier from your own
table and causal graph), ``label`` (labels for a whole population, with
simulated preference elicitation, resumable, on several processes or a Dask cluster) and
``train`` (an amortizer distilled from labels, used by ``solve --method amortized``). The
CLI parses, calls the engine and prints; every rule about people, constraints and costs
lives in ``models`` and ``solver``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from instances import CLASSIFIER_KINDS, DATASETS, classifier_path, load_classifier, load_scm
from models.amortizer import Amortizer, AmortizerFileError, load_amortizer, save_amortizer
from models.classifiers import Classifier, ClassifierFileError
from models.costs import COST_KINDS, CostProfile
from models.elicitation import DEFAULT_SCHEME, SCHEMES, ElicitationError
from models.fitting import FitError, encode_rows, fit_model, read_model, read_table, write_model
from models.graph import GraphError, read_graph
from models.preferences import PersonConstraints, PreferenceError, parse_constraints
from models.scm import ModelFileError, StructuralCausalModel, Variable, VariableType
from solver.amortized import AmortizedSolver, read_labels, train_amortizer
from solver.backends import DEFAULT_BACKEND, backend_class, backend_names
from solver.backends.base import BackendUnavailableError
from solver.bench.report import write_report
from solver.bench.run import DEFAULT_SCHEMES, BenchConfig, BenchInputError, run_bench, split_list
from solver.engine import EngineOptions, RecourseSolver
from solver.labels import (
    DEFAULT_CHUNK_SIZE,
    LABEL_METHODS,
    LabelInputError,
    LabelJob,
    LabelRunError,
    OutputConflictError,
    people_from_frame,
    read_frame,
    read_people,
    run_job,
    sample_population,
)
from solver.milp import SolverSettings, SolveStatus
from solver.result import RecourseResult

EXIT_RECOURSE = 0
"""Recourse found (optimal and verified), or the person is already accepted."""
EXIT_USAGE = 2
"""Bad command line or bad input file (click's own usage errors exit 2 too)."""
EXIT_NO_RECOURSE = 3
"""Proven infeasible: no action within the person's constraints gets them accepted."""
EXIT_SOLVER_FAILURE = 4
"""The solver failed, returned an unknown status, or the backend is not available."""
EXIT_TIME_LIMIT = 5
"""The time limit was reached: the best action found is printed, not proven optimal."""
EXIT_UNVERIFIED = 6
"""The answer failed verification against the exact causal model; printed with the reasons."""
EXIT_OUTPUT_CONFLICT = 7
"""``label``: the output belongs to a job with different arguments, or another run writes it."""
_SEVERITY = (EXIT_RECOURSE, EXIT_NO_RECOURSE, EXIT_TIME_LIMIT, EXIT_UNVERIFIED, EXIT_SOLVER_FAILURE)
"""A table's exit code is its worst person's, in this order."""
METHODS = ("exact", "amortized")
TABLE_SUFFIXES = (".csv", ".parquet")

POPULATION_SEED = 20241
"""Seed of the built-in population that ``--index`` picks people from."""
POPULATION_SIZE = 10_000
"""Individuals sampled from the causal model for the built-in population."""

INSTANCE_SCHEMA_VERSION = 1
INSTANCE_KEYS = ("schema_version", "dataset", "classifier", "individual", "constraints", "cost")
COST_KEYS = ("profile", "sparsity")
DEFAULT_DATASET = "loan"
DEFAULT_CLASSIFIER = "mlp"
DEFAULT_COST = "l1"

# Relative tolerance under which a counterfactual value counts as unchanged.
_UNCHANGED = 1e-9


class InputError(click.ClickException):
    """Bad input data (an instance file, a constraint, a model file): exit 2, no traceback."""

    exit_code = EXIT_USAGE


class SolverFailure(click.ClickException):
    """A backend that cannot run here: exit 4."""

    exit_code = EXIT_SOLVER_FAILURE


_EXIT_CODE_HELP = f"""\
Exit codes:

\b
  {EXIT_RECOURSE}  recourse found (optimal and verified), or already accepted
  {EXIT_USAGE}  usage error or bad input (unknown feature, invalid file, ...)
  {EXIT_NO_RECOURSE}  no recourse exists under the person's constraints (infeasible)
  {EXIT_SOLVER_FAILURE}  solver failure (error or unknown status, backend unavailable)
  {EXIT_TIME_LIMIT}  time limit reached: best action printed, not proven optimal
  {EXIT_UNVERIFIED}  the answer failed verification (printed anyway, with the failures)
  {EXIT_OUTPUT_CONFLICT}  label: --out holds a job with different arguments (or is in use)

A table of people (solve TABLE --out FILE) exits with its worst person's code.
"""


# Options several commands share (each use makes its own click.Option).
DATASET_OPTION = click.option(
    "--dataset", type=click.Choice(DATASETS), default=DEFAULT_DATASET, show_default=True
)
CLASSIFIER_OPTION = click.option(
    "--classifier",
    type=click.Choice(CLASSIFIER_KINDS),
    default=DEFAULT_CLASSIFIER,
    show_default=True,
)
BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(backend_names()),
    default=DEFAULT_BACKEND,
    show_default=True,
    help="MILP solver backend.",
)
TIME_LIMIT_OPTION = click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=SolverSettings().time_limit,
    show_default=True,
    help="Seconds per person and exact solve.",
)
JOBS_OPTION = click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine (1: solve in this process).",
)
PROGRESS_OPTION = click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Progress bars."
)


@click.group(
    help="Exact, verified, personalized causal algorithmic recourse.\n\n" + _EXIT_CODE_HELP
)
def main() -> None:
    """The ``recourse`` command group."""


# -- the person to solve for -------------------------------------------------------------


@dataclass(frozen=True)
class DataRow:
    """Row ``row`` (0-based) of the table in ``path``."""

    path: Path
    row: int


@dataclass(frozen=True)
class Instance:
    """Everything ``solve`` needs, before the causal model and classifier are loaded.

    ``person`` is an individual's features (from an instance file), the index of a
    rejected person of the built-in population, or a row of a table. ``constraints`` is the
    raw document that :func:`models.preferences.parse_constraints` validates. ``model_dir``,
    a folder written by ``fit``, replaces the built-in ``dataset``.
    """

    dataset: str
    classifier: str
    who: str
    """The person, as error messages name them."""
    source: str
    """Where the person comes from, as error messages name it."""
    person: Mapping[str, Any] | int | DataRow
    constraints: dict[str, Any] = field(default_factory=dict)
    cost: str = DEFAULT_COST
    sparsity: float = 0.0
    model_dir: Path | None = None


@dataclass(frozen=True)
class Overrides:
    """Command-line flags that change an instance (``None``/empty: keep the file's)."""

    dataset: str | None = None
    classifier: str | None = None
    locks: tuple[str, ...] = ()
    rank: list[str] | None = None
    score: dict[str, float] | None = None
    bounds: dict[str, list[float | None]] = field(default_factory=dict)
    directions: dict[str, str] = field(default_factory=dict)
    max_changes: int | None = None
    cost: str | None = None
    sparsity: float | None = None


def read_instance(path: Path) -> Instance:
    """Read and check an instance document (the fields ``solve``'s help describes)."""
    where = f"the instance file {path.name}"
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{_capitalized(where)} is not valid JSON: {exc}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{_capitalized(where)} cannot be read: {exc}.") from None
    if not isinstance(document, Mapping):
        raise InputError(
            f"{_capitalized(where)} must hold a JSON object. Got {type(document).__name__}."
        )
    _check_keys(document, INSTANCE_KEYS, where)
    version = document.get("schema_version")
    if version != INSTANCE_SCHEMA_VERSION or isinstance(version, bool):
        raise InputError(
            f"The 'schema_version' of {where} must be {INSTANCE_SCHEMA_VERSION}. "
            f"Got {version!r} instead."
        )
    dataset = _choice(document, "dataset", DATASETS, where, default=None)
    classifier = _choice(document, "classifier", CLASSIFIER_KINDS, where, DEFAULT_CLASSIFIER)
    individual = document.get("individual")
    if not isinstance(individual, Mapping):
        raise InputError(
            f"The 'individual' of {where} must be an object {{feature: value}}. "
            f"Got {individual!r} instead."
        )
    constraints = document.get("constraints", {})
    if not isinstance(constraints, Mapping):
        raise InputError(
            f"The 'constraints' of {where} must be an object. Got {constraints!r} instead."
        )
    cost = document.get("cost", {})
    if not isinstance(cost, Mapping):
        raise InputError(f"The 'cost' of {where} must be an object. Got {cost!r} instead.")
    _check_keys(cost, COST_KEYS, f"the 'cost' of {where}")
    return Instance(
        dataset=dataset,
        classifier=classifier,
        who=f"the individual in {path.name}",
        source=where,
        person=dict(individual),
        constraints=dict(constraints),
        cost=_choice(cost, "profile", COST_KINDS, f"the 'cost' of {where}", DEFAULT_COST),
        sparsity=_sparsity(cost.get("sparsity", 0.0), f"the 'cost.sparsity' of {where}"),
    )


def _check_keys(document: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise InputError(
            f"{_capitalized(where)} has unknown keys {unknown}; allowed keys are {list(allowed)}."
        )


def _choice(
    document: Mapping[str, Any],
    key: str,
    choices: Sequence[str],
    where: str,
    default: str | None,
) -> str:
    value = document.get(key, default)
    if value not in choices:
        raise InputError(
            f"The '{key}' of {where} must be one of {list(choices)}. Got {value!r} instead."
        )
    return str(value)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sparsity(value: Any, where: str) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise InputError(
            f"{_capitalized(where)} must be a finite number >= 0. Got {value!r} instead."
        )
    return float(value)


def apply_overrides(instance: Instance, flags: Overrides) -> Instance:
    """The instance with the command line's flags applied over the file's values.

    Locks are added; ``--rank``/``--score`` replace the file's preferences; bounds and
    directions are updated per feature; everything else is replaced.
    """
    raw = dict(instance.constraints)
    if flags.locks:
        existing = raw.get("lock", [])
        if isinstance(existing, list):  # anything else: parse_constraints reports it
            raw["lock"] = existing + [name for name in flags.locks if name not in existing]
    if flags.rank is not None or flags.score is not None:
        for key in ("rank", "score", "weights"):
            raw.pop(key, None)
        if flags.rank is not None:
            raw["rank"] = flags.rank
        if flags.score is not None:
            raw["score"] = flags.score
    for key, updates in (("bounds", flags.bounds), ("direction", flags.directions)):
        existing = raw.get(key, {})
        if updates and isinstance(existing, Mapping):
            raw[key] = {**existing, **updates}
    if flags.max_changes is not None:
        raw["max_changes"] = flags.max_changes
    return replace(
        instance,
        dataset=flags.dataset or instance.dataset,
        classifier=flags.classifier or instance.classifier,
        constraints=raw,
        cost=flags.cost or instance.cost,
        sparsity=instance.sparsity if flags.sparsity is None else flags.sparsity,
    )


def individual_row(
    individual: Mapping[str, Any], scm: StructuralCausalModel, where: str
) -> np.ndarray:
    """The factual row of ``individual``: every feature, finite, in its domain and type."""
    missing = [name for name in scm.names if name not in individual]
    unknown = sorted(set(individual) - set(scm.names))
    if missing or unknown:
        problems = [
            f"{label} {names}"
            for label, names in (("missing", missing), ("unknown", unknown))
            if names
        ]
        raise InputError(
            f"The 'individual' of {where} must give a value for each feature {list(scm.names)}. "
            f"Got {', '.join(problems)}."
        )
    x = np.array([_feature_value(var, individual[var.name], where) for var in scm.variables])
    with np.errstate(all="ignore"):
        noise = scm.abduct_noise(x[None, :])[0]
    impossible = [name for name, u in zip(scm.names, noise, strict=True) if not np.isfinite(u)]
    if impossible:
        raise InputError(
            f"The 'individual' of {where} cannot come from the causal model: no noise value "
            f"reproduces {impossible} through their structural equations (a sigmoid, say, "
            f"never reaches its limits). Move them strictly inside their range."
        )
    return x


def _feature_value(var: Variable, value: Any, where: str) -> float:
    field_name = f"'individual.{var.name}' of {where}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"The {field_name} must be a finite number. Got {value!r} instead.")
    if not var.lower <= value <= var.upper:
        raise InputError(
            f"The {field_name} must lie in the feature's domain [{var.lower}, {var.upper}]. "
            f"Got {value!r} instead."
        )
    if var.type is not VariableType.CONTINUOUS and value != round(value):
        raise InputError(
            f"The {field_name} must be a whole number ({var.type.value}). Got {value!r} instead."
        )
    return float(value)


def table_row(
    person: DataRow, scm: StructuralCausalModel, encoding: Mapping[str, Any]
) -> dict[str, float]:
    """The features of one row of a table (text columns encoded as the model was fitted)."""
    table = read_table(person.path)
    if person.row >= len(table):
        raise click.BadParameter(
            f"{person.row} is out of range: {person.path.name} has {len(table)} rows; choose "
            f"a row from 0 to {len(table) - 1}.",
            param_hint="'--row'",
        )
    values = encode_rows(table.iloc[[person.row]], scm, encoding)[0]
    return dict(zip(scm.names, values.tolist(), strict=True))


def model_classifier(model_dir: Path) -> str:
    """The classifier kind of a model folder: the only one it holds, else the default."""
    kinds = [kind for kind in CLASSIFIER_KINDS if (model_dir / f"classifier_{kind}.json").exists()]
    return kinds[0] if len(kinds) == 1 else DEFAULT_CLASSIFIER


def rejected_population(scm: StructuralCausalModel, classifier: Classifier) -> np.ndarray:
    """The people of the built-in seeded population that ``classifier`` rejects, in order."""
    x, _ = scm.sample(POPULATION_SIZE, seed=POPULATION_SEED)
    return x[~classifier.accepts(x)]


def population_row(
    index: int, scm: StructuralCausalModel, classifier: Classifier, kind: str
) -> np.ndarray:
    rejected = rejected_population(scm, classifier)
    if index >= len(rejected):
        raise click.BadParameter(
            f"{index} is out of range: the {kind!r} classifier rejects {len(rejected)} of the "
            f"{POPULATION_SIZE} people of the population (seed {POPULATION_SEED}); choose an "
            f"index from 0 to {len(rejected) - 1}.",
            param_hint="'--index'",
        )
    return rejected[index]


# -- parsing flags -----------------------------------------------------------------------


def _split_names(values: Sequence[str]) -> tuple[str, ...]:
    """Repeatable, comma-separated feature names, in order, empty items dropped."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def _pair(text: str, option: str, example: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(
            f"expects feature=value, like {example!r}. Got {text!r} instead.", param_hint=option
        )
    return name.strip(), value.strip()


def _number(text: str, option: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(
            f"{what} must be a number. Got {text!r} instead.", param_hint=option
        ) from None


def parse_rank(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else list(_split_names([value]))


def parse_score(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, float] | None:
    if value is None:
        return None
    scores = {}
    for item in value.split(","):
        name, score = _pair(item, "'--score'", "income=5,savings=2")
        scores[name] = _number(score, "'--score'", f"the score of {name!r}")
    return scores


def parse_bounds(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, list[float | None]]:
    bounds: dict[str, list[float | None]] = {}
    for item in values:
        name, interval = _pair(item, "'--bound'", "income=-1:5")
        lower, sep, upper = interval.partition(":")
        if not sep or ":" in upper:
            raise click.BadParameter(
                f"expects feature=lower:upper (an empty side is open, e.g. 'income=:5'). "
                f"Got {item!r} instead.",
                param_hint="'--bound'",
            )
        bounds[name] = [
            None if not side.strip() else _number(side, "'--bound'", f"a bound of {name!r}")
            for side in (lower, upper)
        ]
    return bounds


def parse_directions(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    return dict(_pair(item, "'--direction'", "income=increase") for item in values)


def check_export_path(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> Path | None:
    if value is not None and value.suffix.lower() not in (".lp", ".mps"):
        raise click.BadParameter(
            f"must end in .lp or .mps. Got {str(value)!r} instead.", param_hint="'--export'"
        )
    return value


# -- solve -------------------------------------------------------------------------------


@main.command(epilog=_EXIT_CODE_HELP)
@click.argument(
    "instance_json",
    required=False,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default=None,
    help=f"Built-in causal model (default: the file's, else {DEFAULT_DATASET}).",
)
@click.option(
    "--index",
    type=click.IntRange(min=0),
    help=f"Solve for the N-th (0-based) person the classifier rejects among "
    f"{POPULATION_SIZE} people sampled from the causal model with seed {POPULATION_SEED}.",
)
@click.option(
    "--classifier",
    type=click.Choice(CLASSIFIER_KINDS),
    default=None,
    help=f"Built-in classifier (default: the file's, else {DEFAULT_CLASSIFIER}).",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A model folder written by 'recourse fit', instead of a built-in dataset (its "
    "classifier: --classifier, else the only one it holds); with --method amortized, an "
    "amortizer folder written by 'recourse train'.",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="exact",
    show_default=True,
    help="exact: the MILP; amortized: the --model amortizer's answer, verified, repaired "
    "by the MILP when it fails.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With a .csv or .parquet table of people instead of INSTANCE_JSON: write one row "
    "per person to this .parquet or .csv file.",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .csv or .parquet table of people, one column per feature; with --row.",
)
@click.option("--row", type=click.IntRange(min=0), help="Solve for this (0-based) row of --data.")
@click.option(
    "--lock",
    "locks",
    multiple=True,
    help="Feature(s) this person cannot change; repeatable and/or comma-separated.",
)
@click.option("--rank", callback=parse_rank, help="Actionable features, easiest first: 'a,b,c'.")
@click.option(
    "--score",
    callback=parse_score,
    help="Ease of change per feature, 1 (very hard) to 5 (very easy): 'income=5,savings=2'.",
)
@click.option(
    "--bound",
    "bounds",
    multiple=True,
    callback=parse_bounds,
    help="Range of a value the person sets, 'feature=lower:upper'; an empty side is open "
    "('income=:5'). Repeatable.",
)
@click.option(
    "--direction",
    "directions",
    multiple=True,
    callback=parse_directions,
    help="'feature=increase' or 'feature=decrease'. Repeatable.",
)
@click.option("--max-changes", type=click.IntRange(min=0), help="Most features an action may set.")
@click.option(
    "--cost",
    type=click.Choice(COST_KINDS),
    default=None,
    help=f"Cost profile (default: the file's, else {DEFAULT_COST}).",
)
@click.option(
    "--sparsity",
    type=click.FloatRange(min=0),
    default=None,
    help="Extra cost per feature acted on (default: the file's, else 0).",
)
@BACKEND_OPTION
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Seconds per MILP solve (default {SolverSettings().time_limit:g}).",
)
@click.option(
    "--margin",
    type=click.FloatRange(min=0),
    default=None,
    help=f"Validity margin in logit units (default {EngineOptions().margin:g}).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=check_export_path,
    help="Also write this person's MILP to a .lp or .mps file.",
)
@click.pass_context
def solve(
    ctx: click.Context,
    instance_json: Path | None,
    dataset: str | None,
    index: int | None,
    classifier: str | None,
    model_dir: Path | None,
    method: str,
    out_path: Path | None,
    data_path: Path | None,
    row: int | None,
    locks: tuple[str, ...],
    rank: list[str] | None,
    score: dict[str, float] | None,
    bounds: dict[str, list[float | None]],
    directions: dict[str, str],
    max_changes: int | None,
    cost: str | None,
    sparsity: float | None,
    backend: str,
    time_limit: float | None,
    margin: float | None,
    output_format: str,
    export_path: Path | None,
) -> None:
    """Find the cheapest action that gets one person accepted, and verify it.

    The person is INSTANCE_JSON, a document {"schema_version": 1, "dataset": "loan",
    "classifier": "mlp" | "lr", "individual": {feature: value, ...every feature},
    "constraints": {"lock", "bounds", "direction", "max_changes", "rank" | "score" |
    "weights", "soft_limits"}, "cost": {"profile": "l1" | "carma", "sparsity": 0}}, or
    the --index-th rejected person of the built-in population, or --row N of the table
    --data FILE. Flags override the file: --lock adds locks, --rank/--score replace its
    preferences, --bound/--direction update single features, the other flags replace its
    values. With --model DIR (from 'recourse fit'), the person is --index N or --data --row.

    Many people at once: give a .csv or .parquet table (one column per feature, and
    optionally a 'constraints' column of JSON documents, as 'recourse label' writes; else
    the flags' constraints apply to everyone) instead of INSTANCE_JSON, and --out FILE.

    --method amortized --model DIR answers with an amortizer from 'recourse train' (its
    dataset, classifier and cost): every answer is verified, and one that fails is
    repaired by the exact MILP on the predicted features, then by the full MILP. The
    output says which path answered ('answered_by').
    """
    amortizer = None
    if method == "amortized":
        amortizer = _amortizer_for(model_dir, dataset, classifier, cost)
        dataset, classifier, cost = (
            amortizer.spec.dataset,
            amortizer.spec.classifier,
            amortizer.spec.cost,
        )
        model_dir = None
    table = instance_json is not None and instance_json.suffix.lower() in TABLE_SUFFIXES
    if table != (out_path is not None):
        raise click.UsageError(
            "Give a .csv or .parquet table of people together with --out FILE (and --out "
            "only with such a table)."
        )
    if (data_path is None) != (row is None):
        raise click.UsageError("Give --data FILE and --row N together.")
    if sum(given is not None for given in (instance_json, index, row)) != 1:
        raise click.UsageError(
            "Give either INSTANCE_JSON or --index N or --data FILE --row N (exactly one of them)."
        )
    if model_dir is not None and (dataset is not None or instance_json is not None):
        raise click.UsageError(
            "--model replaces the built-in dataset: use it with --index N or --data FILE "
            "--row N, without --dataset or INSTANCE_JSON."
        )
    model = DEFAULT_DATASET if model_dir is None else str(model_dir)
    kind = DEFAULT_CLASSIFIER if model_dir is None else model_classifier(model_dir)
    if table and instance_json is not None:
        instance = Instance(model, kind, "", "", {}, model_dir=model_dir)
    elif instance_json is not None:
        instance = read_instance(instance_json)
    elif data_path is not None and row is not None:
        where = f"row {row} of {data_path.name}"
        instance = Instance(model, kind, where, where, DataRow(data_path, row), model_dir=model_dir)
    else:
        instance = Instance(
            model,
            kind,
            who=f"rejected individual {index}",
            source=f"the built-in population (seed {POPULATION_SEED})",
            person=index,
            model_dir=model_dir,
        )
    flags = Overrides(
        dataset=dataset,
        classifier=classifier,
        locks=_split_names(locks),
        rank=rank,
        score=score,
        bounds=bounds,
        directions=directions,
        max_changes=max_changes,
        cost=cost,
        sparsity=sparsity,
    )
    instance = apply_overrides(instance, flags)
    settings = SolverSettings() if time_limit is None else SolverSettings(time_limit=time_limit)
    options = EngineOptions() if margin is None else EngineOptions(margin=margin)
    if table and instance_json is not None and out_path is not None:
        scm, table_classifier, people, constraints = load_table(instance, instance_json)
        problem = Problem(
            instance,
            scm,
            table_classifier,
            people[0],
            constraints[0],
            CostProfile.for_model(instance.cost, scm, table_classifier, instance.sparsity),
        )
        engine = make_engine(problem, backend, settings, options)
        with _stdout_to_stderr():
            results = solve_many(engine, amortizer, people, constraints)
        ctx.exit(write_results(results, scm, out_path))
    problem = load_problem(instance)
    engine = make_engine(problem, backend, settings, options)
    if export_path is not None:
        export_milp(engine, problem, export_path)
    with _stdout_to_stderr():
        if amortizer is None:
            result = engine.solve(problem.x, problem.constraints)
        else:
            result = solve_many(engine, amortizer, problem.x[None, :], [problem.constraints])[0]
    if output_format == "json":
        click.echo(json.dumps(result_document(result, problem), indent=2))
    else:
        click.echo(explain(result, problem))
    ctx.exit(exit_code(result))


def _amortizer_for(
    model_dir: Path | None, dataset: str | None, classifier: str | None, cost: str | None
) -> Amortizer:
    """The --model amortizer; a --dataset, --classifier or --cost other than its own exits 2."""
    if model_dir is None:
        raise click.UsageError(
            "--method amortized needs --model DIR, an amortizer written by 'recourse train'."
        )
    try:
        amortizer = load_amortizer(model_dir)
    except AmortizerFileError as exc:
        raise InputError(str(exc)) from None
    spec = amortizer.spec
    for option, given, own in (
        ("--dataset", dataset, spec.dataset),
        ("--classifier", classifier, spec.classifier),
        ("--cost", cost, spec.cost),
    ):
        if given is not None and given != own:
            raise click.UsageError(
                f"{option} {given} differs from the amortizer's {own!r}: an amortizer answers "
                f"for the causal model, classifier and cost it was trained on."
            )
    return amortizer


def load_table(
    instance: Instance, path: Path
) -> tuple[StructuralCausalModel, Classifier, np.ndarray, list[PersonConstraints]]:
    """The people of a table and their constraints (its 'constraints' column, else the
    instance's); feature columns named like the features or, as in a label table,
    'factual.<feature>'."""
    where = f"the people table {path.name!r}"
    try:
        if instance.model_dir is not None:
            scm, classifier, _ = read_model(instance.model_dir, instance.classifier)
        else:
            scm = load_scm(instance.dataset)
            classifier = load_classifier(instance.dataset, instance.classifier)
        classifier.check_features(scm.names)
        frame, _ = read_frame(path, where)
        if all(f"factual.{name}" in frame.columns for name in scm.names):
            features = frame[[f"factual.{name}" for name in scm.names]]
            features.columns = list(scm.names)
        else:
            features = frame[[c for c in frame.columns if c != "constraints"]]
        people = people_from_frame(features, scm, where).x
        if "constraints" in frame.columns:
            documents = [
                _constraints_cell(cell, i, where) for i, cell in enumerate(frame["constraints"])
            ]
        else:
            documents = [instance.constraints] * len(people)
        constraints = [
            parse_constraints(document, scm, who=f"row {i} of {path.name}")
            for i, document in enumerate(documents)
        ]
    except (LabelInputError, PreferenceError, ModelFileError, ClassifierFileError) as exc:
        raise InputError(str(exc)) from None
    return scm, classifier, people, constraints


def _constraints_cell(cell: Any, row: int, where: str) -> dict[str, Any]:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return {}
    try:
        document = json.loads(cell)
    except (TypeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"The 'constraints' of row {row} of {where} must be a JSON object. Got {cell!r} "
            f"({exc})."
        ) from None
    if not isinstance(document, dict):
        raise InputError(
            f"The 'constraints' of row {row} of {where} must be a JSON object. Got {cell!r}."
        )
    return document


def solve_many(
    engine: RecourseSolver,
    amortizer: Amortizer | None,
    people: np.ndarray,
    constraints: Sequence[PersonConstraints],
) -> list[RecourseResult]:
    """Every person's answer: the MILP's, or the amortizer's with repairs (one batch)."""
    if amortizer is None:
        return [engine.solve(x, c) for x, c in zip(people, constraints, strict=True)]
    try:
        solver = AmortizedSolver(amortizer, engine.scm, engine.classifier, exact=engine)
    except AmortizerFileError as exc:  # trained for another causal model or classifier
        raise InputError(str(exc)) from None
    return solver.solve(people, constraints)


def write_results(results: Sequence[RecourseResult], scm: StructuralCausalModel, out: Path) -> int:
    """One row per person to ``out`` (.parquet or .csv, atomically), a summary line, and
    the exit code: the worst of any person's (see :func:`exit_code`)."""
    if out.suffix.lower() not in TABLE_SUFFIXES:
        raise click.BadParameter(
            f"must end in .parquet or .csv. Got {out.name!r} instead.", param_hint="'--out'"
        )
    rows = []
    for i, result in enumerate(results):
        row: dict[str, Any] = {
            "row": i,
            "status": result.status.value,
            "answered_by": result.answered_by,
            "verified": result.verified,
            "cost": result.cost,
            "probability": result.probability,
            "runtime_seconds": result.solver.runtime_seconds,
            "message": result.message,
        }
        counterfactual = result.counterfactual or {}
        for name in scm.names:
            row[f"factual.{name}"] = result.factual[name]
            row[f"action_mask.{name}"] = name in result.action
            row[f"action_value.{name}"] = result.action.get(name)
            row[f"counterfactual.{name}"] = counterfactual.get(name)
        rows.append(row)
    frame = pd.DataFrame(rows)
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix.lower() == ".csv":
            frame.to_csv(temporary, index=False)
        else:
            frame.to_parquet(temporary, index=False)
        os.replace(temporary, out)
    except OSError as exc:
        raise InputError(f"Cannot write {str(out)!r}: {exc}.") from None
    paths = ", ".join(f"{k} {v}" for k, v in sorted(Counter(frame["answered_by"]).items()))
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(Counter(frame["status"]).items()))
    click.echo(
        f"wrote {len(frame)} answers to {out} ({statuses}; answered by: {paths}; "
        f"{int(frame['verified'].sum())} verified)"
    )
    codes = [exit_code(result) for result in results]
    return max(codes, key=lambda code: _SEVERITY.index(code))


@dataclass(frozen=True)
class Problem:
    """A loaded, validated instance: the models, the factual row and the constraints."""

    instance: Instance
    scm: StructuralCausalModel
    classifier: Classifier
    x: np.ndarray
    constraints: PersonConstraints
    cost: CostProfile


def load_problem(instance: Instance) -> Problem:
    """Load the models and check the person and constraints; bad input exits 2."""
    try:
        encoding: dict[str, Any] = {}  # built-in models hold numbers only
        if instance.model_dir is not None:
            scm, classifier, encoding = read_model(instance.model_dir, instance.classifier)
        else:
            scm = load_scm(instance.dataset)
            classifier = load_classifier(instance.dataset, instance.classifier)
        classifier.check_features(scm.names)
        if isinstance(instance.person, int):
            x = population_row(instance.person, scm, classifier, instance.classifier)
        elif isinstance(instance.person, DataRow):
            x = individual_row(table_row(instance.person, scm, encoding), scm, instance.source)
        else:
            x = individual_row(instance.person, scm, instance.source)
        constraints = parse_constraints(instance.constraints, scm, who=instance.who)
        cost = CostProfile.for_model(instance.cost, scm, classifier, instance.sparsity)
    except (PreferenceError, ModelFileError, ClassifierFileError, ValueError) as exc:
        raise InputError(str(exc)) from None
    return Problem(instance, scm, classifier, x, constraints, cost)


def make_engine(
    problem: Problem, backend: str, settings: SolverSettings, options: EngineOptions
) -> RecourseSolver:
    try:
        with _stdout_to_stderr():
            return RecourseSolver(
                problem.scm,
                problem.classifier,
                problem.cost,
                backend=backend,
                settings=settings,
                options=options,
            )
    except BackendUnavailableError as exc:
        raise SolverFailure(str(exc)) from None


def export_milp(engine: RecourseSolver, problem: Problem, path: Path) -> None:
    """Write the person's MILP (no incumbent box) as .lp or .mps."""
    from solver.backends.pyomo import export_model  # imports Pyomo: only when asked

    formulation = engine.formulation
    milp = formulation.instantiate(formulation.context(problem.x, problem.constraints))
    try:
        export_model(milp, path)
    except OSError as exc:
        raise InputError(f"Cannot write the model to {str(path)!r}: {exc}.") from None
    click.echo(
        f"wrote the MILP ({milp.num_cols} columns, {milp.num_rows} rows) to {path}", err=True
    )


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what native solver code writes to stdout (HiGHS's banner) to stderr instead.

    Keeps ``--format json`` output parseable. Works on file descriptor 1, so it catches
    C-level writes; a no-op when the process has no real stdout.
    """
    descriptors = _standard_descriptors()
    if descriptors is None:
        yield
        return
    stdout_fd, stderr_fd = descriptors
    saved = os.dup(stdout_fd)
    os.dup2(stderr_fd, stdout_fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # flush C stdio buffers; not on every platform
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, stdout_fd)
        os.close(saved)


def _standard_descriptors() -> tuple[int, int] | None:
    """The process's stdout and stderr descriptors, flushed; None without real ones."""
    try:
        streams = (sys.__stdout__, sys.__stderr__)
        descriptors = tuple(stream.fileno() for stream in streams if stream is not None)
        for stream in (sys.stdout, *streams):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # e.g. an embedded interpreter without a console
        return None
    return (descriptors[0], descriptors[1]) if len(descriptors) == 2 else None


def exit_code(result: RecourseResult) -> int:
    """The process exit code for ``result`` (see the module constants)."""
    if result.status is SolveStatus.INFEASIBLE:
        return EXIT_NO_RECOURSE
    if result.status in (SolveStatus.ERROR, SolveStatus.UNKNOWN, SolveStatus.NOT_FOUND):
        return EXIT_SOLVER_FAILURE
    if result.counterfactual is not None and not result.verified:
        return EXIT_UNVERIFIED
    if result.status is SolveStatus.TIME_LIMIT:
        return EXIT_TIME_LIMIT
    return EXIT_RECOURSE


def result_document(result: RecourseResult, problem: Problem) -> dict[str, Any]:
    """``result.to_dict()`` plus what was solved: dataset, classifier, cost profile."""
    document = result.to_dict()
    document["dataset"] = problem.instance.dataset
    document["classifier"] = problem.instance.classifier
    document["cost_profile"] = {"kind": problem.cost.kind, "sparsity": problem.cost.sparsity}
    return document


# -- explaining a result -----------------------------------------------------------------


def explain(result: RecourseResult, problem: Problem) -> str:
    """A short human explanation of ``result``."""
    instance = problem.instance
    lines = [
        f"Person: {instance.who} ({instance.dataset} model, {instance.classifier} classifier, "
        f"{problem.cost.kind} cost)"
    ]
    if result.status is SolveStatus.INFEASIBLE:
        lines += _infeasible_lines(problem.constraints)
    elif result.counterfactual is None:
        lines.append(_status_line(result))
        if result.message:
            lines.append(f"solver message: {result.message}")
    elif result.factual_probability >= problem.classifier.threshold:
        lines.append(
            f"Already accepted (probability {result.factual_probability:.4f}): no action needed."
        )
    else:
        lines.append(_status_line(result))
        lines += _action_lines(result, result.counterfactual, problem.scm)
        lines.append(f"cost: {_num(result.cost)} ({problem.cost.kind})")
        lines.append(
            f"probability of acceptance: {result.factual_probability:.4g} -> "
            f"{_num(result.probability)}"
        )
        lines += _verification_lines(result)
    lines.append(_solver_line(result))
    return "\n".join(lines)


def _status_line(result: RecourseResult) -> str:
    status = result.status
    if status is SolveStatus.OPTIMAL:
        return "status: optimal (the cheapest action that gets this person accepted)"
    if status is SolveStatus.FEASIBLE:
        return "status: feasible (verified, not proven optimal)"
    if status is SolveStatus.TIME_LIMIT and result.counterfactual is not None:
        return "status: time limit reached (best action found so far, not proven optimal)"
    if status is SolveStatus.TIME_LIMIT:
        return "status: time limit reached before any action was found"
    return f"status: {status.value} (the solver failed)"


def _infeasible_lines(constraints: PersonConstraints) -> list[str]:
    lines = ["status: infeasible", "No recourse exists under these constraints."]
    locked = ", ".join(sorted(constraints.locks)) or "none"
    lines.append(f"  locked: {locked}")
    for name, (lower, upper) in constraints.bounds.items():
        lines.append(f"  bound: {name} in [{_num(lower)}, {_num(upper)}]")
    for name, direction in constraints.directions.items():
        lines.append(f"  direction: {name} may only {direction}")
    if constraints.max_changes is not None:
        lines.append(f"  at most {constraints.max_changes} change(s)")
    return lines


def _action_lines(
    result: RecourseResult, counterfactual: Mapping[str, float], scm: StructuralCausalModel
) -> list[str]:
    factual = result.factual
    changed = {name for name in scm.names if _differs(factual[name], counterfactual[name])}
    moved = changed | set(result.action)
    lines = ["To be accepted, change:"]
    for name, value in result.action.items():
        before = factual[name]
        if name in changed:
            lines.append(f"  {name}: {_num(before)} -> {_num(value)} ({value - before:+.4g})")
        else:
            held = _moved_parents(scm, name, moved)
            reason = f" instead of moving with {held}" if held else ""
            lines.append(f"  {name}: {_num(before)} (held at its current value{reason})")
    knock_on = [name for name in scm.names if name in changed and name not in result.action]
    if knock_on:
        lines.append("What follows from it:")
    for name in knock_on:
        parents = _moved_parents(scm, name, moved) or "the causal model"
        lines.append(
            f"  {name}: {_num(factual[name])} -> {_num(counterfactual[name])} "
            f"(moves with {parents})"
        )
    return lines


def _moved_parents(scm: StructuralCausalModel, name: str, moved: set[str]) -> str:
    parents = [p for p in scm.variables[scm.index[name]].parents if p in moved]
    return " and ".join(parents)


def _verification_lines(result: RecourseResult) -> list[str]:
    if result.verified:
        return ["verified: yes (exact causal model and classifier)"]
    return ["verified: NO"] + [f"  - {failure}" for failure in result.verification_failures]


def _solver_line(result: RecourseResult) -> str:
    info = result.solver
    gap = "" if info.gap is None else f", gap {info.gap:.3g}"
    name = info.version if info.version.startswith(info.name) else f"{info.name} {info.version}"
    seconds = info.runtime_seconds
    runtime = f"{seconds:.2f} s" if seconds >= 0.01 else f"{seconds * 1e3:.3f} ms"
    line = f"solver: {name}, {runtime} ({info.solves} solve(s)){gap}"
    if result.answered_by != "milp":
        line += f"; answered by: {_ANSWERED_BY[result.answered_by]}"
    return line


_ANSWERED_BY = {
    "amortizer": "the amortizer",
    "mask-repair": "the exact MILP on the amortizer's features (its answer failed)",
    "milp-repair": "the exact MILP (the amortizer's answer failed)",
}


def _differs(a: float, b: float) -> bool:
    return abs(a - b) > _UNCHANGED * (1 + abs(a))


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


# -- backends ----------------------------------------------------------------------------


@main.command()
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
def backends(output_format: str) -> None:
    """List the solver backends, whether each can run here, and their versions."""
    rows = [backend_status(name) for name in backend_names()]
    if output_format == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "available" if row["available"] else "unavailable"
        default = " (default)" if row["default"] else ""
        version = f"  {row['version']}" if row["version"] else ""
        click.echo(f"{row['name']:<8} {state}{default}{version}")


def backend_status(name: str) -> dict[str, Any]:
    """Availability and version of one registered backend."""
    try:
        with _stdout_to_stderr():
            cls = backend_class(name)
            available = bool(cls.available())
            version = cls.version() if available else ""
    except BackendUnavailableError:
        available, version = False, ""
    return {
        "name": name,
        "available": available,
        "version": version,
        "default": name == DEFAULT_BACKEND,
    }


# -- train-classifier --------------------------------------------------------------------


@main.command("train-classifier")
@DATASET_OPTION
@click.option(
    "--kind",
    type=click.Choice([*CLASSIFIER_KINDS, "all"]),
    required=True,
    help="Which classifier to train ('all': every kind).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(min=100),
    default=20_000,
    show_default=True,
    help="Individuals sampled from the causal model (split 1/2 train, 1/4 validation, 1/4 test).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write classifier_{kind}.json into (created if missing).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Overwrite the built-in classifiers of the installed instances package instead.",
)
def train_classifier_command(
    dataset: str, kind: str, seed: int, samples: int, out_dir: Path | None, in_place: bool
) -> None:
    """Retrain the built-in classifiers on data sampled from the causal model."""
    # Imported here: scikit-learn takes seconds to import, and every `label --jobs`
    # worker process imports this module.
    from models.training import train_classifier

    if (out_dir is None) == (not in_place):
        raise click.UsageError("Give either --out DIR or --in-place (exactly one of them).")
    kinds = CLASSIFIER_KINDS if kind == "all" else (kind,)
    scm = load_scm(dataset)
    for name in kinds:
        target = out_dir / f"classifier_{name}.json" if out_dir else installed_path(dataset, name)
        classifier = train_classifier(scm, name, seed=seed, n_samples=samples)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(classifier.to_dict()))
        except OSError as exc:
            raise InputError(f"Cannot write {str(target)!r}: {exc}.") from None
        meta = classifier.metadata
        click.echo(
            f"{name}: validation accuracy {meta['validation_accuracy']:.4f}, "
            f"test accuracy {meta['test_accuracy']:.4f} -> {target}"
        )


def installed_path(dataset: str, kind: str) -> Path:
    path = classifier_path(dataset, kind)
    if not isinstance(path, Path):
        raise click.UsageError(
            "The installed instances package is not a plain directory; use --out DIR."
        )
    return path


# -- fit ---------------------------------------------------------------------------------


@main.command()
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A .csv or .parquet table, one row per person.",
)
@click.option(
    "--graph",
    "graph_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The causal graph (TOML): a [feature] table per node with 'role', 'parents' and "
    "optional 'bounds'.",
)
@click.option("--label", required=True, help="The 0/1 outcome column (1: the favourable one).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The model folder to write (created if missing).",
)
@click.option(
    "--classifier",
    type=click.Choice(CLASSIFIER_KINDS),
    default="lr",
    show_default=True,
    help="Logistic regression, or a ReLU MLP 32x32.",
)
@click.option(
    "--drop-missing", is_flag=True, help="Drop rows with missing values instead of stopping."
)
@click.option("--seed", type=int, default=0, show_default=True)
def fit(
    data_path: Path,
    graph_path: Path,
    label: str,
    out_dir: Path,
    classifier: str,
    drop_missing: bool,
    seed: int,
) -> None:
    """Fit a linear causal model and a classifier to your own table and causal graph.

    Writes scm.json, classifier_<kind>.json and fit_report.json to --out (the format of
    the built-in instances; 'recourse solve --model DIR' reads it) and prints R^2 per
    equation and the classifier's accuracy. Bad input (a cycle, a node missing from the
    table, missing values, a constant column, ...) exits 2 with a message naming it.
    """
    try:
        graph = read_graph(graph_path)
        fitted = fit_model(
            read_table(data_path),
            graph,
            label,
            kind=classifier,
            drop_missing=drop_missing,
            seed=seed,
            name=out_dir.resolve().name or "fitted",
            data_name=data_path.name,
        )
        write_model(fitted, out_dir)
    except (GraphError, FitError) as exc:
        raise InputError(str(exc)) from None
    click.echo(fitted.report.summary())
    click.echo(f"wrote scm.json, classifier_{classifier}.json and fit_report.json to {out_dir}")


# -- label -------------------------------------------------------------------------------


class OutputConflict(click.ClickException):
    """``label``'s output belongs to a job with different arguments: exit 7."""

    exit_code = EXIT_OUTPUT_CONFLICT


def check_label_out(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    if value.suffix.lower() != ".parquet":
        raise click.BadParameter(
            f"must end in .parquet. Got {str(value)!r} instead.", param_hint="'--out'"
        )
    return value


@main.command(epilog=_EXIT_CODE_HELP)
@DATASET_OPTION
@CLASSIFIER_OPTION
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    help="People to label: the first N the classifier rejects in a seeded sample of the causal "
    "model; with --people, the first N rows (default: all).",
)
@click.option(
    "--people",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .csv or .parquet table with one column per feature: label these people instead.",
)
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default=DEFAULT_SCHEME,
    show_default=True,
    help="Simulated preference elicitation (defined in models/elicitation.py).",
)
@click.option("--cost", type=click.Choice(COST_KINDS), default=DEFAULT_COST, show_default=True)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds the population and every person's constraints.",
)
@click.option(
    "--method",
    type=click.Choice(LABEL_METHODS),
    default="milp",
    show_default=True,
    help="milp: the exact engine; non-causal or grid-oracle: the benchmark's reference "
    "methods (solver/baselines.py), verified the same way.",
)
@BACKEND_OPTION
@TIME_LIMIT_OPTION
@JOBS_OPTION
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Run on a Dask cluster instead: its scheduler's address, e.g. tcp://scheduler:8786 "
    "(every worker needs carma-mip installed).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="People per unit of work and per chunk file.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    callback=check_label_out,
    help="The Parquet table to write; chunks go to OUT.parts until it is complete.",
)
@PROGRESS_OPTION
@click.pass_context
def label(
    ctx: click.Context,
    dataset: str,
    classifier: str,
    n: int | None,
    people: Path | None,
    scheme: str,
    cost: str,
    seed: int,
    method: str,
    backend: str,
    time_limit: float,
    jobs: int,
    dask_address: str | None,
    chunk_size: int,
    out: Path,
    progress: bool,
) -> None:
    """Label many people with exact, verified recourse under elicited constraints.

    Writes one Parquet row per person (factual features, constraints, status, action,
    counterfactual, cost, probability, timing) with the job's arguments and content hashes
    in the file's metadata. Resumable: a run stopped at any moment finishes when started
    again with the same arguments; other arguments on the same --out are refused (exit 7).
    Exit 0 once the table is complete, whatever each person's status (each is in its row);
    4 when a worker dies, the Dask scheduler cannot be reached or the backend is missing;
    130 when interrupted.
    """
    if dask_address is not None and jobs != 1:
        raise click.UsageError("Give either --jobs N or --dask ADDRESS, not both.")
    arguments = {
        "dataset": dataset,
        "classifier": classifier,
        "n": n,
        "people": None if people is None else str(people),
        "scheme": scheme,
        "cost": cost,
        "seed": seed,
        "method": method,
        "backend": backend,
        "time_limit": time_limit,
        "jobs": jobs,
        "dask": dask_address,
        "chunk_size": chunk_size,
        "out": str(out),
    }
    resume = (
        f"Interrupted. Finished chunks are kept in '{out}.parts'; run the same command again "
        f"to finish the job."
    )
    with _pipeline_errors(ctx, resume):
        job = LabelJob(dataset, classifier, scheme, cost, seed, backend, time_limit, method)
        scm = load_scm(dataset)
        model = load_classifier(dataset, classifier)
        model.check_features(scm.names)
        if people is not None:
            population = read_people(people, scm, n)
        elif n is not None:
            population = sample_population(scm, model, n, seed)
        else:
            raise click.UsageError("Give --n N (people to sample) or --people FILE.")
        with _stdout_to_stderr():  # HiGHS's banner, from this process and the workers
            summary = run_job(
                job,
                population,
                out,
                chunk_size=chunk_size,
                jobs=jobs,
                dask_address=dask_address,
                progress=progress,
                arguments=arguments,
            )
    if summary.already_complete:
        click.echo(f"{out} is already complete ({summary.people} people); nothing to do.")
        return
    statuses = ", ".join(f"{status} {count}" for status, count in summary.statuses.items())
    click.echo(
        f"wrote {summary.people} labels to {out} ({statuses}); {summary.labelled_now} solved "
        f"by this run in {summary.seconds:.1f} s"
    )


@contextlib.contextmanager
def _pipeline_errors(ctx: click.Context, interrupted: str) -> Iterator[None]:
    """The label pipeline's failures as exit codes: bad input 2, another job's output 7,
    a dead worker or missing backend 4; an interruption prints ``interrupted`` and exits
    130 (what finished is kept)."""
    try:
        yield
    except (
        LabelInputError,
        BenchInputError,
        ElicitationError,
        ModelFileError,
        ClassifierFileError,
        AmortizerFileError,
    ) as exc:
        raise InputError(str(exc)) from None
    except OutputConflictError as exc:
        raise OutputConflict(str(exc)) from None
    except (LabelRunError, BackendUnavailableError) as exc:
        raise SolverFailure(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        ctx.exit(130)


# -- train -------------------------------------------------------------------------------


@main.command()
@click.argument("labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The folder to write the amortizer to (amortizer.npz + amortizer.json).",
)
@click.option(
    "--universal",
    is_flag=True,
    help="Train without the constraint inputs (CARMA's universal model); the output layer "
    "still enforces each person's hard constraints.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def train(labels_path: Path, out: Path, universal: bool, seed: int) -> None:
    """Distill an amortizer from a label table written by 'recourse label'.

    Trains one network per hyperparameter setting on 80% of the solved people and keeps
    the one whose verified raw answers are cheapest on the other 20% (an invalid answer
    counts as a cost ratio of 2). The folder records the labels' causal model and
    classifier hashes: the amortizer is refused with any other. Exit 2 on bad input.
    """
    try:
        labels = read_labels(labels_path)
        amortizer, report = train_amortizer(
            labels, constraint_inputs=not universal, seed=seed, label_file=labels_path.name
        )
        save_amortizer(amortizer, out)
    except AmortizerFileError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"Cannot write the amortizer to {str(out)!r}: {exc}.") from None
    chosen = report["candidates"][report["chosen"]]
    ratio = chosen["validation_mean_cost_ratio"]
    click.echo(
        f"trained on {report['people']['train']} people, validated on "
        f"{report['people']['validation']}: hidden {chosen['hidden']}, raw validity "
        f"{chosen['validation_raw_validity']:.2%}, mean cost ratio "
        f"{'-' if ratio is None else format(ratio, '.4f')}, exact mask agreement "
        f"{chosen['validation_mask_agreement']:.2%}; wrote {out}"
    )


# -- bench -------------------------------------------------------------------------------


@main.command()
@DATASET_OPTION
@CLASSIFIER_OPTION
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=BenchConfig.n,
    show_default=True,
    help="Rejected people every method answers, per scheme and cost profile.",
)
@click.option(
    "--schemes",
    default=",".join(DEFAULT_SCHEMES),
    show_default=True,
    help=f"Elicitation schemes, comma-separated, from {', '.join(SCHEMES)}.",
)
@click.option(
    "--costs",
    default="l1",
    show_default=True,
    help=f"Cost profiles, comma-separated, from {', '.join(COST_KINDS)}.",
)
@click.option(
    "--n-train",
    type=click.IntRange(min=1),
    default=BenchConfig.n_train,
    show_default=True,
    help="People whose exact mixed labels train the amortizer (another sample).",
)
@click.option(
    "--n-baseline",
    type=click.IntRange(min=0),
    default=BenchConfig.n_baseline,
    show_default=True,
    help="People the slow reference methods (grid oracle, non-causal) answer: the first of the N.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@BACKEND_OPTION
@TIME_LIMIT_OPTION
@click.option(
    "--bootstrap",
    type=click.IntRange(min=1),
    default=BenchConfig.bootstrap,
    show_default=True,
    help="Bootstrap resamples behind every confidence interval.",
)
@JOBS_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The report folder: report.md, figures/, people.parquet, summary/gaps/timings.csv.",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the label tables and the amortizer go (default: OUT/work). Keep it to resume.",
)
@PROGRESS_OPTION
@click.pass_context
def bench(
    ctx: click.Context,
    dataset: str,
    classifier: str,
    n: int,
    schemes: str,
    costs: str,
    n_train: int,
    n_baseline: int,
    seed: int,
    backend: str,
    time_limit: float,
    bootstrap: int,
    jobs: int,
    out: Path,
    work: Path | None,
    progress: bool,
) -> None:
    """Benchmark exact recourse against the amortizer and reference methods.

    Every method answers the same rejected people under each elicitation scheme and cost
    profile; every answer is re-checked through the causal model. Writes a Markdown report
    with tables, figures and findings (OUT/report.md) and the per-person measures.
    Resumable: every solve goes through the label pipeline under --work; run the same
    command again after an interruption. Exit 0 when the report is written, 2 on bad
    input, 4 when a worker dies or the backend is missing, 7 when --work holds tables of
    other arguments, 130 when interrupted.
    """
    work = work if work is not None else out / "work"
    resume = (
        f"Interrupted. Finished label tables and chunks are kept in '{work}'; run the same "
        f"command again to resume."
    )
    with _pipeline_errors(ctx, resume):
        config = BenchConfig(
            dataset=dataset,
            classifier=classifier,
            schemes=split_list(schemes, SCHEMES, "schemes"),
            costs=split_list(costs, COST_KINDS, "costs"),
            n=n,
            n_train=n_train,
            n_baseline=n_baseline,
            seed=seed,
            backend=backend,
            time_limit=time_limit,
            bootstrap=bootstrap,
        )
        with _stdout_to_stderr():
            outcome = run_bench(config, work, jobs=jobs, progress=progress)
        report = write_report(outcome, out, "recourse bench " + " ".join(sys.argv[2:]))
    click.echo(f"wrote {report} ({outcome.run['seconds']} s)")


if __name__ == "__main__":
    main()
