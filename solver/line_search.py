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

Large batches search many lines in rounds, each round one evaluation of every line still
moving: the rounds of extending the secant (:func:`extrapolate`) and of regula falsi
(:func:`refine_brackets`) are compiled here, with the evaluation they call
(:func:`line_gaps`: gather, projection, propagation of the features an action can reach,
and the classifier in float32, a block of rows at a time, each layer one matrix product).

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
EXTRAPOLATIONS = 8
"""Steps of the secant past a rejected proposal before scanning."""
EXTRAPOLATION_AIM = 0.05
"""Relative step past the extended secant's root: the logit flattens along most lines (an
effect that saturates, a feature reaching its interval end), where aiming at the root
lands short step after step, and an integer feature needs a step to its next value."""
SECANT_AIM = 5e-4
"""Relative step past the secant's root, so that a linear piece lands on the accepted side."""
SECANT_TOLERANCE = 2e-3
"""A bracket is final once the next step would shrink the accepted scale by less than this."""
REFINEMENTS = 24
"""Most evaluations refining one bracket (integer features make the logit a staircase,
where the secant alone can stall; every third step bisects)."""
SECANT_ROUNDS = 6
"""Large batches: most refinements of a bracket by the secant of its logits (regula
falsi, one evaluation a round for all brackets)."""


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
    downstream: BoolArray
    """Per feature whether it has an actionable ancestor: the others keep their factual
    values under any action, which the large-batch search reads instead of running their
    equations."""

    @functools.cached_property
    def network32(
        self,
    ) -> tuple[npt.NDArray[np.float32], IntArray, npt.NDArray[np.float32], IntArray]:
        """The layers in float32 for the large-batch search, where BLAS multiplies a block
        of rows at a time: layer l's ``outputs x inputs`` weights, C-ordered, at
        ``flat[offsets[l]:offsets[l + 1]]``; its biases in ``biases[l]``; the widths."""
        blocks = [
            self.weights[layer, : self.widths[layer], : self.widths[layer + 1]].T.ravel()
            for layer in range(len(self.widths) - 1)
        ]
        offsets = np.cumsum([0] + [len(block) for block in blocks]).astype(np.int64)
        flat = np.concatenate(blocks).astype(np.float32)
        return flat, offsets, self.biases.astype(np.float32), self.widths

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
            scm.ancestor_matrix()[:, scm.actionable_columns].any(axis=1),
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
            rise = (near_gap - far_gap) / (1.0 + EXTRAPOLATION_AIM)
            guess = near - near_gap * (near - far) / rise
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


class Lines(NamedTuple):
    """The rows of a large-batch line search, as its kernels read them."""

    table: FloatArray
    """Per line row its factual row, noise, start, step, lower and upper ends side by side
    (the values at scale t: ``start + t step``, projected)."""
    intervene: BoolArray
    """Per line row the features set."""
    columns: IntArray
    """The actionable features' columns."""
    integer: BoolArray
    """Which actionable features take whole numbers."""
    threshold: float
    """Accepted where the float32 logit is at least this."""


def _kernel_arguments(model: SearchModel, lines: Lines) -> tuple:
    """The leading arguments of :func:`_line_gaps` and the kernels that call it."""
    program = model.program
    return (program.value_code, program.depth, model.downstream, model.network32, *lines)


def line_gaps(model: SearchModel, lines: Lines, rows: IntArray, t: FloatArray) -> FloatArray:
    """The large-batch search's evaluation: line row ``rows[i]`` at scale ``t[i]``, its
    values projected (clipped, whole where required), through the causal model and the
    classifier in float32: its logit minus the threshold (>= 0: accepted)."""
    gaps = np.empty(len(rows))
    _line_gaps(*_kernel_arguments(model, lines), rows, t, gaps)
    return gaps


def extrapolate(
    model: SearchModel,
    lines: Lines,
    rows: IntArray,
    secant: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
    sign: FloatArray,
    bracket: tuple[FloatArray, FloatArray, FloatArray, FloatArray, BoolArray],
) -> BoolArray:
    """The large-batch secant extension, on line rows ``rows`` (rejected so far, the logit
    rising in direction ``sign``): up to :data:`EXTRAPOLATIONS` steps past the root of the
    secant through the last two rejected sizes (``secant``: ``near``, ``near_gap``, ``far``,
    ``far_gap``, the later first), each row's step one evaluation of a call per round. A
    row accepted gets its ``bracket`` (``lo``, ``lo_gap``, ``hi``, ``hi_gap``, ``found``;
    all updated in place, as ``secant``). Returns per line row whether the direction is
    exhausted: rejected where every moving feature sits at its interval end."""
    exhausted = np.zeros(len(lines.table), dtype=bool)
    _extrapolate(*_kernel_arguments(model, lines), rows, *secant, sign, *bracket, exhausted)
    return exhausted


@numba.njit(**_JIT)
def _extrapolate(
    value_code, depth, downstream, network, table, intervene, columns, integer, threshold,
    rows, near, near_gap, far, far_gap, sign, lo, lo_gap, hi, hi_gap, found, exhausted,
):  # fmt: skip
    f, k = intervene.shape[1], len(columns)
    live = rows.copy()  # the rows still rising, compacted each round
    count = len(live)
    reach = np.empty(len(near))
    for i in live:
        reach[i] = _reach(table, i, sign[i], f, k)
    guesses, probe_t, gaps = np.empty(count), np.empty(count), np.empty(count)
    for _ in range(EXTRAPOLATIONS):
        moving = 0
        for j in range(count):
            i = live[j]
            p, gp = near[i], near_gap[i]
            guess = min(p - gp * (p - far[i]) / (gp - far_gap[i]) * (1.0 + EXTRAPOLATION_AIM),
                        reach[i])  # fmt: skip
            if guess <= p:
                exhausted[i] = True
            elif guess <= SCAN_SCALES[-1]:
                live[moving], guesses[moving], probe_t[moving] = i, guess, sign[i] * guess
                moving += 1
        count = moving
        if count == 0:
            return
        _line_gaps(
            value_code, depth, downstream, network, table, intervene, columns, integer,
            threshold, live[:count], probe_t[:count], gaps[:count],
        )  # fmt: skip
        moving = 0
        for j in range(count):
            i, guess, gap = live[j], guesses[j], gaps[j]
            if gap >= 0.0:
                found[i] = True
                lo[i], lo_gap[i], hi[i], hi_gap[i] = near[i], near_gap[i], guess, gap
            elif guess >= reach[i]:
                exhausted[i] = True
            elif gap > near_gap[i]:
                far[i], far_gap[i] = near[i], near_gap[i]
                near[i], near_gap[i] = guess, gap
                live[moving] = i
                moving += 1
        count = moving


@numba.njit(inline="always", **_JIT)
def _reach(table, row, sign, f, k):
    """The scale in direction ``sign`` from which every moving feature of line row ``row``
    sits at its interval end, so that its counterfactual no longer changes (inf where a
    feature never gets there)."""
    scale = 0.0
    for c in range(k):
        d = table[row, 2 * f + k + c] * sign
        if d != 0.0:
            end = table[row, 2 * f + 3 * k + c] if d > 0.0 else table[row, 2 * f + 2 * k + c]
            scale = max(scale, (end - table[row, 2 * f + c]) / d)
    return scale


def refine_brackets(
    model: SearchModel,
    lines: Lines,
    bracket: tuple[FloatArray, FloatArray, FloatArray, FloatArray, BoolArray],
    sign: FloatArray,
    rows: IntArray,
) -> FloatArray:
    """The large-batch refinement: per bracket (``lo``, ``lo_gap``, ``hi``, ``hi_gap``,
    ``found``: on line row ``rows[i]`` in direction ``sign[i]``, a size rejected and one
    accepted, with their gaps), the smallest accepted size regula falsi finds in
    :data:`SECANT_ROUNDS` rounds of one evaluation each (inf where none was found), every
    moving bracket's evaluation in one call per round."""
    lo, lo_gap, hi, hi_gap, found = (np.array(a) for a in bracket)  # copies, moved in place
    size = np.full(len(lo), np.inf)
    _refine_brackets(
        *_kernel_arguments(model, lines), lo, lo_gap, hi, hi_gap, found, sign, rows, size
    )
    return size


@numba.njit(**_JIT)
def _refine_brackets(
    value_code, depth, downstream, network, table, intervene, columns, integer, threshold,
    lo, lo_gap, hi, hi_gap, found, sign, rows, size,
):  # fmt: skip
    live = np.flatnonzero(found)  # the brackets still moving, compacted each round
    count = len(live)
    moved = np.zeros(len(lo), dtype=np.int8)  # 1: hi moved last, -1: lo moved last
    probe_rows, probe_t = np.empty(count, dtype=np.int64), np.empty(count)
    aims, gaps = np.empty(count), np.empty(count)
    for _ in range(SECANT_ROUNDS):
        moving = 0
        for j in range(count):
            i = live[j]
            size[i] = hi[i]
            aim = _secant_root(lo[i], lo_gap[i], hi[i], hi_gap[i]) * (1.0 + SECANT_AIM)
            if aim < hi[i] * (1.0 - SECANT_TOLERANCE):
                live[moving] = i
                aims[moving] = min(max(aim, lo[i]), hi[i])
                probe_rows[moving], probe_t[moving] = rows[i], sign[i] * aims[moving]
                moving += 1
        count = moving
        if count == 0:
            return
        _line_gaps(
            value_code, depth, downstream, network, table, intervene, columns, integer,
            threshold, probe_rows[:count], probe_t[:count], gaps[:count],
        )  # fmt: skip
        for j in range(count):
            i, u, gap = live[j], aims[j], gaps[j]
            hi_moves = gap >= 0.0
            lo_moves = not hi_moves and lo[i] < u < hi[i]
            # Illinois: an end that stays twice has its gap halved, against one-sided
            # convergence where the logit bends.
            one_sided = hi_moves != lo_moves
            if lo_moves:
                lo[i], lo_gap[i] = u, gap
            elif one_sided and moved[i] == 1:
                lo_gap[i] *= 0.5
            if hi_moves:
                hi[i], hi_gap[i] = u, gap
            elif one_sided and moved[i] == -1:
                hi_gap[i] *= 0.5
            moved[i] = (1 if hi_moves else -1) if one_sided else 0
    for j in range(count):
        size[live[j]] = hi[live[j]]


def cheapest_rows(cost: FloatArray, owner: IntArray) -> IntArray:
    """Per owner (ascending) with a finite cost, its row of the least cost (of equal
    costs, the first)."""
    best = np.full(owner.max(initial=-1) + 1, -1, dtype=np.int64)
    _cheapest_rows(cost, owner, best)
    return best[best >= 0]


@numba.njit(**_JIT)
def _cheapest_rows(cost, owner, best):
    for row in range(len(cost)):
        if np.isfinite(cost[row]) and (best[owner[row]] < 0 or cost[row] < cost[best[owner[row]]]):
            best[owner[row]] = row


def row_gaps(model: SearchModel, x: FloatArray, threshold: float) -> FloatArray:
    """The classifier's float32 logit of rows ``x`` minus ``threshold``, as
    :func:`line_gaps` computes it."""
    gaps = np.empty(len(x))
    _row_gaps(model.network32, np.ascontiguousarray(x, dtype=float), threshold, gaps)
    return gaps


@numba.njit(**_JIT)
def _line_gaps(
    value_code, depth, downstream, network, table, intervene, columns, integer, threshold,
    rows, t, gaps,
):  # fmt: skip
    """:func:`line_gaps` into ``gaps``: gather, projection, propagation and the layers
    fused, a block of rows at a time (the interpreter of :mod:`models.programs`)."""
    ops, operands, args, consts, value_start = value_code
    f, k = intervene.shape[1], len(columns)
    slots = np.empty((2 * f, BLOCK))
    stack = np.empty((depth, BLOCK))
    values = np.empty((f, BLOCK))
    inputs = np.zeros((f, BLOCK), dtype=np.float32)  # zeros: BLAS reads whole blocks
    for first in range(0, len(rows), BLOCK):
        m = min(BLOCK, len(rows) - first)
        for r in range(m):
            row = rows[first + r]
            for j in range(f):  # the factual value where no action reaches, else the noise
                slots[j if not downstream[j] else f + j, r] = table[row, j + f * downstream[j]]
            for c in range(k):
                start, step = table[row, 2 * f + c], table[row, 2 * f + k + c]
                lower, upper = table[row, 2 * f + 2 * k + c], table[row, 2 * f + 3 * k + c]
                values[columns[c], r] = _projected(start + t[first + r] * step, lower, upper,
                                                   integer[c])  # fmt: skip
        for j in range(f):
            if downstream[j]:
                run_program(ops, operands, args, consts, value_start[j], value_start[j + 1],
                            slots, stack, m)  # fmt: skip
            for r in range(m):
                if intervene[rows[first + r], j]:
                    slots[j, r] = values[j, r]
                elif downstream[j]:
                    slots[j, r] = stack[0, r]
        for j in range(f):
            for r in range(m):
                inputs[j, r] = slots[j, r]
        _layers(network, inputs, m, threshold, gaps[first : first + m])


@numba.njit(**_JIT)
def _row_gaps(network, x, threshold, gaps):
    """:func:`row_gaps` into ``gaps``, a block of rows at a time."""
    inputs = np.zeros((x.shape[1], BLOCK), dtype=np.float32)
    for first in range(0, len(x), BLOCK):
        m = min(BLOCK, len(x) - first)
        for j in range(x.shape[1]):
            for r in range(m):
                inputs[j, r] = x[first + r, j]
        _layers(network, inputs, m, threshold, gaps[first : first + m])


@numba.njit(**_JIT)
def _layers(network, inputs, m, threshold, gaps):
    """The classifier on the first ``m`` columns of ``inputs`` (one row per input), ReLU
    between layers; ``gaps``: the logits minus ``threshold``. Each layer is one matrix
    product over the whole block."""
    flat, offsets, biases, widths = network
    last = len(widths) - 2
    activations = inputs
    for layer in range(last + 1):
        n_in, n_out = widths[layer], widths[layer + 1]
        weights = flat[offsets[layer] : offsets[layer + 1]].reshape((n_out, n_in))
        activations = np.dot(weights, activations)
        for o in range(n_out):
            bias = biases[layer, o]
            if layer < last:
                for r in range(m):
                    activations[o, r] = max(activations[o, r] + bias, np.float32(0.0))
            else:
                for r in range(m):
                    activations[o, r] += bias
    for r in range(m):
        gaps[r] = np.float64(activations[0, r]) - threshold
