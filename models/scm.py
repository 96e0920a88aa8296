"""Structural causal models as data, with vectorized sampling, abduction and counterfactuals.

A model is read from a JSON document (see ``instances/loan/scm.json``): one entry per
variable with its type, role, domain bounds, structural equation and noise distribution.
Each equation names the variable's own exogenous term ``noise`` exactly once; it is usually
additive (``... + noise``) but may sit inside invertible functions (Loan's education puts
it inside a sigmoid), and abduction inverts the path to it.

Counterfactuals follow abduction-action-prediction (Karimi, Schoelkopf and Valera, 2021):
recover the noise from the factual row, set the intervened features, recompute every other
feature in topological order with the same noise.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.expressions import (
    Expr,
    ExpressionError,
    check_invertible,
    evaluate,
    free_names,
    parse_expression,
    sigmoid,
)
from models.programs import ModelProgram

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

NOISE = "noise"
SCHEMA_VERSION = 1


class ModelFileError(ValueError):
    """A causal model document breaks a rule; the message names the field and the value."""


class VariableType(enum.StrEnum):
    """What values a variable takes."""

    BINARY = "binary"
    """0 or 1."""
    INTEGER = "integer"
    """Whole numbers within the domain bounds."""
    CONTINUOUS = "continuous"
    """Any real number within the domain bounds."""


class Role(enum.StrEnum):
    """What an action may do to a variable."""

    IMMUTABLE = "immutable"
    """Never intervened on, and no actionable variable is among its ancestors."""
    ACTIONABLE = "actionable"
    """May be set by an intervention (unless this person locks it)."""
    NON_ACTIONABLE = "non_actionable"
    """Not set directly, but moves with its parents (Loan's loan duration)."""


@dataclass(frozen=True)
class NoiseDistribution:
    """The distribution of one exogenous term.

    ``discrete`` is a finite law: ``values`` and their ``probabilities`` (lists); it gives
    count features (whole numbers) and laws estimated from data.
    """

    kind: str
    params: Mapping[str, float | tuple[float, ...]]

    _PARAMS = {
        "normal": ("sd",),
        "gamma": ("shape", "scale"),
        "bernoulli": ("p",),
        "uniform": ("low", "high"),
        "discrete": ("values", "probabilities"),
    }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str) -> NoiseDistribution:
        kind = data.get("distribution")
        if kind not in cls._PARAMS:
            raise ModelFileError(
                f"The 'noise.distribution' of {where} must be one of {sorted(cls._PARAMS)}. "
                f"Got {kind!r} instead."
            )
        if kind == "discrete":
            return cls(kind, _discrete_params(data, where))
        params: dict[str, float | tuple[float, ...]] = {}
        for name in cls._PARAMS[kind]:
            value = data.get(name)
            if not isinstance(value, int | float) or not np.isfinite(value):
                raise ModelFileError(
                    f"The 'noise.{name}' of {where} ({kind} noise) must be a finite number. "
                    f"Got {value!r} instead."
                )
            params[name] = float(value)
        return cls(kind, params)

    def sample(self, rng: np.random.Generator, n: int) -> FloatArray:
        p: Any = self.params
        if self.kind == "normal":
            return rng.normal(0.0, p["sd"], n)
        if self.kind == "gamma":
            return rng.gamma(p["shape"], p["scale"], n)
        if self.kind == "bernoulli":
            return (rng.random(n) < p["p"]).astype(float)
        if self.kind == "discrete":
            return rng.choice(np.array(p["values"]), size=n, p=np.array(p["probabilities"]))
        return rng.uniform(p["low"], p["high"], n)

    def log_density(self, u: FloatArray) -> FloatArray:
        """Log density (log probability for Bernoulli and discrete laws) of noise values."""
        from scipy import stats

        p: Any = self.params
        if self.kind == "normal":
            return stats.norm.logpdf(u, scale=p["sd"])
        if self.kind == "gamma":
            return stats.gamma.logpdf(u, p["shape"], scale=p["scale"])
        if self.kind == "bernoulli":
            return np.where(u == 1, np.log(p["p"]), np.where(u == 0, np.log1p(-p["p"]), -np.inf))
        if self.kind == "discrete":
            u = np.asarray(u, dtype=float)
            values, probabilities = np.array(p["values"]), np.array(p["probabilities"])
            match = np.isclose(u[..., None], values, rtol=0.0, atol=1e-9)
            with np.errstate(divide="ignore"):
                return np.log(np.where(match, probabilities, 0.0).sum(axis=-1))
        return stats.uniform.logpdf(u, loc=p["low"], scale=p["high"] - p["low"])


def _discrete_params(data: Mapping[str, Any], where: str) -> dict[str, tuple[float, ...]]:
    def numbers(key: str) -> tuple[float, ...] | None:
        raw = data.get(key)
        if not isinstance(raw, list) or not raw:
            return None
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            return None
        array = tuple(float(v) for v in raw)
        return array if all(np.isfinite(array)) else None

    values, probabilities = numbers("values"), numbers("probabilities")
    if values is None or probabilities is None or len(values) != len(probabilities):
        raise ModelFileError(
            f"The 'noise.values' and 'noise.probabilities' of {where} (discrete noise) must be "
            f"non-empty lists of finite numbers of the same length. Got "
            f"{data.get('values')!r} and {data.get('probabilities')!r} instead."
        )
    if len(set(values)) != len(values):
        raise ModelFileError(
            f"The 'noise.values' of {where} (discrete noise) must be distinct. Got {values!r}."
        )
    total = sum(probabilities)
    if min(probabilities) < 0 or abs(total - 1.0) > 1e-6:
        raise ModelFileError(
            f"The 'noise.probabilities' of {where} (discrete noise) must be >= 0 and sum to 1. "
            f"Got {list(probabilities)!r} (sum {total:.6g}) instead."
        )
    return {"values": values, "probabilities": tuple(q / total for q in probabilities)}


@dataclass(frozen=True)
class Variable:
    """One endogenous variable: its type, role, domain and structural equation."""

    name: str
    type: VariableType
    role: Role
    lower: float
    upper: float
    equation_text: str
    equation: Expr
    noise: NoiseDistribution
    parents: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Label:
    """How the ground-truth label is produced: deterministically, or drawn from a probability."""

    text: str
    expr: Expr
    kind: str  # "equation" (already 0/1) or "probability" (Bernoulli draw)


class StructuralCausalModel:
    """A causal model with additive-or-invertible noise, in topological order.

    Arrays hold one row per individual and one column per variable, in the order of
    :attr:`names` (the file's order, which must be topological).

    :attr:`one_hot` maps a categorical feature to its levels: binary root variables of
    which exactly one is 1 (sampled jointly, kept one-hot by actions).
    """

    def __init__(
        self,
        name: str,
        variables: Sequence[Variable],
        label: Label | None,
        document: Mapping[str, Any],
        variant: str | None = None,
        one_hot: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.name = name
        self.variant = variant
        self.variables = tuple(variables)
        self.names = tuple(v.name for v in self.variables)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.label_spec = label
        self.one_hot = dict(one_hot or {})
        self._document = document
        self.program = ModelProgram.build(
            [var.equation for var in self.variables],
            [{p: self.index[p] for p in var.parents} for var in self.variables],
            NOISE,
        )
        """The equations and their inverses as one compiled program (the numerics)."""

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, document: Mapping[str, Any], variant: str | None = None
    ) -> StructuralCausalModel:
        """Build a model from its JSON document, optionally with a named variant applied."""
        version = document.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ModelFileError(
                f"The model's 'schema_version' must be {SCHEMA_VERSION}. Got {version!r} instead."
            )
        doc = copy.deepcopy(dict(document))
        if variant is not None:
            variants = doc.get("variants", {})
            if variant not in variants:
                raise ModelFileError(
                    f"The model has no variant {variant!r}; it has {sorted(variants)}."
                )
            changes = variants[variant]
            for var in doc["variables"]:
                if var.get("name") in changes.get("equations", {}):
                    var["equation"] = changes["equations"][var["name"]]
            if "label" in changes:
                doc["label"] = changes["label"]
        raw_vars = doc.get("variables")
        if not isinstance(raw_vars, list) or not raw_vars:
            raise ModelFileError("The model's 'variables' must be a non-empty list.")
        variables: list[Variable] = []
        seen: set[str] = set()
        for position, raw in enumerate(raw_vars):
            variables.append(_parse_variable(raw, position, seen))
            seen.add(variables[-1].name)
        _check_roles(variables)
        one_hot = _parse_one_hot(doc.get("one_hot", {}), variables)
        label = None
        if "label" in doc:
            label = _parse_label(doc["label"], seen)
        return cls(str(doc.get("name", "model")), variables, label, document, variant, one_hot)

    @classmethod
    def from_json(cls, text: str, variant: str | None = None) -> StructuralCausalModel:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"The model file is not valid JSON: {exc}.") from None
        return cls.from_dict(document, variant)

    def independent(self) -> StructuralCausalModel:
        """This model without causal effects: every equation replaced by its own noise.

        The world a non-causal counterfactual assumes, where editing a feature moves
        nothing else. The variables, roles, domains and one-hot groups are kept; the noise
        distributions no longer describe the values (do not sample from it).
        """
        document = copy.deepcopy(dict(self._document))
        for var in document["variables"]:
            var["equation"] = NOISE
        document.pop("label", None)
        document["name"] = f"{self.name}-independent"
        return StructuralCausalModel.from_dict(document, None)

    # -- facts --------------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        return len(self.variables)

    @property
    def actionable(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables if v.role is Role.ACTIONABLE)

    @functools.cached_property
    def actionable_columns(self) -> IntArray:
        """The columns of :attr:`actionable` (read-only)."""
        return _read_only(np.array([self.index[name] for name in self.actionable], np.intp))

    @functools.cached_property
    def not_actionable_columns(self) -> IntArray:
        """The columns of the variables an action may not set (read-only)."""
        columns = [j for j, var in enumerate(self.variables) if var.role is not Role.ACTIONABLE]
        return _read_only(np.array(columns, np.intp))

    @functools.cached_property
    def whole_actionable(self) -> IntArray:
        """Positions in :attr:`actionable` of the features that take whole numbers only
        (binary or integer; read-only)."""
        whole = [
            k
            for k, column in enumerate(self.actionable_columns)
            if self.variables[column].type is not VariableType.CONTINUOUS
        ]
        return _read_only(np.array(whole, np.intp))

    @property
    def lower(self) -> FloatArray:
        return np.array([v.lower for v in self.variables])

    @property
    def upper(self) -> FloatArray:
        return np.array([v.upper for v in self.variables])

    def descendants(self, names: Sequence[str]) -> set[str]:
        """``names`` and every variable downstream of them."""
        reached = set(names)
        for var in self.variables:  # topological order: one pass suffices
            if reached.intersection(var.parents):
                reached.add(var.name)
        return reached

    def named(self, x: FloatArray) -> dict[str, float]:
        """One row of features as ``{name: value}`` (the form answers report)."""
        return {name: float(v) for name, v in zip(self.names, x, strict=True)}

    def ancestor_matrix(self) -> BoolArray:
        """(features, features): entry [k, a] is true when a is a proper ancestor of k."""
        return np.array(
            [[k in self.descendants([a]) - {a} for a in self.names] for k in self.names],
            dtype=bool,
        )

    def content_hash(self) -> str:
        """SHA-256 of the canonical document and variant: identifies the model in metadata."""
        canonical = json.dumps(
            {"document": self._document, "variant": self.variant}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- numerics -----------------------------------------------------------------------

    def sample_noise(self, n: int, seed: int | np.random.Generator) -> FloatArray:
        rng = np.random.default_rng(seed)
        noise = np.column_stack([v.noise.sample(rng, n) for v in self.variables])
        for levels in self.one_hot.values():
            # One level per row, with the levels' Bernoulli probabilities (they sum to 1).
            columns = [self.index[level] for level in levels]
            chances = np.array([self.variables[k].noise.params["p"] for k in columns], float)
            chosen = rng.choice(len(columns), size=n, p=chances / chances.sum())
            noise[:, columns] = np.arange(len(columns)) == chosen[:, None]
        return noise

    def generate(self, noise: FloatArray) -> FloatArray:
        """Features from exogenous noise, in topological order (the observational model)."""
        noise = np.ascontiguousarray(np.atleast_2d(noise), dtype=float)
        x = np.empty_like(noise)
        nothing_set = np.zeros(x.shape, dtype=bool)  # so the values (x itself) are never read
        self.program.propagate(x, nothing_set, x, noise)
        return x

    def sample(self, n: int, seed: int | np.random.Generator) -> tuple[FloatArray, FloatArray]:
        """``n`` individuals and the noise behind them."""
        noise = self.sample_noise(n, seed)
        return self.generate(noise), noise

    def abduct_noise(self, x: FloatArray) -> FloatArray:
        """Recover the noise behind factual rows (inverting each equation for ``noise``)."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=float)
        noise = x.copy()  # right already where the equation is ``noise`` itself
        self.program.abduct(noise, x)
        return noise

    def propagate_counterfactual(
        self,
        x_factual: FloatArray,
        intervene: BoolArray,
        values: FloatArray,
        noise: FloatArray | None = None,
    ) -> FloatArray:
        """Counterfactual rows under hard interventions ``do(x_k := values[:, k])``.

        ``intervene`` marks, per row, the features set by the action; the noise is abducted
        from ``x_factual`` unless given.
        """
        x_factual = np.atleast_2d(np.asarray(x_factual, dtype=float))
        if noise is None:
            noise = self.abduct_noise(x_factual)
        shape = x_factual.shape
        x = np.empty(shape)
        self.program.propagate(
            x,
            _c_ordered(intervene, bool, shape),
            _c_ordered(values, float, shape),
            _c_ordered(noise, float, shape),
        )
        return x

    def label(self, x: FloatArray, seed: int | np.random.Generator | None = None) -> FloatArray:
        """Ground-truth label of rows ``x`` (a seed is needed for probabilistic labels)."""
        if self.label_spec is None:
            raise ModelFileError(f"The model {self.name!r} has no 'label'.")
        x = np.atleast_2d(np.asarray(x, dtype=float))
        value = np.broadcast_to(evaluate(self.label_spec.expr, self._env(x)), (x.shape[0],)).astype(
            float
        )
        if self.label_spec.kind == "equation":
            return value
        if seed is None:
            raise ValueError("This model's label is drawn from a probability: pass a seed.")
        rng = np.random.default_rng(seed)
        return (rng.random(x.shape[0]) < value).astype(float)

    def one_hot_valid(self, x: FloatArray) -> BoolArray:
        """Per row: every categorical feature has exactly one level at 1, the others at 0."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        valid = np.ones(x.shape[0], dtype=bool)
        for levels in self.one_hot.values():
            block = x[:, [self.index[level] for level in levels]]
            binary = np.all(np.isclose(block, 0.0) | np.isclose(block, 1.0), axis=1)
            valid &= binary & np.isclose(block.sum(axis=1), 1.0)
        return valid

    def noise_log_likelihood(self, noise: FloatArray) -> FloatArray:
        """Per-row sum of the noise log densities (a plausibility measure)."""
        noise = np.atleast_2d(noise)
        return np.sum(
            [v.noise.log_density(noise[:, j]) for j, v in enumerate(self.variables)], axis=0
        )

    def _env(self, x: FloatArray) -> dict[str, Any]:
        return {n: x[:, i] for i, n in enumerate(self.names)}


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


def _c_ordered(array: Any, dtype: type, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """``array`` broadcast to ``shape`` as a C-ordered array of ``dtype`` (the compiled
    program's one layout), copied only when it is not one already."""
    array = np.asarray(array, dtype=dtype)
    if array.shape != shape:
        array = np.broadcast_to(array, shape)
    return np.ascontiguousarray(array)


def _parse_variable(raw: Any, position: int, seen: set[str]) -> Variable:
    if not isinstance(raw, Mapping):
        raise ModelFileError(f"Variable {position} must be an object. Got {raw!r} instead.")
    name = raw.get("name")
    if not isinstance(name, str) or not name.isidentifier() or name == NOISE:
        raise ModelFileError(
            f"Variable {position}'s 'name' must be an identifier other than {NOISE!r}. "
            f"Got {name!r} instead."
        )
    if name in seen:
        raise ModelFileError(f"Variable {name!r} is defined twice.")
    where = f"variable {name!r}"
    try:
        vtype = VariableType(raw.get("type"))
    except ValueError:
        raise ModelFileError(
            f"The 'type' of {where} must be one of {[t.value for t in VariableType]}. "
            f"Got {raw.get('type')!r} instead."
        ) from None
    try:
        role = Role(raw.get("role"))
    except ValueError:
        raise ModelFileError(
            f"The 'role' of {where} must be one of {[r.value for r in Role]}. "
            f"Got {raw.get('role')!r} instead."
        ) from None
    bounds = raw.get("bounds")
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and np.isfinite(b) for b in bounds)
        or bounds[0] > bounds[1]
    ):
        raise ModelFileError(
            f"The 'bounds' of {where} must be [lower, upper] with finite lower <= upper. "
            f"Got {bounds!r} instead."
        )
    text = raw.get("equation")
    if not isinstance(text, str):
        raise ModelFileError(f"The 'equation' of {where} must be a string. Got {text!r} instead.")
    try:
        equation = parse_expression(text, where=f"equation of {where}")
        check_invertible(equation, NOISE, where=f"equation of {where}")
    except ExpressionError as exc:
        raise ModelFileError(str(exc)) from None
    parents = tuple(sorted(free_names(equation) - {NOISE}))
    unknown = [p for p in parents if p not in seen]
    if unknown:
        raise ModelFileError(
            f"The equation of {where} uses {unknown}, which are not defined before it; list "
            f"variables in topological order (parents first)."
        )
    noise = NoiseDistribution.from_dict(raw.get("noise", {}), where=where)
    return Variable(
        name=name,
        type=vtype,
        role=role,
        lower=float(bounds[0]),
        upper=float(bounds[1]),
        equation_text=text,
        equation=equation,
        noise=noise,
        parents=parents,
        description=str(raw.get("description", "")),
    )


def _check_roles(variables: Sequence[Variable]) -> None:
    movable: set[str] = set()
    for var in variables:
        moved_by = movable.intersection(var.parents)
        if var.role is Role.IMMUTABLE and moved_by:
            raise ModelFileError(
                f"Variable {var.name!r} is 'immutable' but depends on {sorted(moved_by)}, which "
                f"an action can change; make it 'non_actionable'."
            )
        if var.role is Role.ACTIONABLE or moved_by:
            movable.add(var.name)


def _parse_one_hot(raw: Any, variables: Sequence[Variable]) -> dict[str, tuple[str, ...]]:
    """Check the ``one_hot`` groups: {categorical: [level variables]}."""
    if not isinstance(raw, Mapping):
        raise ModelFileError(
            f"The model's 'one_hot' must be an object {{feature: [levels]}}. Got {raw!r} instead."
        )
    by_name = {v.name: v for v in variables}
    groups: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for feature, levels in raw.items():
        where = f"The 'one_hot' levels of {feature!r}"
        if not isinstance(feature, str) or not feature.isidentifier() or feature in by_name:
            raise ModelFileError(
                f"The 'one_hot' feature names must be identifiers that are not variables. "
                f"Got {feature!r} instead."
            )
        if (
            not isinstance(levels, list)
            or len(levels) < 2
            or len(set(levels)) != len(levels)
            or not all(isinstance(v, str) and v in by_name and v not in used for v in levels)
        ):
            raise ModelFileError(
                f"{where} must list at least two distinct variables that belong to no other "
                f"group. Got {levels!r} instead."
            )
        level_vars = [by_name[level] for level in levels]
        bad = [
            v.name
            for v in level_vars
            if v.type is not VariableType.BINARY
            or v.parents
            or v.equation_text.strip() != NOISE
            or v.noise.kind != "bernoulli"
            or v.role is not level_vars[0].role
        ]
        if bad:
            raise ModelFileError(
                f"{where} must be binary variables with equation {NOISE!r}, Bernoulli noise and "
                f"the same role. Got {bad} instead."
            )
        total = sum(float(v.noise.params["p"]) for v in level_vars)  # type: ignore[arg-type]
        if abs(total - 1.0) > 1e-6:
            raise ModelFileError(
                f"{where} must have Bernoulli probabilities that sum to 1 (the categorical "
                f"law). Got a sum of {total:.6g} instead."
            )
        used.update(levels)
        groups[feature] = tuple(levels)
    return groups


def _parse_label(raw: Any, names: set[str]) -> Label:
    if not isinstance(raw, Mapping) or len(set(raw) & {"equation", "probability"}) != 1:
        raise ModelFileError(
            "The model's 'label' must have exactly one of 'equation' (0/1) or 'probability'. "
            f"Got {raw!r} instead."
        )
    kind = "equation" if "equation" in raw else "probability"
    try:
        expr = parse_expression(raw[kind], where=f"label {kind}")
    except ExpressionError as exc:
        raise ModelFileError(str(exc)) from None
    unknown = sorted(free_names(expr) - names)
    if unknown:
        raise ModelFileError(f"The label {kind} uses unknown variables {unknown}.")
    return Label(raw[kind], expr, kind)


__all__ = [
    "ModelFileError",
    "NoiseDistribution",
    "Role",
    "StructuralCausalModel",
    "Variable",
    "VariableType",
    "sigmoid",
]
