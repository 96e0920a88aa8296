"""The amortizer's line search, compiled: per line, the smallest scale either way whose
counterfactual the classifier accepts.

A line is an action pattern and a proposed change: the actionable features take
``start + t step``, clipped into the person's interval and rounded where they must be
whole, and the rest of the row follows through the causal model. Searching one line is a
handful of dependent evaluations (a scan outwards, then regula falsi), each a pass through
the causal model's program and the classifier's layers: numpy would pay a call per
operation on a single row, so the whole search runs in one jitted loop over the lines.

The classifier here is the real one with its standardization folded into the first layer
(float64), so its logit can differ from :meth:`Classifier.logit` in the last bits; the
search accepts only above the threshold plus a margin, and every answer is verified
afterwards by :func:`solver.verify.verify_actions` with the real classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from models.classifiers import Classifier
from models.programs import ModelProgram, propagate_one
from models.scm import StructuralCausalModel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SCAN_SCALES = np.array(
    [0.5, 0.7, 0.85, 1, 1.15, 1.3, 1.6, 2, 2.5, 3.2, 4, 6, 8, 12, 20, 30, 60, 120, 250, 500]
)
"""Sizes tried outwards in each direction until one is accepted: the proposal (1) among
the first, the far ones for lines whose proposed change is much too small (most of them
corners, a feature alone doing the work of two)."""
SECANT_AIM = 5e-4
"""Relative step past the secant's root, so that a linear piece lands on the accepted side."""
SECANT_TOLERANCE = 2e-3
"""A bracket is final once the next step would shrink the accepted scale by less than this."""
REFINEMENTS = 24
"""Most evaluations refining one bracket (integer features make the logit a staircase,
where the secant alone can stall; every third step bisects)."""


@dataclass(frozen=True, eq=False)
class SearchModel:
    """The causal model's program and the classifier's layers in the kernel's form."""

    program: ModelProgram
    weights: FloatArray
    """Layer l's ``inputs x outputs`` weights in ``weights[l]``, zero-padded to a common
    shape (a 3-d array keeps the inner loops contiguous, which the compiler vectorizes)."""
    biases: FloatArray
    widths: IntArray
    """Layer widths, inputs first: layer l maps ``widths[l]`` values to ``widths[l + 1]``."""
    threshold: float
    """Accepted where the logit is at least this."""
    one_hot: IntArray
    """Per feature its one-hot group (0, 1, ...) or -1: a group must have exactly one 1."""
    groups: int

    @classmethod
    def of(cls, scm: StructuralCausalModel, classifier: Classifier, margin: float) -> SearchModel:
        layers = [(layer.weights, layer.bias) for layer in classifier.layers]
        first, bias = layers[0]
        layers[0] = (
            first / classifier.scale[:, None],
            bias - (classifier.mean / classifier.scale) @ first,
        )
        widths = np.array([first.shape[0]] + [w.shape[1] for w, _ in layers], np.int64)
        weights = np.zeros((len(layers), widths[:-1].max(), widths[1:].max()))
        biases = np.zeros((len(layers), widths[1:].max()))
        for i, (w, b) in enumerate(layers):
            weights[i, : w.shape[0], : w.shape[1]] = w
            biases[i, : len(b)] = b
        one_hot = np.full(scm.num_features, -1, np.int64)
        for group, levels in enumerate(scm.one_hot.values()):
            one_hot[[scm.index[level] for level in levels]] = group
        return cls(
            scm.program,
            weights,
            biases,
            widths,
            classifier.logit_threshold + margin,
            one_hot,
            len(scm.one_hot),
        )


def search_lines(
    model: SearchModel,
    columns: IntArray,
    integer: BoolArray,
    x: FloatArray,
    noise: FloatArray,
    intervene: BoolArray,
    start: FloatArray,
    step: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
) -> FloatArray:
    """Per line (a row of each array), the scale ``t`` either way of the smallest accepted
    change found, or nan. ``columns``: the actionable features' columns, which the last
    four arrays hold; ``integer``: which of them take whole numbers."""
    t = np.empty(len(x))
    _search(
        model.program.value_code,
        model.program.depth,
        (model.weights, model.biases, model.widths, model.threshold),
        (model.one_hot, model.groups),
        (columns, integer),
        *(np.ascontiguousarray(a) for a in (x, noise, intervene, start, step, lower, upper)),
        t,
    )
    return t


_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _search(
    program, depth, network, one_hot, features, x, noise, intervene, start, step, lower, upper, t
):
    """:func:`search_lines` into ``t``. The tuples: ``program`` the causal model's value
    code, ``network`` (weights, biases, widths, threshold), ``one_hot`` (groups per
    feature, count), ``features`` (actionable columns, integer)."""
    f = x.shape[1]
    slots = np.empty(2 * f)
    values = np.empty(f)
    scratch = (
        slots,
        np.empty(depth),
        values,
        np.empty((2, network[2].max())),
        np.empty(max(one_hot[1], 1)),
    )
    model = (program, network, one_hot)
    for line in range(len(x)):
        slots[f:] = noise[line]
        values[:] = x[line]
        row = (features, intervene[line], start[line], step[line], lower[line], upper[line])
        best = np.inf
        best_t = np.nan
        zero_gap = _gap(model, scratch, row, 0.0)
        # Per direction (0: +, 1: -), the last rejected size and its gap, and the first
        # accepted one (inf until found).
        lo = np.zeros(2)
        lo_gap = np.full(2, zero_gap)
        hi = np.full(2, np.inf)
        hi_gap = np.zeros(2)
        # Outwards by size, both directions in turn; a direction stops once accepted, or
        # once its sizes pass the other's estimated root (it cannot be cheaper).
        for size in SCAN_SCALES:
            for d in range(2):
                if hi[d] < np.inf or size >= _root_estimate(lo, lo_gap, hi, hi_gap, 1 - d):
                    continue
                gap = _gap(model, scratch, row, size * (1.0 - 2.0 * d))
                if gap >= 0.0:
                    hi[d], hi_gap[d] = size, gap
                else:
                    lo[d], lo_gap[d] = size, gap
            if hi[0] < np.inf and hi[1] < np.inf:
                break
        # Refine the direction with the nearer root first; the other only while it can win.
        first = (
            0
            if _root_estimate(lo, lo_gap, hi, hi_gap, 0)
            <= _root_estimate(lo, lo_gap, hi, hi_gap, 1)
            else 1
        )
        for d in (first, 1 - first):
            if hi[d] == np.inf or lo[d] >= best:
                continue
            size = _refine(model, scratch, row, 1.0 - 2.0 * d, lo[d], lo_gap[d], hi[d], hi_gap[d])
            if size < best:
                best, best_t = size, size * (1.0 - 2.0 * d)
        t[line] = best_t


@numba.njit(**_JIT)
def _root_estimate(lo, lo_gap, hi, hi_gap, d):
    """Where direction ``d``'s bracket's secant crosses the threshold (inf: no bracket)."""
    if hi[d] == np.inf:
        return np.inf
    return _secant_root(lo[d], lo_gap[d], hi[d], hi_gap[d])


@numba.njit(**_JIT)
def _secant_root(lo, lo_gap, hi, hi_gap):
    """Where the chord through (lo, lo_gap) and (hi, hi_gap) crosses 0, within [lo, hi]."""
    rise = hi_gap - lo_gap
    if rise <= 0.0:
        return hi
    return lo + min(max(-lo_gap / rise, 0.0), 1.0) * (hi - lo)


@numba.njit(**_JIT)
def _refine(model, scratch, row, sign, lo, lo_gap, hi, hi_gap):
    """The smallest accepted size found in ``[lo, hi]`` (``hi`` accepted) by regula falsi
    with the Illinois rule, every third step a bisection."""
    moved = 0  # 1: hi moved last, -1: lo moved last
    for i in range(REFINEMENTS):
        aim = _secant_root(lo, lo_gap, hi, hi_gap) * (1.0 + SECANT_AIM)
        if aim >= hi * (1.0 - SECANT_TOLERANCE):
            break
        if i % 3 == 2:
            aim = 0.5 * (lo + hi)
        aim = min(max(aim, lo), hi)
        gap = _gap(model, scratch, row, sign * aim)
        if gap >= 0.0:
            hi, hi_gap = aim, gap
            if moved == 1:
                lo_gap *= 0.5
            moved = 1
        else:
            lo, lo_gap = aim, gap
            if moved == -1:
                hi_gap *= 0.5
            moved = -1
    return hi


@numba.njit(**_JIT)
def _gap(model, scratch, row, t):
    """The classifier's logit minus the threshold at scale ``t`` of the line (>= 0:
    accepted); -inf where a one-hot group is broken."""
    program, (weights, biases, widths, threshold), (one_hot, groups) = model
    slots, stack, values, work, counts = scratch
    (columns, integer), intervene, start, step, lower, upper = row
    for k in range(len(columns)):
        v = min(max(start[k] + t * step[k], lower[k]), upper[k])
        values[columns[k]] = np.round(v) if integer[k] else v
    propagate_one(program, slots, stack, intervene, values)
    f = len(values)
    if groups:
        counts[:] = 0.0
        for j in range(f):
            if one_hot[j] >= 0:
                v = slots[j]
                if v != 0.0 and v != 1.0:
                    return -np.inf
                counts[one_hot[j]] += v
        for c in counts:
            if c != 1.0:
                return -np.inf
    # The layers, ReLU between them; activations alternate between the rows of ``work``.
    current = slots[:f]
    last = len(widths) - 2
    for layer in range(last + 1):
        out = work[layer % 2]
        n_out = widths[layer + 1]
        for o in range(n_out):
            out[o] = biases[layer, o]
        for i in range(widths[layer]):
            a = current[i]
            if a != 0.0:  # no array expressions: each would allocate
                for o in range(n_out):
                    out[o] += a * weights[layer, i, o]
        if layer < last:
            for o in range(n_out):
                out[o] = max(out[o], 0.0)
        current = out
    return current[0] - threshold
