"""Bring your own data: fit a linear causal model and a classifier to a table and a graph.

:func:`fit_model` reads the graph's columns from the table and infers each column's type:

- numbers that are all 0 or 1, or booleans: ``binary``; other whole numbers: ``integer``;
  other numbers: ``continuous``;
- text with two values: ``binary`` (the values in sorted order are 0 and 1);
- text with 3 to :data:`MAX_LEVELS` values: ``categorical``, one-hot encoded into one binary
  feature per level (``housing_own``, ...) of which exactly one is 1, also in every
  counterfactual (the MILP adds a sum-to-one row). A categorical column must be a root of
  the graph; locks may name it, preferences and bounds name its levels.

Every node with parents gets the linearized causal equation ``x_j = b_0 + sum_p b_p pa_p +
u_j``, fitted by least squares on its parents (a categorical parent enters by its levels but
the first), with normal noise of the residual standard deviation; its counterfactual values
are real numbers, so it is modeled as ``continuous`` whatever its column holds. Roots get a
law estimated from the data: Bernoulli (binary and categorical levels), the empirical
discrete law (whole numbers), normal around the mean (other numbers). Domain bounds, the
values an intervention may set, are the graph's ``bounds`` or else the data's range. The
classifier is trained on the table's rows, shuffled, split 0.5 / 0.25 / 0.25
(:func:`models.training.fit_classifier`).

The model folder holds ``scm.json`` (with the text columns' ``encoding``),
``classifier_<kind>.json`` and ``fit_report.json``, in the built-in instances' formats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.classifiers import Classifier, ClassifierFileError
from models.graph import CausalGraph
from models.scm import ModelFileError, StructuralCausalModel

FloatArray = npt.NDArray[np.float64]
MAX_LEVELS = 10
"""Most distinct values a text column may have (each becomes a one-hot feature)."""
MIN_ROWS = 20
PARQUET_SUFFIXES = (".parquet", ".pq")
_SHOWN_ROWS = 5


class FitError(ValueError):
    """The table, the graph or the label cannot make a model; the message names the column."""


@dataclass(frozen=True)
class EquationFit:
    """The least-squares fit of one node's structural equation."""

    feature: str
    regressors: tuple[str, ...]
    intercept: float
    coefficients: tuple[float, ...]
    r2: float
    residual_sd: float


@dataclass(frozen=True)
class FitReport:
    """What :func:`fit_model` did, for ``fit_report.json`` and the terminal."""

    data: str
    rows: int
    dropped_rows: int
    label: str
    types: Mapping[str, str]
    equations: tuple[EquationFit, ...]
    roots: Mapping[str, str]
    classifier: Mapping[str, Any]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``fit_report.json``)."""
        return {
            "data": self.data,
            "rows": self.rows,
            "dropped_rows": self.dropped_rows,
            "label": self.label,
            "types": dict(self.types),
            "equations": {
                fit.feature: {
                    "regressors": list(fit.regressors),
                    "intercept": fit.intercept,
                    "coefficients": list(fit.coefficients),
                    "r2": fit.r2,
                    "residual_sd": fit.residual_sd,
                }
                for fit in self.equations
            },
            "roots": dict(self.roots),
            "classifier": dict(self.classifier),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines for the terminal: R^2 per equation and the classifier's accuracy."""
        dropped = f" ({self.dropped_rows} with missing values dropped)" if self.dropped_rows else ""
        lines = [f"fitted on {self.rows} rows of {self.data}{dropped}"]
        fits = {fit.feature: fit for fit in self.equations}
        for name in self.types:  # the graph's order
            if name in fits:
                fit = fits[name]
                lines.append(
                    f"  {name} <- {', '.join(fit.regressors)}: R^2 {fit.r2:.3f}, "
                    f"residual sd {fit.residual_sd:.4g}"
                )
            else:
                lines.append(f"  {name}: root, {self.roots[name]}")
        clf = self.classifier
        lines.append(
            f"classifier {clf['kind']}: validation accuracy {clf['validation_accuracy']:.4f}, "
            f"test accuracy {clf['test_accuracy']:.4f}"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class FittedModel:
    """A fitted causal model (its document and parsed form), classifier and report."""

    document: Mapping[str, Any]
    scm: StructuralCausalModel
    classifier: Classifier
    report: FitReport


# -- reading ------------------------------------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table (by the file's suffix)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", *PARQUET_SUFFIXES):
        raise FitError(
            f"The data file must end in .csv, .parquet or .pq. Got {path.name!r} instead."
        )
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except ImportError as exc:
        raise FitError(f"Reading {path.name} needs a Parquet engine (pyarrow): {exc}.") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise FitError(f"The data file {path.name} cannot be read: {exc}.") from None


def read_model(
    directory: Path, kind: str
) -> tuple[StructuralCausalModel, Classifier, dict[str, Any]]:
    """The causal model, the ``kind`` classifier and the text columns' encoding of a model
    folder written by ``fit``."""
    scm_path, clf_path = directory / "scm.json", directory / f"classifier_{kind}.json"
    for path in (scm_path, clf_path):
        if not path.is_file():
            raise FitError(
                f"The model folder {str(directory)!r} has no {path.name}; write it with "
                f"'recourse fit ... --classifier {kind} --out {directory}'."
            )
    try:
        text = scm_path.read_text()
        scm = StructuralCausalModel.from_json(text)
        classifier = Classifier.from_json(clf_path.read_text())
        classifier.check_features(scm.names)
    except (ModelFileError, ClassifierFileError) as exc:
        raise FitError(f"The model folder {str(directory)!r} is not valid: {exc}") from None
    trained_for = classifier.metadata.get("model_hash")
    if trained_for is not None and trained_for != scm.content_hash():
        raise FitError(
            f"The classifier {clf_path.name} in {str(directory)!r} was trained for another "
            f"causal model than its scm.json; fit them again together."
        )
    return scm, classifier, dict(json.loads(text).get("encoding", {}))


def encode_rows(
    table: pd.DataFrame, scm: StructuralCausalModel, encoding: Mapping[str, Any]
) -> FloatArray:
    """The model's feature rows for the rows of ``table`` (text columns encoded).

    ``encoding`` maps a text column to ``{"binary": [value_0, value_1]}`` or ``{"one_hot":
    {value: feature}}``; every other feature is the column of the same name.
    """
    columns: dict[str, FloatArray] = {}
    for column, spec in encoding.items():
        raw = _column(table, column)
        if raw.isna().any():
            rows = np.flatnonzero(raw.isna().to_numpy())[:_SHOWN_ROWS].tolist()
            raise FitError(f"The column {column!r} has missing values (rows {rows}).")
        known = list(spec["binary"]) if "binary" in spec else list(spec["one_hot"])
        unseen = sorted({str(v) for v in raw.dropna()} - set(known))
        if unseen:
            raise FitError(
                f"The column {column!r} holds {unseen}, which the model was not fitted on; "
                f"it knows {known}."
            )
        text = raw.astype(str)
        if "binary" in spec:
            columns[column] = (text == known[1]).to_numpy(dtype=float)
        else:
            for value, feature in spec["one_hot"].items():
                columns[feature] = (text == value).to_numpy(dtype=float)
    for name in scm.names:
        if name not in columns:
            raw = _column(table, name)
            if not (pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_bool_dtype(raw)):
                raise FitError(f"The column {name!r} must hold numbers. Got {raw.dtype} values.")
            columns[name] = raw.to_numpy(dtype=float)
    return np.column_stack([columns[name] for name in scm.names])


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    if name not in table.columns:
        raise FitError(
            f"The table has no column {name!r}, which the model needs; it has "
            f"{list(table.columns)}."
        )
    return table[name]


# -- fitting ------------------------------------------------------------------------------


def fit_model(
    table: pd.DataFrame,
    graph: CausalGraph,
    label: str,
    *,
    kind: str = "lr",
    drop_missing: bool = False,
    seed: int = 0,
    name: str = "fitted",
    data_name: str = "the table",
) -> FittedModel:
    """Fit the causal model and the ``kind`` classifier (see the module docstring).

    Parameters
    ----------
    table:
        One row per individual; the graph's nodes and ``label`` must be columns.
    graph:
        Parents, roles and optional bounds per node.
    label:
        The 0/1 (or true/false) outcome column; 1 is the favourable decision.
    kind:
        ``"lr"`` or ``"mlp"`` (ReLU 32x32).
    drop_missing:
        Drop rows with a missing value in a used column instead of refusing them.
    seed:
        Shuffles the rows before the classifier's split, and seeds the MLP.
    name, data_name:
        The model's name, and how reports name the table.
    """
    if label not in table.columns:
        raise FitError(
            f"The label column {label!r} is not in the table; it has {list(table.columns)}."
        )
    if label in graph.order:
        raise FitError(
            f"The label {label!r} must not be a node of the graph: the classifier predicts it "
            f"from the nodes. Remove its [{label}] table."
        )
    missing = [node for node in graph.order if node not in table.columns]
    if missing:
        raise FitError(
            f"The node {missing[0]!r} of the graph has no column in the table (missing: "
            f"{missing}); the table has {list(table.columns)}."
        )
    used = table[[*graph.order, label]]
    used, dropped = _without_missing(used, drop_missing)
    if len(used) < MIN_ROWS:
        raise FitError(
            f"The table must have at least {MIN_ROWS} complete rows to fit a model. "
            f"Got {len(used)} instead."
        )
    from models.training import fit_classifier  # scikit-learn: see _document

    y = _label_values(used[label], label)
    encoding, types, notes = _infer_columns(used, graph)
    document, equations, roots = _document(used, graph, encoding, types, name, data_name)
    try:
        scm = StructuralCausalModel.from_dict(document)
    except ModelFileError as exc:  # a bug here, not bad input: say so plainly
        raise FitError(f"The fitted model is not valid: {exc}") from None
    x = encode_rows(used, scm, encoding)
    order = np.random.default_rng(seed).permutation(len(x))
    classifier = fit_classifier(
        x[order],
        y[order],
        scm.names,
        kind,
        seed=seed,
        metadata={"model": name, "model_hash": scm.content_hash(), "data": data_name},
    )
    meta = classifier.metadata
    report = FitReport(
        data=data_name,
        rows=len(used),
        dropped_rows=dropped,
        label=label,
        types=types,
        equations=tuple(equations),
        roots=roots,
        classifier={
            "kind": kind,
            **{f"{s}_accuracy": meta[f"{s}_accuracy"] for s in ("train", "validation", "test")},
        },
        notes=tuple(notes),
    )
    return FittedModel(document, scm, classifier, report)


def write_model(fitted: FittedModel, directory: Path) -> None:
    """Write ``scm.json``, ``classifier_<kind>.json`` and ``fit_report.json``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "scm.json").write_text(_model_json(fitted.document))
        (directory / f"classifier_{fitted.classifier.kind}.json").write_text(
            json.dumps(fitted.classifier.to_dict())
        )
        (directory / "fit_report.json").write_text(
            json.dumps(fitted.report.to_dict(), indent=2) + "\n"
        )
    except OSError as exc:
        raise FitError(f"Cannot write the model to {str(directory)!r}: {exc}.") from None


def _model_json(document: Mapping[str, Any]) -> str:
    """The model document with one line per key and per variable, like the built-ins."""
    entries = []
    for key, value in document.items():
        if key == "variables":
            body = ",\n".join(f"    {json.dumps(variable)}" for variable in value)
            entries.append(f'  "variables": [\n{body}\n  ]')
        else:
            entries.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(entries) + "\n}\n"


def _without_missing(table: pd.DataFrame, drop: bool) -> tuple[pd.DataFrame, int]:
    missing = table.isna()
    rows = missing.any(axis=1).to_numpy()
    if not rows.any():
        return table.reset_index(drop=True), 0
    if drop:
        return table[~rows].reset_index(drop=True), int(rows.sum())
    where = []
    for column in table.columns[missing.any(axis=0).to_numpy()]:
        positions = np.flatnonzero(missing[column].to_numpy())
        shown = ", ".join(str(p) for p in positions[:_SHOWN_ROWS])
        more = ", ..." if len(positions) > _SHOWN_ROWS else ""
        rows_word = "row" if len(positions) == 1 else "rows"
        where.append(f"{column!r} {len(positions)} ({rows_word} {shown}{more})")
    raise FitError(
        f"The table has {int(missing.to_numpy().sum())} missing values in {int(rows.sum())} "
        f"rows (0-based): {'; '.join(where)}. Fill them in, or pass --drop-missing to drop "
        f"those rows."
    )


def _label_values(column: pd.Series, label: str) -> FloatArray:
    values = set(column.unique().tolist())
    if not (values <= {0, 1} and len(values) == 2):
        raise FitError(
            f"The label column {label!r} must hold both 0 and 1 (or false and true; 1 is the "
            f"favourable decision). Got values {sorted(map(str, values))[:MAX_LEVELS]} instead."
        )
    return column.to_numpy(dtype=float)


def _infer_columns(
    table: pd.DataFrame, graph: CausalGraph
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Each node's type, the encoding of text columns, and notes for the report."""
    encoding: dict[str, Any] = {}
    types: dict[str, str] = {}
    notes: list[str] = []
    taken = set(graph.order)
    for node in graph.nodes:
        column = table[node.name]
        if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
            values = column.to_numpy(dtype=float)
            if not np.all(np.isfinite(values)):
                raise FitError(f"The column {node.name!r} holds infinite values.")
            distinct = np.unique(values)
            if len(distinct) == 1:
                raise _constant(node.name, distinct[0])
            if set(distinct) <= {0.0, 1.0}:
                kind = "binary"
            elif np.all(distinct == np.round(distinct)):
                kind = "integer"
            else:
                kind = "continuous"
        else:
            levels = sorted(str(v) for v in column.unique())
            if len(levels) == 1:
                raise _constant(node.name, levels[0])
            if len(levels) > MAX_LEVELS:
                raise FitError(
                    f"The column {node.name!r} is not numeric and has {len(levels)} distinct "
                    f"values; at most {MAX_LEVELS} can be one-hot encoded. Encode it as "
                    f"numbers or leave it out of the graph."
                )
            if len(levels) == 2:
                kind = "binary"
                encoding[node.name] = {"binary": levels}
            else:
                kind = "categorical"
                if node.parents:
                    raise FitError(
                        f"The 'parents' of node {node.name!r} must be empty: a categorical "
                        f"column is one-hot encoded and enters the model as a root. Got "
                        f"{list(node.parents)} instead."
                    )
                if node.bounds is not None:
                    raise FitError(
                        f"The node {node.name!r} is categorical; it cannot have 'bounds'."
                    )
                encoding[node.name] = {"one_hot": _level_features(node.name, levels, taken)}
        if node.parents and kind != "continuous":
            notes.append(
                f"{node.name!r} holds {kind} values but has parents: its linear equation makes "
                f"it continuous in the model."
            )
            kind = "continuous"
        types[node.name] = kind
    return encoding, types, notes


def _constant(name: str, value: Any) -> FitError:
    return FitError(
        f"The column {name!r} holds the single value {value!r}; a constant cannot be a cause "
        f"or be changed. Leave it out of the graph."
    )


def _level_features(node: str, levels: Sequence[str], taken: set[str]) -> dict[str, str]:
    """A feature name per level: ``node_level``, made an identifier and unique."""
    features = {}
    for position, level in enumerate(levels):
        stem = re.sub(r"\W+", "_", level).strip("_") or f"level{position}"
        feature = f"{node}_{stem}"
        while feature in taken:
            feature = f"{feature}_{position}"
        taken.add(feature)
        features[level] = feature
    return features


def _document(
    table: pd.DataFrame,
    graph: CausalGraph,
    encoding: Mapping[str, Any],
    types: Mapping[str, str],
    name: str,
    data_name: str,
) -> tuple[dict[str, Any], list[EquationFit], dict[str, str]]:
    """The causal model's JSON document, the equations' fits and the roots' laws."""
    # scikit-learn is imported where it fits: reading a fitted model must stay light.
    from sklearn.linear_model import LinearRegression

    variables: list[dict[str, Any]] = []
    one_hot: dict[str, list[str]] = {}
    equations: list[EquationFit] = []
    roots: dict[str, str] = {}
    regressors: dict[str, tuple[list[str], FloatArray]] = {}
    n = len(table)
    for node in graph.nodes:
        spec = encoding.get(node.name, {})
        if "one_hot" in spec:
            text = table[node.name].astype(str)
            levels = spec["one_hot"]
            one_hot[node.name] = list(levels.values())
            shares = []
            for value, feature in levels.items():
                share = float((text == value).mean())
                shares.append(f"{feature} {share:.3f}")
                noise = {"distribution": "bernoulli", "p": share}
                variables.append(
                    _variable(feature, "binary", node.role.value, (0, 1), "noise", noise)
                )
            roots[node.name] = f"categorical ({', '.join(shares)})"
            # Levels but the first enter equations (the first is the reference).
            columns = [(text == value).to_numpy(dtype=float) for value in levels]
            regressors[node.name] = (list(levels.values())[1:], np.column_stack(columns[1:]))
            continue
        if "binary" in spec:
            values = (table[node.name].astype(str) == spec["binary"][1]).to_numpy(dtype=float)
        else:
            values = table[node.name].to_numpy(dtype=float)
        regressors[node.name] = ([node.name], values[:, None])
        bounds = _bounds(node.name, node.bounds, values)
        kind = types[node.name]
        if node.parents:
            names = [f for p in node.parents for f in regressors[p][0]]
            design = np.column_stack([regressors[p][1] for p in node.parents])
            fit = LinearRegression().fit(design, values)
            residuals = values - fit.predict(design)
            dof = max(n - design.shape[1] - 1, 1)
            sd = float(np.sqrt(residuals @ residuals / dof))
            # A noise law needs a spread: an exactly determined node gets a negligible one.
            sd = max(sd, 1e-9 * (1.0 + float(np.std(values))))
            equations.append(
                EquationFit(
                    node.name,
                    tuple(names),
                    float(fit.intercept_),
                    tuple(float(c) for c in fit.coef_),
                    float(fit.score(design, values)),
                    sd,
                )
            )
            equation = _linear_text(float(fit.intercept_), fit.coef_, names)
            noise: dict[str, Any] = {"distribution": "normal", "sd": _number(sd)}
        elif kind == "binary":
            share = float(values.mean())
            roots[node.name] = f"Bernoulli(p {share:.3f})"
            equation, noise = "noise", {"distribution": "bernoulli", "p": share}
        elif kind == "integer":
            distinct, counts = np.unique(values, return_counts=True)
            roots[node.name] = f"empirical over {len(distinct)} whole numbers"
            equation = "noise"
            noise = {
                "distribution": "discrete",
                "values": [int(v) for v in distinct],
                "probabilities": (counts / counts.sum()).tolist(),
            }
        else:
            mean, sd = float(values.mean()), float(values.std(ddof=1))
            roots[node.name] = f"normal (mean {mean:.4g}, sd {sd:.4g})"
            equation = f"{_number(mean)} + noise"
            noise = {"distribution": "normal", "sd": _number(sd)}
        variables.append(_variable(node.name, kind, node.role.value, bounds, equation, noise))
    document: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "description": (
            f"Fitted by 'recourse fit' on {n} rows of {data_name}: linear structural "
            f"equations by least squares, root laws and domain bounds from the data."
        ),
        "variables": variables,
        "one_hot": one_hot,
        "encoding": dict(encoding),
    }
    return document, equations, roots


def _variable(
    name: str,
    kind: str,
    role: str,
    bounds: tuple[float, float],
    equation: str,
    noise: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "role": role,
        "bounds": list(bounds),
        "equation": equation,
        "noise": dict(noise),
    }


def _bounds(
    name: str, given: tuple[float, float] | None, values: FloatArray
) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    if given is None:
        return low, high
    outside = np.flatnonzero((values < given[0]) | (values > given[1]))
    if len(outside):
        first = int(outside[0])
        raise FitError(
            f"The 'bounds' of node {name!r} must contain every value of its column. Got "
            f"{list(given)}, but {len(outside)} complete rows lie outside (first: row {first}, "
            f"value {values[first]:.6g})."
        )
    return given


def _number(value: float) -> float:
    """Ten significant digits: the file stays readable and the fit is unchanged."""
    return float(f"{value:.10g}")


def _linear_text(intercept: float, coefficients: Sequence[float], names: Sequence[str]) -> str:
    text = f"{_number(intercept)!r}"
    for coefficient, name in zip(coefficients, names, strict=True):
        c = _number(float(coefficient))
        text += f" {'-' if c < 0 else '+'} {abs(c)!r} * {name}"
    return text + " + noise"
