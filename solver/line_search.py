"""The amortizer's small-batch path, compiled: per person, the candidate patterns' lines
searched for the smallest scale either way whose counterfactual the classifier accepts,
and the cheapest accepted answer kept.

A line is an action pattern and a proposed change: the actionable features take
``start + t step``, clipped into the person's interval and rounded where they must be
whole, and the rest of the row follows through the causal model. Searching one line is a
handful of dependent evaluations (the secant from the proposal, an outward scan where
that brackets nothing, then regula falsi), each a pass through the causal model's
program and the classifier's layers: numpy would pay a call per operation on a single
row, so everything runs in one jitted loop over the people.

Large batches search in numpy, vectorized over many lines; their evaluation, a step of
many rows, is compiled here too (:func:`line_gaps`: gather, projection, propagation and
the classifier in float32, a block of rows at a time).

The classifier here is the real one with its standardization folded into the first layer
(float64, or float32 for large batches), so its logit can differ from
:meth:`Classifier.logit` in the last bits; the searches accept only above the threshold
plus a margin, and every answer is verified afterwards by
:func:`solver.verify.verify_actions` with the real classifier.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np
import numpy.typing as npt

from models.amortizer import CHANGE, NOT_ACTED
from models.classifiers import Classifier
from models.costs import feature_cost
from models.preferences import ConstraintArrays
from models.programs import BLOCK, ModelProgram, propagate_one, run_program
from models.scm import StructuralCausalModel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SCAN_SCALES = np.array(
    [0.5, 0.7, 0.85, 1, 1.15, 1.3, 1.6, 2, 2.5, 3.2, 4, 6, 8, 12, 20, 30, 60, 120, 250, 500]
)
"""Sizes tried outwards in a direction the secant did not bracket, until one is accepted:
the far ones serve lines whose proposed change is much too small (most of them corners,
a feature alone doing the work of two)."""
EXTRAPOLATIONS = 3
"""Steps of the secant past a rejected proposal before scanning."""
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

    @functools.cached_property
    def network32(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], IntArray]:
        """The layers in float32, for the large-batch search (many rows: 8 lanes a
        vector)."""
        return self.weights.astype(np.float32), self.biases.astype(np.float32), self.widths

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


class SmallBatchTables(NamedTuple):
    """What the small-batch search needs besides the model: the amortizer's features and
    pattern catalogue, the cost profile's terms, and the candidate rules."""

    columns: IntArray
    """The actionable features' columns."""
    integer: BoolArray
    """Which actionable features take whole numbers."""
    ancestor: BoolArray
    """(K, K): [k, a] where actionable feature a is an ancestor of k."""
    catalogue: IntArray
    """The amortizer's patterns: per actionable feature NOT_ACTED, CHANGE or HOLD."""
    denominators: FloatArray
    l1: bool
    sparsity: float
    """The cost profile's terms (see :func:`models.costs.feature_cost`)."""
    candidates: int
    chance_floor: float
    """The first ``candidates`` patterns are tried where the network's probability of
    them is at least ``chance_floor`` (the best always); the rest only for a person with
    no accepted candidate yet."""


def small_batch(
    model: SearchModel,
    tables: SmallBatchTables,
    x: FloatArray,
    noise: FloatArray,
    constraints: ConstraintArrays,
    ranked: IntArray,
    chances: FloatArray,
    changed: FloatArray,
) -> tuple[BoolArray, FloatArray]:
    """Per person, the mask and actionable values of the cheapest accepted answer found,
    or, where none is, the best pattern's proposal (to be verified either way).

    ``ranked`` (n, patterns) each person's patterns best first, ``chances`` their
    probabilities (0: not allowed), ``changed`` (n, K) the network's proposed values. Each
    candidate pattern is a line from the current values towards its proposal (no-ops
    dropped); a line changing two features also has four corners (one feature at its
    interval end or held, the other moving), lines of their own.
    """
    n, k = len(x), len(tables.columns)
    mask, values = np.empty((n, k), dtype=bool), np.empty((n, k))
    _small_batch(
        model.program.value_code,
        model.program.depth,
        (model.weights, model.biases, model.widths, model.threshold),
        (model.one_hot, model.groups),
        tuple(tables),
        np.ascontiguousarray(x),
        np.ascontiguousarray(noise),
        (
            constraints.lower,
            constraints.upper,
            constraints.weight,
            constraints.soft_limit,
            constraints.soft_penalty,
        ),
        np.ascontiguousarray(ranked),
        np.ascontiguousarray(chances),
        np.ascontiguousarray(changed),
        mask,
        values,
    )
    return mask, values


_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _small_batch(
    program, depth, network, one_hot, tables, x, noise, people, ranked, chances, changed,
    out_mask, out_values,
):  # fmt: skip
    """:func:`small_batch` into ``out_mask`` and ``out_values``."""
    columns, integer, ancestor, catalogue, _, _, _, candidates, chance_floor = tables
    lower, upper = people[0], people[1]
    n, f = x.shape
    k_count = len(columns)
    slots = np.empty(2 * f)
    values = np.empty(f)
    # Reused for every line: the row's slots (features, noise), the program's stack, the
    # intervention's values, two rows of layer activations, one-hot counts, the brackets
    # (lo, lo gap, hi, hi gap per direction), the intervention mask, dropped features.
    scratch = (
        slots,
        np.empty(depth),
        values,
        np.empty((2, network[2].max())),
        np.empty(max(one_hot[1], 1)),
        np.empty((4, 2)),
        np.zeros(f, dtype=np.bool_),
        np.empty(k_count, dtype=np.bool_),
    )
    model = (program, network, one_hot)
    current = np.empty(k_count)
    mask = np.empty(k_count, dtype=np.bool_)
    step = np.empty(k_count)
    corner_mask = np.empty(k_count, dtype=np.bool_)
    corner_start = np.empty(k_count)
    corner_step = np.empty(k_count)
    for p in range(n):
        slots[f:] = noise[p]
        values[:] = x[p]
        for k in range(k_count):
            current[k] = x[p, columns[k]]
        best = np.inf
        settled = False  # a candidate itself (not only a corner) was accepted
        for rank in range(ranked.shape[1]):
            chance = chances[p, rank]
            candidate = rank == 0 or (rank < candidates and chance >= chance_floor)
            if not candidate and (settled or chance <= 0.0):  # chances fall with the rank
                break
            _line_of(catalogue[ranked[p, rank]], chance > 0.0, changed[p], current, lower[p],
                     upper[p], ancestor, mask, step, scratch[7])  # fmt: skip
            if rank == 0:  # the best pattern's proposal, kept where nothing is accepted
                out_mask[p] = mask
                for k in range(k_count):
                    out_values[p, k] = _projected(current[k] + step[k], lower[p, k],
                                                  upper[p, k], integer[k])  # fmt: skip
            cost = _try_line(model, scratch, tables, people, p, current, mask, current, step,
                             best, out_mask[p], out_values[p])  # fmt: skip
            settled |= cost < np.inf
            best = min(best, cost)
            pair = np.flatnonzero(step)
            if len(pair) != 2:
                continue
            for c in range(4):  # the corners: two ends, then two holds
                fixed, moved = pair[c % 2], pair[1 - c % 2]
                corner_mask[:] = mask
                corner_start[:] = current
                corner_step[:] = 0.0
                corner_step[moved] = step[moved]
                if c < 2:
                    end = upper[p, fixed] if step[fixed] > 0 else lower[p, fixed]
                    if not np.isfinite(end):
                        continue
                    corner_start[fixed] = end
                else:  # back at its value: stays acted only if held while an ancestor moves
                    corner_mask[fixed] = False
                    for a in range(k_count):
                        corner_mask[fixed] |= ancestor[fixed, a] and mask[a]
                cost = _try_line(model, scratch, tables, people, p, current, corner_mask,
                                 corner_start, corner_step, best, out_mask[p],
                                 out_values[p])  # fmt: skip
                best = min(best, cost)


@numba.njit(**_JIT)
def _line_of(pattern, allowed, changed, current, lower, upper, ancestor, mask, step, dropped):
    """A pattern's line (``mask``, ``step`` from ``current``): the network's values where it
    changes a feature, current ones where it holds, clipped into the interval; an acted
    feature left at its value with no acted ancestor is dropped (nothing to do)."""
    k_count = len(current)
    for k in range(k_count):
        mask[k] = allowed and pattern[k] != NOT_ACTED
        target = changed[k] if allowed and pattern[k] == CHANGE else current[k]
        step[k] = min(max(target, lower[k]), upper[k]) - current[k]
    for k in range(k_count):
        target = current[k] + step[k]
        dropped[k] = mask[k] and abs(step[k]) <= 1e-9 * (1.0 + abs(target))
        for a in range(k_count):
            dropped[k] &= not (ancestor[k, a] and mask[a])
    for k in range(k_count):
        mask[k] &= not dropped[k]
        if not mask[k]:
            step[k] = 0.0


@numba.njit(**_JIT)
def _try_line(model, scratch, tables, people, p, current, mask, start, step, best, out_mask,
              out_values):  # fmt: skip
    """Search a line; where accepted, its cost, and its answer stored in ``out_mask`` and
    ``out_values`` if cheaper than ``best``. Returns the cost (inf: nothing accepted)."""
    columns, integer, _, _, denominators, l1, sparsity, _, _ = tables
    lower, upper, weight, soft_limit, soft_penalty = people
    intervene = scratch[6]
    intervene[:] = False
    for k in range(len(columns)):
        intervene[columns[k]] = mask[k]
    row = ((columns, integer), intervene, start, step, lower[p], upper[p])
    t = _search_line(model, scratch, row)
    if t != t:
        return np.inf
    cost = 0.0
    for k in range(len(columns)):
        if mask[k]:
            value = _projected(start[k] + t * step[k], lower[p, k], upper[p, k], integer[k])
            cost += feature_cost(value - current[k], weight[p, k], denominators[k], l1,
                                 sparsity, soft_limit[p, k], soft_penalty[p, k])  # fmt: skip
    if cost < best:
        for k in range(len(columns)):
            out_mask[k] = mask[k]
            out_values[k] = _projected(start[k] + t * step[k], lower[p, k], upper[p, k],
                                       integer[k])  # fmt: skip
    return cost


@numba.njit(**_JIT)
def _projected(value, lower, upper, integer):
    """A value clipped into its interval, rounded where whole (as ``project_values``)."""
    value = min(max(value, lower), upper)
    return np.round(value) if integer else value


@numba.njit(**_JIT)
def _search_line(model, scratch, row):
    """The scale either way of the smallest accepted change found on a line, or nan.

    The logit along a line is nearly linear, so the proposal and its reverse (t = 1, -1)
    with the start (0) bracket or point at the boundary: a rising side's secant, extended,
    is accepted most of the time. A side still unbracketed then scans outwards over
    :data:`SCAN_SCALES`; either stops where it could no longer beat the other side."""
    bracket = scratch[5]
    lo, lo_gap, hi, hi_gap = bracket[0], bracket[1], bracket[2], bracket[3]
    # Per direction (0: +, 1: -), the last rejected size and its gap, and the first
    # accepted one (inf until found).
    zero_gap = _gap(model, scratch, row, 0.0)
    for d in range(2):
        gap = _gap(model, scratch, row, 1.0 - 2.0 * d)
        if gap >= 0.0:
            lo[d], lo_gap[d], hi[d], hi_gap[d] = 0.0, zero_gap, 1.0, gap
        else:
            lo[d], lo_gap[d], hi[d], hi_gap[d] = 1.0, gap, np.inf, 0.0
    for d in range(2):
        sign = 1.0 - 2.0 * d
        far, far_gap = 0.0, zero_gap
        for _ in range(EXTRAPOLATIONS):
            near, near_gap = lo[d], lo_gap[d]
            if hi[d] < np.inf or near_gap <= far_gap:
                break
            guess = near - near_gap * (near - far) / (near_gap - far_gap) * (1.0 + SECANT_AIM)
            if guess > SCAN_SCALES[-1] or guess >= _root_estimate(lo, lo_gap, hi, hi_gap, 1 - d):
                break
            gap = _gap(model, scratch, row, sign * guess)
            if gap >= 0.0:
                hi[d], hi_gap[d] = guess, gap
            else:
                far, far_gap = near, near_gap
                lo[d], lo_gap[d] = guess, gap
        for size in SCAN_SCALES:
            if hi[d] < np.inf or size >= _root_estimate(lo, lo_gap, hi, hi_gap, 1 - d):
                break
            if size <= lo[d]:
                continue
            gap = _gap(model, scratch, row, sign * size)
            if gap >= 0.0:
                hi[d], hi_gap[d] = size, gap
            else:
                lo[d], lo_gap[d] = size, gap
    # Refine the direction with the nearer root first; the other only while it can win.
    ahead = _root_estimate(lo, lo_gap, hi, hi_gap, 0) <= _root_estimate(lo, lo_gap, hi, hi_gap, 1)
    best, best_t = np.inf, np.nan
    for d in (0, 1) if ahead else (1, 0):
        if hi[d] == np.inf or lo[d] >= best:
            continue
        size = _refine(model, scratch, row, 1.0 - 2.0 * d, lo[d], lo_gap[d], hi[d], hi_gap[d])
        if size < best:
            best, best_t = size, size * (1.0 - 2.0 * d)
    return best_t


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
    slots, stack, values, work, counts = scratch[:5]
    (columns, integer), intervene, start, step, lower, upper = row
    for k in range(len(columns)):
        values[columns[k]] = _projected(start[k] + t * step[k], lower[k], upper[k], integer[k])
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


def line_gaps(
    model: SearchModel,
    table: FloatArray,
    intervene: BoolArray,
    rows: IntArray,
    t: FloatArray,
    columns: IntArray,
    integer: BoolArray,
    threshold: float,
) -> FloatArray:
    """The large-batch search's evaluation: line row ``rows[i]`` at scale ``t[i]``, its
    values projected (clipped, whole where required), through the causal model and the
    classifier in float32: its logit minus ``threshold`` (>= 0: accepted). ``table``
    holds per line row its factual row, noise, start, step, lower and upper ends side by
    side; ``intervene`` its features set."""
    gaps = np.empty(len(rows))
    _line_gaps(
        model.program.value_code, model.program.depth, model.network32, table, intervene,
        rows, t, columns, integer, threshold, gaps,
    )  # fmt: skip
    return gaps


def row_gaps(model: SearchModel, x: FloatArray, threshold: float) -> FloatArray:
    """The classifier's float32 logit of rows ``x`` minus ``threshold``, as
    :func:`line_gaps` computes it."""
    gaps = np.empty(len(x))
    _row_gaps(model.network32, np.ascontiguousarray(x, dtype=float), threshold, gaps)
    return gaps


@numba.njit(**_JIT)
def _line_gaps(
    value_code, depth, network, table, intervene, rows, t, columns, integer, threshold, gaps
):  # fmt: skip
    """:func:`line_gaps` into ``gaps``: gather, projection, propagation and the layers
    fused, a block of rows at a time (the interpreter of :mod:`models.programs`)."""
    ops, operands, args, consts, value_start = value_code
    f, k = intervene.shape[1], len(columns)
    slots = np.empty((2 * f, BLOCK))
    stack = np.empty((depth, BLOCK))
    values = np.empty((f, BLOCK))
    activations = np.empty((2, network[2].max(), BLOCK), dtype=np.float32)
    for first in range(0, len(rows), BLOCK):
        m = min(BLOCK, len(rows) - first)
        for r in range(m):
            row = rows[first + r]
            for j in range(f):
                slots[f + j, r] = table[row, f + j]
            for c in range(k):
                start, step = table[row, 2 * f + c], table[row, 2 * f + k + c]
                lower, upper = table[row, 2 * f + 2 * k + c], table[row, 2 * f + 3 * k + c]
                values[columns[c], r] = _projected(start + t[first + r] * step, lower, upper,
                                                   integer[c])  # fmt: skip
        for j in range(f):
            run_program(ops, operands, args, consts, value_start[j], value_start[j + 1],
                        slots, stack, m)  # fmt: skip
            for r in range(m):
                set_here = intervene[rows[first + r], j]
                slots[j, r] = values[j, r] if set_here else stack[0, r]
        for j in range(f):
            for r in range(m):
                activations[1, j, r] = slots[j, r]
        _layers(network, activations, m, threshold, gaps[first : first + m])


@numba.njit(**_JIT)
def _row_gaps(network, x, threshold, gaps):
    """:func:`row_gaps` into ``gaps``, a block of rows at a time."""
    activations = np.empty((2, network[2].max(), BLOCK), dtype=np.float32)
    for first in range(0, len(x), BLOCK):
        m = min(BLOCK, len(x) - first)
        for j in range(x.shape[1]):
            for r in range(m):
                activations[1, j, r] = x[first + r, j]
        _layers(network, activations, m, threshold, gaps[first : first + m])


@numba.njit(**_JIT)
def _layers(network, activations, m, threshold, gaps):
    """The classifier on the first ``m`` columns of ``activations[1]`` (one row per
    input), ReLU between layers, layer l writing ``activations[l % 2]``; ``gaps``: the
    logits minus ``threshold``. The loops run along the rows, 8 float32 lanes at once."""
    weights, biases, widths = network
    last = len(widths) - 2
    for layer in range(last + 1):
        source, target = activations[(layer + 1) % 2], activations[layer % 2]
        for o in range(widths[layer + 1]):
            bias = biases[layer, o]
            for r in range(m):
                target[o, r] = bias
        for i in range(widths[layer]):
            for o in range(widths[layer + 1]):
                weight = weights[layer, i, o]
                for r in range(m):
                    target[o, r] += source[i, r] * weight
        if layer < last:
            for o in range(widths[layer + 1]):
                for r in range(m):
                    target[o, r] = max(target[o, r], np.float32(0.0))
    logits = activations[last % 2]
    for r in range(m):
        gaps[r] = np.float64(logits[0, r]) - threshold
