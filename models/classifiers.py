"""Classifiers as data: logistic regression and ReLU MLPs, stored as plain JSON.

A classifier standardizes its inputs (``(x - mean) / scale``), computes a logit, and
accepts an individual when ``sigmoid(logit) >= threshold``. The same definition serves
the numpy forward pass (verification, grid search) and the MILP formulation, which reads
the weights and the per-neuron interval bounds computed here.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.expressions import logit as logit_of
from models.expressions import sigmoid

FloatArray = npt.NDArray[np.float64]
SCHEMA_VERSION = 1
# scikit-learn can leave denormal weights (1e-221) that upset MILP solvers' tolerances.
_NEGLIGIBLE_WEIGHT = 1e-12
# Rows per block of a large batch in the forward pass: a block's hidden activations (512 KiB
# for 32 neurons) stay in cache; a whole batch's arrive as fresh pages, and the page faults
# cost more than the arithmetic. Each row's arithmetic is the same, so are the bits.
_BLOCK_ROWS = 2048


class ClassifierFileError(ValueError):
    """A classifier document breaks a rule; the message names the field and the value."""


@dataclass(frozen=True, eq=False)
class Layer:
    """An affine layer ``z = a @ weights + bias`` (``weights`` is inputs x outputs)."""

    weights: FloatArray
    bias: FloatArray


@dataclass(frozen=True, eq=False)
class Classifier:
    """A standardized-input classifier: logistic regression (one layer) or a ReLU MLP.

    ``layers`` are applied in order with ReLU between them; the last layer has one output,
    the logit. Logistic regression is the case of a single layer.
    """

    kind: str  # "lr" or "mlp"
    feature_names: tuple[str, ...]
    mean: FloatArray
    scale: FloatArray
    layers: tuple[Layer, ...]
    threshold: float = 0.5
    metadata: Mapping[str, Any] = field(default_factory=dict)

    # -- numerics -----------------------------------------------------------------------

    @functools.cached_property
    def logit_threshold(self) -> float:
        return float(logit_of(self.threshold))

    def logit(self, x: FloatArray) -> FloatArray:
        """Logits of rows ``x`` (features in :attr:`feature_names` order)."""
        x = np.atleast_2d(x)
        if len(x) <= _BLOCK_ROWS:
            return self._logit_rows(x)
        logits = np.empty(len(x))
        for rows in row_blocks(len(x), _BLOCK_ROWS):
            logits[rows] = self._logit_rows(x[rows])
        return logits

    def _logit_rows(self, x: FloatArray) -> FloatArray:
        # The bits of ``max(a @ W + b, 0)`` layer by layer, in place on the pass's own
        # arrays (fewer temporaries). np.dot calls the same BLAS product as ``@`` with a
        # third of its overhead on a few rows.
        a = np.subtract(x, self.mean)
        a /= self.scale
        for layer in self.layers[:-1]:
            a = np.dot(a, layer.weights)
            a += layer.bias
            np.maximum(a, 0.0, out=a)
        last = self.layers[-1]
        return np.dot(a, last.weights)[:, 0] + last.bias

    def probability(self, x: FloatArray) -> FloatArray:
        return np.asarray(sigmoid(self.logit(x)))

    def accepts(self, x: FloatArray) -> npt.NDArray[np.bool_]:
        return self.probability(x) >= self.threshold

    def preactivation_bounds(
        self, lower: FloatArray, upper: FloatArray
    ) -> list[tuple[FloatArray, FloatArray]]:
        """Interval bounds of every layer's pre-activations over the input box.

        Inputs are raw features; one (lower, upper) pair per layer, the last being the logit.
        Works on a single box (1-d arrays) or a batch of boxes (2-d).
        """
        lo = (np.asarray(lower, dtype=float) - self.mean) / self.scale
        hi = (np.asarray(upper, dtype=float) - self.mean) / self.scale
        bounds = []
        for position, layer in enumerate(self.layers):
            positive, negative = np.maximum(layer.weights, 0), np.minimum(layer.weights, 0)
            z_lo = lo @ positive + hi @ negative + layer.bias
            z_hi = hi @ positive + lo @ negative + layer.bias
            bounds.append((z_lo, z_hi))
            if position < len(self.layers) - 1:
                lo, hi = np.maximum(z_lo, 0.0), np.maximum(z_hi, 0.0)
        return bounds

    def preactivation_bounds_affine(
        self,
        P: FloatArray,
        q: FloatArray,
        lower: FloatArray,
        upper: FloatArray,
        linear_max: Callable[[FloatArray], FloatArray] | None = None,
        logit_at_least: float | None = None,
    ) -> list[tuple[FloatArray, FloatArray]]:
        """Bounds of every layer's pre-activations for inputs ``x = P y + q``, y in a box.

        Back-substitution through linear relaxations of the ReLUs (DeepPoly: Singh et al.,
        2019; CROWN: Zhang et al., 2018), intersected with plain interval bounds over the
        box of x. Much tighter than interval arithmetic from the second layer on, and it
        keeps correlations between inputs (a feature that moves with another).

        ``linear_max(G)``, when given, returns the maximum of each row of ``G @ y`` over
        the set y lives in (a subset of the box, e.g. a cost budget).

        ``logit_at_least``: bound only the inputs whose logit is at least this (the ones a
        recourse MILP may accept). The first pass's linear upper bound of the logit, ``h y
        + h0 >= logit``, then cuts the set by the half-space ``h y >= logit_at_least -
        h0``, and further passes bound every layer over the cut set: for any ``lam >= 0``,
        ``max G y <= max (G + lam h) y - lam (logit_at_least - h0)`` over the uncut set
        (weak duality), and the smallest over a grid of ``lam`` is kept. Bounds of a layer
        may then cross (lower above upper): no input in the set is accepted.
        """
        P, q = np.asarray(P, dtype=float), np.asarray(q, dtype=float)
        lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
        if linear_max is None:

            def linear_max(G: FloatArray) -> FloatArray:
                return np.maximum(G, 0) @ upper + np.minimum(G, 0) @ lower

        input_map = P / self.scale[:, None]
        input_offset = (q - self.mean) / self.scale
        if len(self.layers) == 1:
            # One affine layer: the logit's bound over y is exact on the set, and the cut
            # by its own upper bound changes nothing. Computed directly: the recourse
            # engine asks for it once per mask, and the general pass is mostly overhead.
            layer = self.layers[0]
            coef = layer.weights.T
            G = coef @ input_map
            const = layer.bias + coef @ input_offset
            extremes = linear_max(np.vstack([-G, G]))
            return [(const - extremes[:1], extremes[1:] + const)]
        positive, negative = np.maximum(P, 0), np.minimum(P, 0)
        interval = self.preactivation_bounds(
            positive @ lower + negative @ upper + q, positive @ upper + negative @ lower + q
        )
        bounds, (h, h0) = self._back_substitute(input_map, input_offset, linear_max, interval)
        if logit_at_least is None:
            return bounds
        # Twice: the second cut comes from the first cut's tighter logit bound (a third
        # pass did not make the MILPs faster on Loan).
        for _ in range(2):
            cut = _half_space_maximum(linear_max, h, logit_at_least - h0)
            bounds, (h, h0) = self._back_substitute(
                input_map, input_offset, cut, bounds, refine_unstable_only=True
            )
        return bounds

    def _back_substitute(
        self,
        input_map: FloatArray,
        input_offset: FloatArray,
        linear_max: Callable[[FloatArray], FloatArray],
        known: list[tuple[FloatArray, FloatArray]],
        refine_unstable_only: bool = False,
    ) -> tuple[list[tuple[FloatArray, FloatArray]], tuple[FloatArray, float]]:
        """DeepPoly bounds of every layer, intersected with ``known`` ones, and the logit's
        linear upper bound in y (coefficients, constant)."""
        bounds: list[tuple[FloatArray, FloatArray]] = []
        relaxations: list[tuple[FloatArray, FloatArray, FloatArray]] = []
        for index, layer in enumerate(self.layers):
            sides = []
            for upper_side in (False, True):
                coef = layer.weights.T.copy()
                const = layer.bias.copy()
                for back in range(index - 1, -1, -1):
                    slope_up, intercept_up, slope_low = relaxations[back]
                    pos, neg = np.maximum(coef, 0), np.minimum(coef, 0)
                    if upper_side:
                        const = const + pos @ intercept_up
                        coef = pos * slope_up + neg * slope_low
                    else:
                        const = const + neg @ intercept_up
                        coef = pos * slope_low + neg * slope_up
                    const = const + coef @ self.layers[back].bias
                    coef = coef @ self.layers[back].weights.T
                const = const + coef @ input_offset
                sides.append((coef @ input_map, const))
            (low_coef, low_const), (high_coef, high_const) = sides
            lo, hi = known[index]
            # A hidden neuron already stable in the known bounds keeps them: its relaxation
            # does not depend on them (this halves the cost of the cut passes).
            todo = (
                np.flatnonzero((lo < 0) & (hi > 0))
                if refine_unstable_only and index < len(self.layers) - 1
                else np.arange(len(lo))
            )
            if len(todo):
                # One call for both sides: min of G y is -max of (-G) y.
                extremes = linear_max(np.vstack([-low_coef[todo], high_coef[todo]]))
                lo, hi = lo.copy(), hi.copy()
                lo[todo] = np.maximum(-extremes[: len(todo)] + low_const[todo], lo[todo])
                hi[todo] = np.minimum(extremes[len(todo) :] + high_const[todo], hi[todo])
            bounds.append((lo, hi))
            if index < len(self.layers) - 1:
                unstable = (lo < 0) & (hi > 0)
                width = np.where(unstable, hi - lo, 1.0)
                slope_up = np.where(hi <= 0, 0.0, np.where(lo >= 0, 1.0, hi / width))
                intercept_up = -slope_up * np.where(unstable, lo, 0.0)  # lo may be inf
                slope_low = np.where(hi <= 0, 0.0, np.where(lo >= 0, 1.0, (hi >= -lo) * 1.0))
                relaxations.append((slope_up, intercept_up, slope_low))
        return bounds, (high_coef[0], float(high_const[0]))

    # -- storage ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "threshold": self.threshold,
            "scaler": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "layers": [
                {"weights": layer.weights.tolist(), "bias": layer.bias.tolist()}
                for layer in self.layers
            ],
            "metadata": dict(self.metadata),
        }

    def content_hash(self) -> str:
        """SHA-256 of the weights, scaler, features and threshold (not the metadata)."""
        data = self.to_dict()
        data.pop("metadata")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Classifier:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ClassifierFileError(
                f"The classifier's 'schema_version' must be {SCHEMA_VERSION}. "
                f"Got {data.get('schema_version')!r} instead."
            )
        kind = data.get("kind")
        if kind not in ("lr", "mlp"):
            raise ClassifierFileError(
                f"The classifier's 'kind' must be 'lr' or 'mlp'. Got {kind!r}."
            )
        names = data.get("feature_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ClassifierFileError("The classifier's 'feature_names' must be a list of names.")
        scaler = data.get("scaler", {})
        mean = _array(scaler.get("mean"), "scaler.mean", (len(names),))
        scale = _array(scaler.get("scale"), "scaler.scale", (len(names),))
        if np.any(scale <= 0):
            raise ClassifierFileError("The classifier's 'scaler.scale' must be positive.")
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise ClassifierFileError("The classifier's 'layers' must be a non-empty list.")
        layers = []
        width = len(names)
        for i, raw in enumerate(raw_layers):
            weights = np.atleast_2d(_array(raw.get("weights"), f"layers[{i}].weights", None))
            if weights.shape[0] != width:
                raise ClassifierFileError(
                    f"The classifier's 'layers[{i}].weights' must have {width} rows. "
                    f"Got shape {weights.shape} instead."
                )
            bias = _array(raw.get("bias"), f"layers[{i}].bias", (weights.shape[1],))
            layers.append(Layer(_clean(weights), _clean(bias)))
            width = weights.shape[1]
        if width != 1:
            raise ClassifierFileError(
                f"The classifier's last layer must have 1 output, not {width}."
            )
        if kind == "lr" and len(layers) != 1:
            raise ClassifierFileError("A classifier of kind 'lr' must have exactly one layer.")
        threshold = float(data.get("threshold", 0.5))
        if not 0 < threshold < 1:
            raise ClassifierFileError(
                f"The classifier's 'threshold' must be in (0, 1). Got {threshold}."
            )
        return cls(
            kind, tuple(names), mean, scale, tuple(layers), threshold, data.get("metadata", {})
        )

    @classmethod
    def from_json(cls, text: str) -> Classifier:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ClassifierFileError(f"The classifier file is not valid JSON: {exc}.") from None

    def check_features(self, names: Sequence[str]) -> None:
        """Raise unless this classifier reads exactly ``names``, in that order."""
        if tuple(names) != self.feature_names:
            raise ClassifierFileError(
                f"The classifier reads features {list(self.feature_names)}, but the causal model "
                f"has {list(names)}; they must match in name and order."
            )


def row_blocks(n: int, size: int) -> list[slice]:
    """Blocks of ``size`` rows covering ``n`` rows, the rest last; a rest of one row joins
    the block before it.

    Evaluated block by block, a forward pass gives every row the bits of one pass over all
    rows, when ``size`` is a multiple of any tile height: BLAS computes a row's product with
    other bits in a last, partial tile of rows than in a whole one, and with others again
    for a single row (a matrix-vector product).
    """
    ends = [*range(0, n, size), n]
    if len(ends) > 2 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    return [slice(start, stop) for start, stop in itertools.pairwise(ends)]


def _array(value: Any, where: str, shape: tuple[int, ...] | None) -> FloatArray:
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ClassifierFileError(f"The classifier's {where!r} must be numbers.") from None
    if shape is not None and array.shape != shape:
        raise ClassifierFileError(
            f"The classifier's {where!r} must have shape {shape}. Got {array.shape} instead."
        )
    if not np.all(np.isfinite(array)):
        raise ClassifierFileError(f"The classifier's {where!r} holds NaN or infinite values.")
    return array


def _clean(array: FloatArray) -> FloatArray:
    return np.where(np.abs(array) < _NEGLIGIBLE_WEIGHT, 0.0, array)


# Multipliers of the half-space in _half_space_maximum, relative to |G row| / |h|.
# A finer or wider grid (2^-8 to 2^8 in quarter powers) gave no faster MILPs on Loan.
_MULTIPLIERS = np.concatenate([[0.0], 2.0 ** np.arange(-6.0, 7.0)])


def _half_space_maximum(
    linear_max: Callable[[FloatArray], FloatArray], h: FloatArray, rhs: float
) -> Callable[[FloatArray], FloatArray]:
    """Upper bounds of each row of ``G @ y`` over the set of ``linear_max`` cut by ``h y >=
    rhs``: the smallest ``linear_max(G + lam h) - lam rhs`` over a grid of ``lam >= 0``
    (each one a valid bound; -inf when the cut set is provably empty)."""
    norm = float(np.linalg.norm(h))
    if norm == 0.0:
        return lambda G: linear_max(G) if rhs <= 0 else np.full(len(G), -np.inf)

    def maximum(G: FloatArray) -> FloatArray:
        lam = (np.linalg.norm(G, axis=1) / norm)[:, None] * _MULTIPLIERS
        rows = (G[:, None, :] + lam[:, :, None] * h).reshape(-1, G.shape[1])
        return (linear_max(rows).reshape(lam.shape) - lam * rhs).min(axis=1)

    return maximum
