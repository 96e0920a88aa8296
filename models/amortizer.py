"""The amortizer's network, its inputs and outputs, training, and its file format.

CARMA (Majumdar and Valera, 2024) predicts which features to act on (a mask) and their
new values with a neural network. Ours is distilled from exact MILP labels and takes the
person's constraints as input. This module is the math and the data; the prediction
pipeline around it (line search, verification, repair) is :mod:`solver.amortized`.

Inputs, per person, in the classifier's standardized units (``z = (x - mean) / scale``):
every feature's ``z``; then, unless the model is *universal* (trained without them), per
actionable feature ``k``: locked (1/0), the room to move down and up within the values the
person may set (``(x_k - lower_k) / s_k`` and ``(upper_k - x_k) / s_k``, clipped to
:data:`ROOM_CLIP`), ``log w_k`` (the cost weight), whether it has a soft limit, the limit
and its penalty per standard deviation; and the maximum number of changes over ``K``.

Outputs: one logit per action pattern and, per actionable feature, its change in standard
deviations should the pattern change it. A pattern gives each actionable feature a state:
not acted on, changed, or (for a feature with an actionable ancestor) held at its current
value while its ancestors move, which exact answers often do. The features acted on (changed
or held) are the action's mask.

Hard constraints hold by construction, in the output layer: patterns that act on a locked
feature (or one with no value left to set), hold a feature whose current value is out of
bounds, act on more features than allowed, or change nothing get probability zero; values
are clipped into the person's interval (domain, bounds and direction) and integer features
are rounded inside it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
import numpy.typing as npt

from models.preferences import ConstraintArrays

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

FORMAT_VERSION = 1
MAX_ACTIONABLE = 10
"""Masks are enumerated: 2^K outputs."""
ROOM_CLIP = 5.0
"""Room to move and soft limits are clipped to this many standard deviations."""
WEIGHTS_FILE, METADATA_FILE = "amortizer.npz", "amortizer.json"


class AmortizerFileError(ValueError):
    """An amortizer folder that cannot be used; the message names the field and the value."""


NOT_ACTED, CHANGE, HOLD = 0, 1, 2
"""States of an actionable feature in an action pattern."""


def pattern_catalogue(holdable: BoolArray) -> IntArray:
    """Every action pattern: per actionable feature NOT_ACTED, CHANGE or (where
    ``holdable``: it has an actionable ancestor) HOLD at its current value."""
    states = [range(3 if h else 2) for h in holdable]
    return np.array(list(itertools.product(*states)), dtype=np.int64).reshape(-1, len(states))


def pattern_index(patterns: IntArray, holdable: BoolArray) -> IntArray:
    """Each row's index in :func:`pattern_catalogue` (mixed radix, last feature fastest)."""
    radix = np.where(holdable, 3, 2)
    place = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]])
    return (patterns * place).sum(axis=1)


class PatternTables(NamedTuple):
    """What :func:`allowed_patterns` needs of a catalogue, worked out once: per pattern,
    bit ``k`` set where it acts on (or holds) actionable feature ``k``."""

    acting: IntArray
    holding: IntArray
    size: IntArray
    """Per pattern, the features acted on; too many for anyone where it changes nothing."""

    @classmethod
    def of(cls, catalogue: IntArray) -> PatternTables:
        acting = catalogue != NOT_ACTED
        changes = (catalogue == CHANGE).any(axis=1)
        size = np.where(changes, acting.sum(axis=1), np.iinfo(np.int64).max)
        bits = 1 << np.arange(catalogue.shape[1], dtype=np.int64)
        return cls(acting @ bits, (catalogue == HOLD) @ bits, size)


def allowed_patterns(
    arrays: ConstraintArrays,
    x_actionable: FloatArray,
    catalogue: IntArray,
    tables: PatternTables | None = None,
) -> BoolArray:
    """(n, patterns): what a person may do: act on no locked feature, hold a feature only
    where its current value is allowed, change at least one, and act on few enough.
    ``tables``: the catalogue's, if already made."""
    tables = tables if tables is not None else PatternTables.of(catalogue)
    allowed = np.empty((len(x_actionable), len(catalogue)), dtype=bool)
    _allowed_rows(
        x_actionable,
        np.arange(x_actionable.shape[1]),
        arrays.locked,
        arrays.lower,
        arrays.upper,
        arrays.max_changes,
        tables.acting,
        tables.holding,
        tables.size,
        allowed,
    )
    return allowed


# -- jitted kernels ----------------------------------------------------------------------
# At batch size 1, the fixed cost of a numpy call (about a microsecond) is nearly all the
# time, and a step takes dozens of them; each loop below does one step in one call. They
# follow the numpy expressions they replace operation by operation in IEEE arithmetic (no
# fastmath, so no fused multiply-adds): the results have the same bits. The network's
# matrix products stay with numpy's BLAS, whose bits these must not change either.

_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _barred_bits(x, i, columns, locked, lower, upper):
    """Row ``i``'s bit masks over the actionable features (column ``columns[k]`` of ``x``):
    locked; current value outside its interval (or nan), so that holding it is barred."""
    locked_bits = 0
    outside_bits = 0
    for k in range(len(columns)):
        value = x[i, columns[k]]
        if locked[i, k]:
            locked_bits |= 1 << k
        if not (lower[i, k] <= value and value <= upper[i, k]):
            outside_bits |= 1 << k
    return locked_bits, outside_bits


@numba.njit(**_JIT)
def _allowed(p, locked_bits, outside_bits, max_changes, acting, holding, size):
    return (
        (acting[p] & locked_bits) == 0
        and (holding[p] & outside_bits) == 0
        and size[p] <= max_changes
    )


@numba.njit(**_JIT)
def _allowed_rows(x, columns, locked, lower, upper, max_changes, acting, holding, size, out):
    for i in range(out.shape[0]):
        locked_bits, outside_bits = _barred_bits(x, i, columns, locked, lower, upper)
        for p in range(out.shape[1]):
            out[i, p] = _allowed(
                p, locked_bits, outside_bits, max_changes[i], acting, holding, size
            )


@numba.njit(**_JIT)
def _add_bias(a, bias, rectify):
    """``a += bias``, then (if ``rectify``) np.maximum(a, 0, out=a): -0.0 becomes 0.0,
    nan is kept. The sums are in ``a``'s precision, as numpy's are."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            value = a[i, j] + bias[j]
            a[i, j] = 0.0 if rectify and value <= 0.0 else value


@numba.njit(**_JIT)
def _standardized_rows(x, mean, scale, out):
    """``(x - mean) / scale`` into the first columns of ``out``."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = (x[i, j] - mean[j]) / scale[j]


@numba.njit(**_JIT)
def _clipped_room(room):
    """np.clip(room, 0, ROOM_CLIP): -0.0 and nan kept."""
    if room < 0.0:
        return 0.0
    if room > ROOM_CLIP:
        return ROOM_CLIP
    return room


@numba.njit(**_JIT)
def _clipped_soft(value):
    """np.minimum(np.maximum(value, 0), ROOM_CLIP): -0.0 becomes 0.0, nan is kept."""
    if value <= 0.0:
        return 0.0
    if value > ROOM_CLIP:
        return ROOM_CLIP
    return value


@numba.njit(**_JIT)
def _encoded_rows(
    x, mean, scale, columns, sd, locked, lower, upper, log_weight, limit, penalty, most, out
):
    """The inputs with constraints (the module docstring) into ``out``."""
    _standardized_rows(x, mean, scale, out)
    f, k = x.shape[1], len(columns)
    for i in range(x.shape[0]):
        for j in range(k):
            value = x[i, columns[j]]
            down = _clipped_room((value - lower[i, j]) / sd[j])
            up = _clipped_room((upper[i, j] - value) / sd[j])
            free = 0.0 if locked[i, j] else 1.0  # no room when locked: a product, as in numpy
            has_soft = math.isfinite(limit[i, j])
            out[i, f + j] = 0.0 if free else 1.0
            out[i, f + k + j] = down * free
            out[i, f + 2 * k + j] = up * free
            out[i, f + 3 * k + j] = log_weight[i, j]
            out[i, f + 4 * k + j] = 1.0 if has_soft else 0.0
            out[i, f + 5 * k + j] = _clipped_soft(limit[i, j] / sd[j]) if has_soft else 0.0
            out[i, f + 6 * k + j] = _clipped_soft(penalty[i, j] * sd[j])
        out[i, f + 7 * k] = most[i] / k


@numba.njit(**_JIT)
def _scored_rows(
    outputs, x, columns, sd, locked, lower, upper, most, acting, holding, size, logits, changed
):
    """Logits of allowed patterns (-inf elsewhere) and ``current + change * sd``."""
    num_patterns = logits.shape[1]
    for i in range(x.shape[0]):
        locked_bits, outside_bits = _barred_bits(x, i, columns, locked, lower, upper)
        for p in range(num_patterns):
            if _allowed(p, locked_bits, outside_bits, most[i], acting, holding, size):
                logits[i, p] = outputs[i, p]
            else:
                logits[i, p] = -np.inf
        for k in range(len(columns)):
            changed[i, k] = x[i, columns[k]] + outputs[i, num_patterns + k] * sd[k]


@numba.njit(**_JIT)
def _top_rows(logits, ranked, chances):
    """:meth:`PatternScores.top` into ``ranked`` and ``chances``, a row at a time: the best
    patterns by selection (a few of many), the probabilities by the softmax over all."""
    taken = np.zeros(logits.shape[1], dtype=np.bool_)
    for i in range(len(logits)):
        taken[:] = False
        for r in range(ranked.shape[1]):
            best = -1
            for j in range(logits.shape[1]):
                if not taken[j] and (best < 0 or logits[i, j] > logits[i, best]):
                    best = j
            taken[best] = True
            ranked[i, r] = best
        top = logits[i, ranked[i, 0]]
        if not np.isfinite(top):
            top = 0.0
        total = 0.0
        for j in range(logits.shape[1]):
            total += np.exp(logits[i, j] - top)  # exp(-inf) = 0 for the patterns not allowed
        if total == 0.0:
            total = 1.0
        for r in range(ranked.shape[1]):
            chances[i, r] = np.exp(logits[i, ranked[i, r]] - top) / total


# -- the model ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AmortizerSpec:
    """What a network was trained for: the models, the cost, the inputs (JSON metadata)."""

    dataset: str
    classifier: str
    cost: str
    sparsity: float
    scm_hash: str
    classifier_hash: str
    feature_names: tuple[str, ...]
    actionable: tuple[str, ...]
    mean: FloatArray
    """The classifier's standardization, used for the inputs too."""
    scale: FloatArray
    integer: BoolArray
    """Per actionable feature: values must be whole numbers."""
    holdable: BoolArray
    """Per actionable feature: it has an actionable ancestor, so holding it is an action."""
    constraint_inputs: bool
    """False: a universal model, which sees the features only."""
    training: Mapping[str, Any] = field(default_factory=dict)
    """Label file, its hashes, hyperparameters and validation figures."""

    @functools.cached_property
    def actionable_columns(self) -> IntArray:
        return np.array([self.feature_names.index(n) for n in self.actionable], dtype=np.int64)

    @functools.cached_property
    def catalogue(self) -> IntArray:
        return pattern_catalogue(self.holdable)

    @functools.cached_property
    def pattern_tables(self) -> PatternTables:
        return PatternTables.of(self.catalogue)

    @functools.cached_property
    def any_integer(self) -> bool:
        return bool(self.integer.any())

    @functools.cached_property
    def actionable_scale(self) -> FloatArray:
        return self.scale[self.actionable_columns]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "classifier": self.classifier,
            "cost": self.cost,
            "sparsity": self.sparsity,
            "scm_hash": self.scm_hash,
            "classifier_hash": self.classifier_hash,
            "feature_names": list(self.feature_names),
            "actionable": list(self.actionable),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "integer": self.integer.tolist(),
            "holdable": self.holdable.tolist(),
            "constraint_inputs": self.constraint_inputs,
            "training": dict(self.training),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> AmortizerSpec:
        if data.get("format_version") != FORMAT_VERSION:
            raise AmortizerFileError(
                f"The 'format_version' of {where} must be {FORMAT_VERSION}. "
                f"Got {data.get('format_version')!r} instead."
            )
        try:
            spec = cls(
                dataset=str(data["dataset"]),
                classifier=str(data["classifier"]),
                cost=str(data["cost"]),
                sparsity=float(data["sparsity"]),
                scm_hash=str(data["scm_hash"]),
                classifier_hash=str(data["classifier_hash"]),
                feature_names=tuple(map(str, data["feature_names"])),
                actionable=tuple(map(str, data["actionable"])),
                mean=np.asarray(data["mean"], dtype=float),
                scale=np.asarray(data["scale"], dtype=float),
                integer=np.asarray(data["integer"], dtype=bool),
                holdable=np.asarray(data["holdable"], dtype=bool),
                constraint_inputs=bool(data["constraint_inputs"]),
                training=dict(data.get("training", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AmortizerFileError(
                f"{where} is missing or has a malformed field: {exc}."
            ) from None
        n, k = len(spec.feature_names), len(spec.actionable)
        if (
            spec.mean.shape != (n,)
            or spec.scale.shape != (n,)
            or spec.integer.shape != (k,)
            or spec.holdable.shape != (k,)
        ):
            raise AmortizerFileError(
                f"In {where}, 'mean' and 'scale' need one number per feature ({n}), "
                f"'integer' and 'holdable' one flag per actionable feature ({k})."
            )
        if k > MAX_ACTIONABLE:
            raise AmortizerFileError(
                f"In {where}, at most {MAX_ACTIONABLE} actionable features are supported. Got {k}."
            )
        return spec


@dataclass(frozen=True, eq=False)
class Network:
    """A ReLU MLP: ``layers`` of (weights, bias), ReLU between them, linear output."""

    layers: tuple[tuple[FloatArray, FloatArray], ...]

    def forward(self, inputs: FloatArray) -> FloatArray:
        # np.dot: the same BLAS calls and bits as ``@``, with less overhead per call.
        a = inputs
        for weights, bias in self.layers[:-1]:
            a = np.dot(a, weights)
            _add_bias(a, bias, True)
        weights, bias = self.layers[-1]
        outputs = np.dot(a, weights)
        _add_bias(outputs, bias, False)
        return outputs

    def astype(self, dtype: type) -> Network:
        return Network(tuple((w.astype(dtype), b.astype(dtype)) for w, b in self.layers))


@dataclass(frozen=True, eq=False)
class Amortizer:
    """A trained network and what it was trained for."""

    spec: AmortizerSpec
    network: Network

    fast: Network = field(init=False, repr=False)
    """The network in float32 for inference: the answers are verified in float64 anyway."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fast", self.network.astype(np.float32))

    def scores(self, x: FloatArray, arrays: ConstraintArrays) -> PatternScores:
        """The network's pass over ``x``: logits of allowed patterns and proposed changes."""
        spec, tables = self.spec, self.spec.pattern_tables
        outputs = self.fast.forward(encode_inputs(spec, x, arrays, np.float32))
        logits = np.empty((len(x), len(spec.catalogue)), dtype=np.float32)
        changed = np.empty((len(x), len(spec.actionable)))
        _scored_rows(
            outputs,
            x,
            spec.actionable_columns,
            spec.actionable_scale,
            arrays.locked,
            arrays.lower,
            arrays.upper,
            arrays.max_changes,
            tables.acting,
            tables.holding,
            tables.size,
            logits,
            changed,
        )
        return PatternScores(logits, changed)

    def propose(
        self,
        x: FloatArray,
        arrays: ConstraintArrays,
        ranks: IntArray | int = 0,
        scores: PatternScores | None = None,
    ) -> tuple[BoolArray, FloatArray]:
        """Masks and values that obey every hard constraint by construction.

        ``ranks``: per person (or for all), take the best allowed action pattern (0), the
        next best (1), ...; a person with no such pattern gets an empty mask (nothing left
        they may do). ``scores``: the network's pass over these rows, if already made.
        Returns (n, K) masks and values.
        """
        logits, changed = scores if scores is not None else self.scores(x, arrays)
        rows = np.arange(len(x))
        if np.all(ranks == 0):
            choice = np.argmax(logits, axis=1)
        else:
            choice = np.argsort(-logits, axis=1, kind="stable")[rows, ranks]
        return self.propose_patterns(
            x[:, self.spec.actionable_columns],
            arrays.lower,
            arrays.upper,
            choice,
            np.isfinite(logits[rows, choice]),
            changed,
        )

    def propose_patterns(
        self,
        current: FloatArray,
        lower: FloatArray,
        upper: FloatArray,
        choice: IntArray,
        allowed: BoolArray,
        changed: FloatArray,
        *,
        whole: bool = True,
    ) -> tuple[BoolArray, FloatArray]:
        """:meth:`propose` for the patterns ``choice`` (indices in the catalogue), given
        the actionable features' ``current`` values and the people's intervals, whether
        each pattern is ``allowed`` (else an empty mask) and the network's ``changed``.

        ``whole=False`` leaves integer features unrounded (still clipped): the direction
        of a line search, which rounds at every scale, so that a change proposed under
        half a unit is scaled up instead of rounded away.
        """
        spec = self.spec
        pattern = spec.catalogue[choice]
        pattern[~allowed] = NOT_ACTED
        values = np.where(pattern == CHANGE, changed, current)
        if whole:
            return pattern != NOT_ACTED, project_values(spec, values, lower, upper)
        return pattern != NOT_ACTED, np.minimum(np.maximum(values, lower), upper)


class PatternScores(NamedTuple):
    """The network's pass over people, from which any rank of pattern is proposed."""

    logits: FloatArray
    """(n, patterns): -inf where a pattern is not allowed."""
    changed: FloatArray
    """(n, K): the proposed values of the features a pattern changes."""

    def top(self, count: int) -> tuple[IntArray, FloatArray]:
        """(n, count) each person's ``count`` best patterns, best first (ties: catalogue
        order), and (n, count) the network's probabilities of them (0: not allowed)."""
        n, patterns = self.logits.shape
        count = min(count, patterns)
        ranked, chances = np.empty((n, count), np.int64), np.empty((n, count))
        _top_rows(np.ascontiguousarray(self.logits), ranked, chances)
        return ranked, chances


def project_values(
    spec: AmortizerSpec, values: FloatArray, lower: FloatArray, upper: FloatArray
) -> FloatArray:
    """Values clipped into each person's interval; integer features rounded inside it."""
    values = np.minimum(np.maximum(values, lower), upper)  # np.clip's checks cost more
    if spec.any_integer:
        # The interval's ends are whole numbers, so rounding stays inside it.
        values = np.where(spec.integer, np.round(values), values)
    return values


def encode_inputs(
    spec: AmortizerSpec, x: FloatArray, arrays: ConstraintArrays, dtype: npt.DTypeLike = np.float64
) -> FloatArray:
    """The network's input rows (see the module docstring), computed in float64 and
    stored as ``dtype``."""
    n, f, k = len(x), len(spec.feature_names), len(spec.actionable)
    if not spec.constraint_inputs:
        inputs = np.empty((n, f), dtype=dtype)
        _standardized_rows(x, spec.mean, spec.scale, inputs)
        return inputs
    inputs = np.empty((n, f + 7 * k + 1), dtype=dtype)
    _encoded_rows(
        x,
        spec.mean,
        spec.scale,
        spec.actionable_columns,
        spec.actionable_scale,
        arrays.locked,
        arrays.lower,
        arrays.upper,
        np.log(arrays.weight),  # numpy's log, whose last bits libm's need not match
        arrays.soft_limit,
        arrays.soft_penalty,
        arrays.max_changes,
        inputs,
    )
    return inputs


# -- training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingTargets:
    """What the exact labels say: the optimal pattern and values, and the allowed patterns."""

    pattern: IntArray
    """Index of the optimal action pattern in :func:`pattern_catalogue`."""
    change: FloatArray
    """(n, K) optimal change in standard deviations (0 where not changed)."""
    changed: BoolArray
    allowed: BoolArray


@dataclass(frozen=True)
class Hyperparameters:
    hidden: tuple[int, ...] = (64, 64)
    weight_decay: float = 1e-5
    learning_rate: float = 2e-3
    batch_size: int = 128
    max_epochs: int = 300
    patience: int = 25
    value_weight: float = 1.0
    """Weight of the values' squared error against the pattern's cross-entropy."""
    value_floor: float = 0.1
    """Each change's error counts relative to ``|label change| + value_floor`` (standard
    deviations): the line search rescales a proposal, so its direction matters, and
    absolute errors would let the few changes of 5-28 deviations drown the small ones."""
    ensemble: int = 1
    """Networks trained from successive seeds, their outputs averaged."""

    def __post_init__(self) -> None:
        if self.ensemble > 1 and len(self.hidden) != 1:
            raise ValueError(
                f"An ensemble is merged into one network side by side, which is exact and "
                f"as fast as a dense layer only for one hidden layer. Got hidden={self.hidden}."
            )


def train_network(
    inputs: FloatArray,
    targets: TrainingTargets,
    validation: tuple[FloatArray, TrainingTargets],
    params: Hyperparameters,
    seed: int,
) -> tuple[Network, dict[str, Any]]:
    """``params.ensemble`` networks (seeds ``seed``, ``seed + 1``, ...), merged into one
    whose outputs are their means: averaging cancels much of each network's own error
    in choosing the action pattern, at the cost of a wider hidden layer."""
    members = [
        _train_member(inputs, targets, validation, params, seed + i) for i in range(params.ensemble)
    ]
    network = _side_by_side([network for network, _ in members])
    flat = [array for layer in network.layers for array in layer]
    loss, _ = _loss_and_gradients(flat, *validation, params, gradients=False)
    return network, {
        "validation_loss": loss,
        "epochs": [history["epochs"] for _, history in members],
    }


def _side_by_side(members: list[Network]) -> Network:
    """One network with one hidden layer computing the mean of ``members``' outputs
    (each with one hidden layer): their hidden units side by side."""
    if len(members) == 1:
        return members[0]
    first = [m.layers[0] for m in members]
    last = [m.layers[1] for m in members]
    return Network(
        (
            (np.hstack([w for w, _ in first]), np.concatenate([b for _, b in first])),
            (np.vstack([w for w, _ in last]) / len(members), np.mean([b for _, b in last], axis=0)),
        )
    )


def _train_member(
    inputs: FloatArray,
    targets: TrainingTargets,
    validation: tuple[FloatArray, TrainingTargets],
    params: Hyperparameters,
    seed: int,
) -> tuple[Network, dict[str, Any]]:
    """Adam on cross-entropy over allowed patterns plus squared relative error of changed
    values (see :attr:`Hyperparameters.value_floor`).

    Early stopping on the validation loss; returns the best epoch's network.
    """
    rng = np.random.default_rng(seed)
    num_patterns = targets.allowed.shape[1]
    sizes = [inputs.shape[1], *params.hidden, num_patterns + targets.change.shape[1]]
    layers = [
        (rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out)), np.zeros(fan_out))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    flat = [array for layer in layers for array in layer]
    moments = [np.zeros_like(a) for a in flat]
    squares = [np.zeros_like(a) for a in flat]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best_loss, best, best_epoch, step = np.inf, [a.copy() for a in flat], 0, 0
    n = inputs.shape[0]
    for epoch in range(params.max_epochs):
        order = rng.permutation(n)
        for start in range(0, n, params.batch_size):
            rows = order[start : start + params.batch_size]
            _, grads = _loss_and_gradients(flat, inputs[rows], _subset(targets, rows), params)
            step += 1
            for i, g in enumerate(grads):
                if i % 2 == 0:  # weights, not biases
                    g = g + params.weight_decay * flat[i]
                moments[i] = beta1 * moments[i] + (1 - beta1) * g
                squares[i] = beta2 * squares[i] + (1 - beta2) * g * g
                corrected = moments[i] / (1 - beta1**step)
                flat[i] -= (
                    params.learning_rate
                    * corrected
                    / (np.sqrt(squares[i] / (1 - beta2**step)) + eps)
                )
        loss, _ = _loss_and_gradients(flat, validation[0], validation[1], params, gradients=False)
        if loss < best_loss - 1e-6:
            best_loss, best, best_epoch = loss, [a.copy() for a in flat], epoch
        elif epoch - best_epoch >= params.patience:
            break
    network = Network(tuple((best[i], best[i + 1]) for i in range(0, len(best), 2)))
    return network, {"validation_loss": float(best_loss), "epochs": best_epoch + 1}


def _subset(targets: TrainingTargets, rows: IntArray) -> TrainingTargets:
    return TrainingTargets(
        targets.pattern[rows], targets.change[rows], targets.changed[rows], targets.allowed[rows]
    )


def _loss_and_gradients(
    flat: list[FloatArray],
    inputs: FloatArray,
    targets: TrainingTargets,
    params: Hyperparameters,
    *,
    gradients: bool = True,
) -> tuple[float, list[FloatArray]]:
    activations = [inputs]
    for i in range(0, len(flat) - 2, 2):
        activations.append(np.maximum(activations[-1] @ flat[i] + flat[i + 1], 0.0))
    outputs = activations[-1] @ flat[-2] + flat[-1]
    n, num_patterns = inputs.shape[0], targets.allowed.shape[1]
    logits = np.where(targets.allowed, outputs[:, :num_patterns], -np.inf)
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    cross_entropy = -np.log(np.maximum(probabilities[rows, targets.pattern], 1e-300))
    error = np.where(targets.changed, outputs[:, num_patterns:] - targets.change, 0.0)
    spread = np.abs(targets.change) + params.value_floor
    relative = error / spread
    loss = float(
        cross_entropy.mean() + params.value_weight * 0.5 * (relative**2).sum(axis=1).mean()
    )
    if not gradients:
        return loss, []
    d_logits = probabilities
    d_logits[rows, targets.pattern] -= 1.0
    delta = np.hstack([d_logits, params.value_weight * relative / spread]) / n
    grads: list[FloatArray] = [np.empty(0)] * len(flat)
    for i in range(len(flat) - 2, -1, -2):
        a = activations[i // 2]
        grads[i], grads[i + 1] = a.T @ delta, delta.sum(axis=0)
        if i:
            delta = (delta @ flat[i].T) * (a > 0)
    return loss, grads


# -- files -------------------------------------------------------------------------------


def save_amortizer(amortizer: Amortizer, folder: Path) -> None:
    """``amortizer.npz`` (the weights, no pickle) and ``amortizer.json`` (the spec)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (weights, bias) in enumerate(amortizer.network.layers):
        arrays[f"layer{i}_weights"], arrays[f"layer{i}_bias"] = weights, bias
    temporary = folder / f".{WEIGHTS_FILE}.tmp"
    with temporary.open("wb") as handle:
        np.savez(handle, **arrays)
    weights_hash = hashlib.sha256(temporary.read_bytes()).hexdigest()
    temporary.replace(folder / WEIGHTS_FILE)
    document = amortizer.spec.to_dict() | {"weights_sha256": weights_hash}
    metadata = folder / f".{METADATA_FILE}.tmp"
    metadata.write_text(json.dumps(document, indent=2) + "\n")
    metadata.replace(folder / METADATA_FILE)


def load_amortizer(folder: Path) -> Amortizer:
    """Read a folder written by :func:`save_amortizer`; never unpickles."""
    where = f"the amortizer in {folder}"
    try:
        document = json.loads((folder / METADATA_FILE).read_text())
        content = (folder / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise AmortizerFileError(
            f"{where} is incomplete: {Path(exc.filename).name} is missing (write one with "
            f"'recourse train')."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AmortizerFileError(f"{where} cannot be read: {exc}.") from None
    if not isinstance(document, dict):
        raise AmortizerFileError(f"{METADATA_FILE} of {where} must hold a JSON object.")
    if hashlib.sha256(content).hexdigest() != document.get("weights_sha256"):
        raise AmortizerFileError(
            f"{WEIGHTS_FILE} of {where} does not match the 'weights_sha256' of {METADATA_FILE}: "
            f"the two files come from different trainings."
        )
    spec = AmortizerSpec.from_dict(document, where)
    try:
        with np.load(folder / WEIGHTS_FILE, allow_pickle=False) as data:
            count = len(data.files) // 2
            layers = tuple(
                (np.asarray(data[f"layer{i}_weights"]), np.asarray(data[f"layer{i}_bias"]))
                for i in range(count)
            )
    except (KeyError, ValueError, OSError) as exc:
        raise AmortizerFileError(f"{WEIGHTS_FILE} of {where} cannot be read: {exc}.") from None
    expected_inputs = len(spec.feature_names) + (
        7 * len(spec.actionable) + 1 if spec.constraint_inputs else 0
    )
    shapes_ok = bool(layers) and layers[0][0].shape[0] == expected_inputs
    outputs = len(spec.catalogue) + len(spec.actionable)
    shapes_ok &= layers[-1][0].shape[1] == outputs
    for (w, b), (w_next, _) in zip(layers, layers[1:], strict=False):
        shapes_ok &= w.shape[1] == b.shape[0] == w_next.shape[0]
    if not shapes_ok:
        raise AmortizerFileError(
            f"The layers of {where} do not fit its spec: {expected_inputs} inputs and "
            f"{outputs} outputs expected."
        )
    return Amortizer(spec, Network(layers))
