"""Amortized recourse: the network proposes, a line search calibrates, everything is verified.

For a batch of people (:meth:`AmortizedSolver.predict`, no Python loop over people):

1. the network (:mod:`models.amortizer`) proposes, for each of the person's best action
   patterns, a mask and values that obey every hard constraint by construction;
2. a line search scales each proposed change, ``x + t (proposal - x)`` clipped into the
   person's interval, to the smallest ``|t|`` (either direction) whose counterfactual the
   classifier accepts: the distilled values sit on the decision boundary, where half of
   any regression's answers would fall short. Small batches search each line in compiled
   code (:mod:`solver.line_search`: the secant from the proposal, a scan where that
   brackets nothing, then regula falsi);
   large ones, vectorized in float32, start from the proposal and its reverse
   (``t = 1, -1``) and extend the secant through ``t = 0`` and the rising side, with a
   grid only for the rows still unbracketed. Regula falsi on the classifier's logit then
   narrows the bracket (exact in one step on a linear piece of the logit along the line);
3. each answer is re-simulated through the exact causal model and classifier (float64)
   and every hard constraint is re-checked (:func:`solver.verify.verify_actions`); the
   cheapest verified pattern is kept;
4. an answer changing two features also tries its corners (one feature at its interval
   end or unchanged, the other line-searched), verified the same way.

Small batches, where a numpy call costs more than its rows, do steps 2 to 4 in as few
calls as they can: one compiled call (:func:`solver.line_search.small_batch`) builds every
candidate's line and, where it changes two features, its corners from the start, searches
them and keeps each person's cheapest accepted answer, and one call of
:func:`~solver.verify.verify_actions` checks those.

:meth:`AmortizedSolver.solve` then repairs every person whose answer failed: first with
the exact MILP restricted to the predicted features (the other features locked), then
with the full MILP. Each result says which path answered (``answered_by``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

from instances import DATASETS, load_classifier, load_scm
from models.amortizer import (
    CHANGE,
    HOLD,
    MAX_ACTIONABLE,
    NOT_ACTED,
    Amortizer,
    AmortizerFileError,
    AmortizerSpec,
    Hyperparameters,
    TrainingTargets,
    allowed_patterns,
    encode_inputs,
    pattern_index,
    project_values,
    train_network,
)
from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import ConstraintArrays, PersonConstraints, parse_constraints
from models.scm import StructuralCausalModel, VariableType
from solver.engine import EngineOptions, RecourseSolver
from solver.labels import package_version
from solver.line_search import (
    Lines,
    SearchModel,
    SmallBatchTables,
    cheapest_rows,
    extrapolate,
    line_gaps,
    refine_brackets,
    row_gaps,
    small_batch,
)
from solver.milp import SolveStatus
from solver.result import RecourseResult, SolverInfo
from solver.verify import verify_actions

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _by_size(scales: list[float]) -> FloatArray:
    """Scales in the order the line search tries them: smallest change first, and the
    proposed direction before the reversed one at equal size."""
    return np.array(sorted(scales, key=lambda t: (abs(t), t < 0)), dtype=float)


GRID_REACH = 30.0
LARGE_STAGES = (
    _by_size([0.9, 1.15, 1.6, 2.2, GRID_REACH, -0.5, -1.2, -32]),
    _by_size([3.2, 5, 8, 15, -2.4, -4, -8, -16]),
)
"""The grid of large batches: the second stage only for rows accepted at the first's
extremes (at least :data:`GRID_REACH` either way) and nowhere nearer. A row rejected even
there is taken as out of reach (on the held-out Loan and GSMC people of every scheme,
validity and cost figures are the same as with the intermediate scales tried)."""
THREADED_PEOPLE = 8192
"""Batches of at least this many people are split over threads (see :meth:`predict`).
Measured on Loan and GSMC with two cores: two threads pay from about 8,000 people; below,
handing the GIL back and forth between numpy's short calls costs more than they save."""
SMALL_BATCH = 32
"""Batches of at most this many people take the small-batch path (the compiled search,
every candidate's corners from the start); larger ones the vectorized float32 search.
The two cost the same per person at 25-35 people on Loan and GSMC."""
CANDIDATE_PATTERNS = 4
"""Action patterns tried at once, best first; the cheapest verified answer is kept."""
OTHER_PATTERN_CHANCE = 0.01
"""The second to last candidate patterns are tried where the network's probability of
them is at least this."""
MAX_PATTERNS = 6
"""Patterns tried in all, next best first, for a person with no verified answer yet."""
FLOAT32_MARGIN = 1e-3
"""Logit margin of the float32 line search, above float32 rounding of the logit."""
INVALID_RATIO = 2.0
"""Validation score of a person whose raw answer is invalid (a valid one scores its cost
ratio to the exact optimum): hyperparameters are chosen by the mean."""
VALIDATION_SHARE = 0.2
HYPERPARAMETER_GRID = (
    Hyperparameters(hidden=(64,), weight_decay=1e-3, ensemble=8),
    Hyperparameters(hidden=(64,), weight_decay=1e-4, ensemble=8),
)
"""Ensembles of one hidden layer: on GSMC's held-out mixed people, eight averaged
networks choose the optimal features more often than one of any size or depth tried, and
merged they cost one 512-unit layer (see the RESULTS amortizer-training section)."""


class AmortizerMismatchError(AmortizerFileError):
    """An amortizer used with another causal model, classifier or cost than it learned."""


@dataclass(frozen=True, eq=False)
class AmortizedBatch:
    """The verified raw answers for a batch (row i: person i)."""

    intervene: BoolArray
    """(n, features) features set by the action."""
    values: FloatArray
    counterfactual: FloatArray
    probability: FloatArray
    cost: FloatArray
    verified: BoolArray
    seconds: float
    """Wall time of the whole batch: inputs, network, line search, verification."""

    def take(self, rows: npt.NDArray[np.int64] | BoolArray) -> AmortizedBatch:
        return AmortizedBatch(
            self.intervene[rows],
            self.values[rows],
            self.counterfactual[rows],
            self.probability[rows],
            self.cost[rows],
            self.verified[rows],
            self.seconds,
        )

    @classmethod
    def concatenate(cls, batches: Sequence[AmortizedBatch]) -> AmortizedBatch:
        """The rows of ``batches`` in order (their seconds summed)."""
        arrays = {name: np.concatenate([getattr(b, name) for b in batches]) for name in _PER_PERSON}
        return cls(**arrays, seconds=sum(b.seconds for b in batches))

    def updated(self, rows: npt.NDArray[np.int64], other: AmortizedBatch) -> AmortizedBatch:
        """This batch with ``rows`` replaced by ``other``'s rows, in order."""
        fields = {}
        for name in _PER_PERSON:
            array = getattr(self, name).copy()
            array[rows] = getattr(other, name)
            fields[name] = array
        return AmortizedBatch(**fields, seconds=self.seconds)


_PER_PERSON = ("intervene", "values", "counterfactual", "probability", "cost", "verified")
"""The fields of :class:`AmortizedBatch` with a row per person."""


class AmortizedSolver:
    """Predict recourse with an amortizer; repair what fails verification with the MILP."""

    def __init__(
        self,
        amortizer: Amortizer,
        scm: StructuralCausalModel,
        classifier: Classifier,
        *,
        exact: RecourseSolver | None = None,
        threads: int | None = None,
    ) -> None:
        spec = amortizer.spec
        check_compatible(spec, scm, classifier)
        self.amortizer, self.scm, self.classifier = amortizer, scm, classifier
        self.cost = CostProfile.for_model(spec.cost, scm, classifier, spec.sparsity)
        self.exact = exact
        self.threads = threads or _usable_cores()
        """Threads a batch of at least :data:`THREADED_PEOPLE` is split over (default:
        the cores this process may use)."""
        self.margin = EngineOptions().margin
        self.columns = spec.actionable_columns
        self._search_model = SearchModel.of(scm, classifier, self.margin)
        self._ancestor = _actionable_ancestors(scm)
        self._small_tables = SmallBatchTables(
            self.columns,
            spec.integer,
            self._ancestor,
            spec.catalogue,
            self.cost.denominators,
            self.cost.kind == "l1",
            self.cost.sparsity,
            CANDIDATE_PATTERNS,
            OTHER_PATTERN_CHANCE,
        )
        self._ancestor_of = self._ancestor.T.astype(float)  # [a, k]: a is an ancestor of k

    # -- the hot path ------------------------------------------------------------------

    def predict(self, x: FloatArray, constraints: ConstraintArrays) -> AmortizedBatch:
        """Verified raw answers for every row of ``x``: no MILP, no loop over people.

        Every person's best action pattern, and those of the next best up to
        :data:`CANDIDATE_PATTERNS` with a probability of at least
        :data:`OTHER_PATTERN_CHANCE`, are line-searched and verified together, and the
        cheapest verified answer kept; a person with none gets the patterns not yet tried,
        best first, one at a time, up to :data:`MAX_PATTERNS` in all. A person still failing
        keeps the best pattern's answer.

        A batch of at least :data:`THREADED_PEOPLE` is split into :attr:`threads` equal
        parts answered side by side: the compiled kernels, the matrix products and numpy's
        loops over many rows all release the GIL.
        """
        start = time.perf_counter()
        x = np.atleast_2d(np.asarray(x, dtype=float))
        if len(x) < THREADED_PEOPLE or self.threads == 1:
            return self._predict(x, constraints, start)
        parts = np.array_split(np.arange(len(x)), self.threads)
        with ThreadPoolExecutor(self.threads) as pool:
            answers = list(
                pool.map(lambda rows: self._predict(x[rows], constraints.take(rows)), parts)
            )
        return dataclasses.replace(
            AmortizedBatch.concatenate(answers), seconds=time.perf_counter() - start
        )

    def _predict(
        self, x: FloatArray, constraints: ConstraintArrays, start: float | None = None
    ) -> AmortizedBatch:
        """:meth:`predict` on one thread (``start``: when the call began, for its time)."""
        start = time.perf_counter() if start is None else start
        n = len(x)
        noise = self.scm.abduct_noise(x)
        scores = self.amortizer.scores(x, constraints)  # one network pass for every rank
        # The best pattern for everyone; the next ones only where the network gives them a
        # chance: where it is sure, they are rarely cheaper and cost most of the time.
        ranked, chances = scores.top(MAX_PATTERNS)
        if n <= SMALL_BATCH:  # the same rules, compiled, each candidate's corners included
            mask, values = small_batch(
                self._search_model, self._small_tables, x, noise, constraints, ranked,
                chances, scores.changed,
            )  # fmt: skip
            intervene = self._intervene(mask)
            full_values = self._full_values(x, intervene, values)
            answer = self._verified(x, noise, constraints, intervene, full_values)
            return dataclasses.replace(answer, seconds=time.perf_counter() - start)
        chances = chances.T  # rank-major, as the candidates below
        tried = np.zeros((MAX_PATTERNS, n), dtype=bool)
        tried[:CANDIDATE_PATTERNS] = chances[:CANDIDATE_PATTERNS] >= OTHER_PATTERN_CHANCE
        tried[0] = True
        ranks, person = np.nonzero(tried)  # rank-major: row i < n is person i's best
        first = _Candidates(person, ranked[person, ranks], chances[ranks, person] > 0)
        factual_gap = self._gap(x)[person]
        attempt = self._attempt(x, noise, constraints, scores.changed, first, factual_gap)
        served, found = self._cheapest_verified(attempt, person)
        # A person none of whose candidates passed keeps the best pattern's answer (its
        # row is the person's own) and tries the next patterns, one at a time.
        unserved = np.ones(n, dtype=bool)
        unserved[served] = False
        unserved = np.flatnonzero(unserved)
        answer = AmortizedBatch.concatenate([found, self._checked(attempt.take(unserved))])
        position = np.empty(n, dtype=np.int64)
        position[np.concatenate([served, unserved])] = np.arange(n)
        answer = answer.take(position)
        settled = answer.verified.copy()
        for rank in range(1, MAX_PATTERNS) if not settled.all() else ():
            failed = np.flatnonzero(~settled & ~tried[rank] & (chances[rank] > 0))
            if not failed.size:
                continue
            retry = self._attempt(
                x,
                noise,
                constraints,
                scores.changed,
                _Candidates(failed, ranked[failed, rank], chances[rank, failed] > 0),
                self._gap(x[failed]),
            )
            served, found = self._cheapest_verified(retry, np.arange(len(failed)))
            settled[failed[served]] = True
            answer = answer.updated(failed[served], found)
        answer = self._two_feature_vertices(x, noise, constraints, answer)
        return dataclasses.replace(answer, seconds=time.perf_counter() - start)

    def _corners(
        self,
        rows: npt.NDArray[np.int64],
        mask: BoolArray,
        change: FloatArray,
        current: FloatArray,
        lower: FloatArray,
        upper: FloatArray,
    ) -> tuple[npt.NDArray[np.int64], BoolArray, FloatArray, FloatArray]:
        """The corners of rows ``rows``, which change two features: one feature at its
        interval end in the direction of its change, or back at its current value; the
        other moving as before. Returns each corner's row, its mask, start and step."""
        pair = np.nonzero(change[rows])[1].reshape(-1, 2)
        of = np.repeat(rows, 4)
        fixed = pair[:, [0, 1, 0, 1]].ravel()
        moved = pair[:, [1, 0, 1, 0]].ravel()
        at_end = np.arange(len(of)) % 4 < 2  # the corners of a row: two ends, then two holds
        end = np.where(change[of, fixed] > 0, upper[of, fixed], lower[of, fixed])
        usable = ~at_end | np.isfinite(end)
        if not usable.all():
            of, fixed, moved, at_end, end = (a[usable] for a in (of, fixed, moved, at_end, end))
        corner = np.arange(len(of))
        start = current[of]
        start[corner[at_end], fixed[at_end]] = end[at_end]
        step = np.zeros_like(start)
        step[corner, moved] = change[of, moved]
        corner_mask = mask[of]
        # A feature back at its current value stays in the action only if held there
        # while an acted ancestor moves.
        corner_mask[corner, fixed] = at_end | (self._ancestor[fixed] & corner_mask).any(axis=1)
        return of, corner_mask, start, step

    def _two_feature_vertices(
        self,
        x: FloatArray,
        noise: FloatArray,
        constraints: ConstraintArrays,
        answer: AmortizedBatch,
    ) -> AmortizedBatch:
        """The verified answers that change two features, moved to the cheapest corner
        found nearby.

        The joint scaling keeps the network's split between the two changes. With a cost
        linear in each change and a boundary nearly linear over the region, the cheapest
        split is a corner: one feature at its interval end or back at its current value,
        the other scaled until accepted. The four corners are line-searched and verified;
        the cheapest verified answer is kept.
        """
        columns = self.columns
        current = x[:, columns]
        acted = answer.intervene[:, columns]
        change = np.where(acted, answer.values[:, columns] - current, 0.0)
        two = answer.verified & (np.count_nonzero(change, axis=1) == 2)
        people = np.flatnonzero(two)
        if not people.size:
            return answer
        of, mask, start, step = self._corners(
            people, acted, change, current, constraints.lower, constraints.upper
        )
        arrays = constraints.take(of)
        line = _Line(
            x[of], noise[of], self._intervene(mask), start, step, arrays.lower, arrays.upper
        )
        zero_gap = self._gaps(line, np.arange(len(of)), np.zeros(len(of)))
        t = self._line_search(line, zero_gap)
        corners = self._priced(
            line.x, line.noise, arrays, line.intervene, self._scaled(line, np.nan_to_num(t))
        )
        cheaper = ~np.isnan(t) & (corners.cost < answer.cost[of])
        served, found = self._cheapest_verified(corners, of, cheaper)
        return answer.updated(served, found)

    def _attempt(
        self,
        x: FloatArray,
        noise: FloatArray,
        constraints: ConstraintArrays,
        changed: FloatArray,
        candidates: _Candidates,
        factual_gap: FloatArray,
    ) -> _Priced:
        """Each candidate, line-searched and priced."""
        person = candidates.person
        x, noise, arrays = x[person], noise[person], constraints.take(person)
        current = x[:, self.columns]
        mask, step = self._proposed_lines(
            current, arrays.lower, arrays.upper, changed[person], candidates
        )
        line = _Line(x, noise, self._intervene(mask), current, step, arrays.lower, arrays.upper)
        t = self._line_search(line, factual_gap)
        values = self._scaled(line, np.where(np.isnan(t), 1.0, t))
        return self._priced(x, noise, arrays, line.intervene, values)

    def _proposed_lines(
        self,
        current: FloatArray,
        lower: FloatArray,
        upper: FloatArray,
        changed: FloatArray,
        candidates: _Candidates,
    ) -> tuple[BoolArray, FloatArray]:
        """The masks of the candidates' patterns (no-ops dropped) and the proposed changes
        of the actionable features from their ``current`` values."""
        mask, target = self.amortizer.propose_patterns(
            current, lower, upper, candidates.patterns, candidates.allowed, changed, whole=False
        )
        mask &= ~self._no_ops(current, mask, target)
        return mask, np.where(mask, target - current, 0.0)

    def _full_values(self, x: FloatArray, intervene: BoolArray, values: FloatArray) -> FloatArray:
        """Rows ``x`` with the actionable features set by ``intervene`` at ``values``."""
        full_values = x.copy()
        columns = self.columns
        full_values[:, columns] = np.where(intervene[:, columns], values, x[:, columns])
        return full_values

    def _priced(
        self,
        x: FloatArray,
        noise: FloatArray,
        constraints: ConstraintArrays,
        intervene: BoolArray,
        values: FloatArray,
    ) -> _Priced:
        """The actions setting the actionable features to ``values``, with their costs."""
        full_values = self._full_values(x, intervene, values)
        cost = self.cost.costs(self.scm.names, x, intervene, full_values, constraints)
        return _Priced(x, noise, constraints, intervene, full_values, cost)

    def _verified(
        self,
        x: FloatArray,
        noise: FloatArray,
        constraints: ConstraintArrays,
        intervene: BoolArray,
        values: FloatArray,
    ) -> AmortizedBatch:
        """The actions setting the features to ``values`` (every column), verified."""
        check = verify_actions(
            self.scm, self.classifier, self.cost, x, noise, constraints, intervene, values
        )
        return AmortizedBatch(
            intervene,
            values,
            check.counterfactual,
            check.probability,
            check.cost,
            check.verified & intervene.any(axis=1),
            0.0,
        )

    def _checked(self, priced: _Priced) -> AmortizedBatch:
        return self._verified(
            priced.x, priced.noise, priced.constraints, priced.intervene, priced.values
        )

    def _cheapest_verified(
        self,
        priced: _Priced,
        owner: npt.NDArray[np.int64],
        eligible: BoolArray | None = None,
    ) -> tuple[npt.NDArray[np.int64], AmortizedBatch]:
        """Per owner, the cheapest of its ``eligible`` rows (default: all) that passes
        verification (of equal costs, the first row): each owner's cheapest verified first,
        its next where that fails, so that most rows are never verified. Returns the owners
        served and their answers, in that order."""
        cost = priced.cost.copy() if eligible is None else np.where(eligible, priced.cost, np.inf)
        served, answers = [np.zeros(0, dtype=np.int64)], []
        done = np.zeros(owner.max(initial=-1) + 1, dtype=bool)
        while True:
            cheapest = cheapest_rows(cost, owner)
            if not cheapest.size:
                break
            check = self._checked(priced.take(cheapest))
            passed = check.verified
            served.append(owner[cheapest[passed]])
            answers.append(check.take(passed))
            done[served[-1]] = True
            cost[cheapest] = np.inf
            cost[done[owner]] = np.inf
        if not answers:
            return served[0], self._checked(priced.take(served[0]))
        return np.concatenate(served), AmortizedBatch.concatenate(answers)

    def _intervene(self, mask: BoolArray) -> BoolArray:
        intervene = np.zeros((len(mask), len(self.scm.names)), dtype=bool)
        intervene[:, self.columns] = mask
        return intervene

    def _no_ops(self, current: FloatArray, mask: BoolArray, values: FloatArray) -> BoolArray:
        """Acted features set to their current value with no acted ancestor: nothing to do."""
        unchanged = np.abs(values - current) <= 1e-9 * (1 + np.abs(values))
        held = np.dot(mask, self._ancestor_of) > 0
        return mask & unchanged & ~held

    def _line_search(self, line: _Line, zero_gap: FloatArray) -> FloatArray:
        """Per row, the smallest scale either way whose counterfactual is accepted (nan: none).

        For large batches (small ones: :mod:`solver.line_search`), where rows are what costs:
        a bracket from the proposal itself (:meth:`_secant_bracket`), refined by regula
        falsi on the logit: the classifier is piecewise linear along the line for a ReLU
        network and a piecewise linear causal model, so the secant is exact once both ends
        share a linear piece. Where a row has a bracket each way, both are refined and the
        smaller scale kept: the logit along a line need not be monotone.
        """
        n = len(line.x)
        bracket, sign, row_of = self._secant_bracket(line, zero_gap)
        size = refine_brackets(self._search_model, self._lines(line), bracket, sign, row_of)
        # Per line row, the smaller of its brackets' accepted scales.
        smallest = np.full(n, np.inf)
        np.minimum.at(smallest, row_of, size)
        kept = np.flatnonzero(np.isfinite(size) & (size == smallest[row_of]))
        t = np.full(n, np.nan)
        t[row_of[kept]] = sign[kept] * size[kept]
        return t

    def _secant_bracket(
        self, line: _Line, zero_gap: FloatArray
    ) -> tuple[_Bracket, FloatArray, npt.NDArray[np.int64]]:
        """Brackets from the proposal and its reverse (scales 1 and -1, one evaluation) and
        the start (0, known). The logit along the line is nearly linear, so where both are
        rejected the secant on the rising side, extended, is accepted most of the time
        (:func:`~solver.line_search.extrapolate`); the grid serves the rows still
        unbracketed, only the other way where the rising side ran into its interval ends.
        A row accepted both ways gets a bracket each way; the returned array maps brackets
        to line rows."""
        n = len(zero_gap)
        gaps = self._gaps(line, np.tile(np.arange(n), 2), np.repeat([1.0, -1.0], n))
        zero, one = np.zeros(n), np.ones(n)
        ahead = _Bracket(zero, zero_gap, one, gaps[:n], gaps[:n] >= 0)
        back = _Bracket(zero, zero_gap, one, gaps[n:], gaps[n:] >= 0)
        reverse = back.found & (~ahead.found | (back.root() < ahead.root()))
        lo, lo_gap, hi, hi_gap, found = (
            np.where(reverse, b, a) for a, b in zip(ahead, back, strict=True)
        )
        # Per row the last two rejected sizes on the rising side, the later one first.
        sign = np.where(reverse | (gaps[n:] > gaps[:n]), -1.0, 1.0)
        near, near_gap = one.copy(), np.maximum(gaps[:n], gaps[n:])
        far, far_gap = zero.copy(), zero_gap.copy()
        people = np.flatnonzero(~found & (near_gap > far_gap))
        exhausted = extrapolate(
            self._search_model, self._lines(line), people, (near, near_gap, far, far_gap),
            sign, (lo, lo_gap, hi, hi_gap, found),
        )  # fmt: skip
        rest = np.flatnonzero(~found)
        if rest.size:
            direction = np.where(exhausted[rest], -sign[rest], 0.0)
            grid, grid_sign = self._grid_bracket(line, rest, zero_gap[rest], direction)
            for whole, part in zip((lo, lo_gap, hi, hi_gap, found), grid, strict=True):
                whole[rest] = part
            sign[rest] = grid_sign
        # Accepted both ways: the other direction's bracket too, as an extra row.
        both = np.flatnonzero(ahead.found & back.found)
        other = _Bracket(*(np.where(reverse, a, b)[both] for a, b in zip(ahead, back, strict=True)))
        bracket = _Bracket(
            *(
                np.concatenate([whole, extra])
                for whole, extra in zip((lo, lo_gap, hi, hi_gap, found), other, strict=True)
            )
        )
        sign = np.concatenate([sign, -sign[both]])
        return bracket, sign, np.concatenate([np.arange(n), both])

    def _grid_bracket(
        self,
        line: _Line,
        rows: npt.NDArray[np.int64],
        zero_gap: FloatArray,
        direction: FloatArray,
    ) -> tuple[_Bracket, FloatArray]:
        """Brackets of line rows ``rows`` from the grid of :data:`LARGE_STAGES`, in the
        direction whose secant root is nearer 0 (per row ``direction`` 1 or -1: that way
        only, 0: both)."""
        scales, gaps = self._staged_gaps(line, rows, direction)
        ahead = _Bracket.of(scales, gaps, zero_gap, 1.0)
        back = _Bracket.of(scales, gaps, zero_gap, -1.0)
        reverse = back.found & (~ahead.found | (back.root() < ahead.root()))
        bracket = _Bracket(*(np.where(reverse, b, a) for a, b in zip(ahead, back, strict=True)))
        return bracket, np.where(reverse, -1.0, 1.0)

    def _staged_gaps(
        self, line: _Line, rows: npt.NDArray[np.int64], direction: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """The scales of :data:`LARGE_STAGES` by size and, per row, the logit gaps at them
        (nan where a stage or a ``direction`` was skipped)."""
        n = len(rows)
        scales = np.concatenate(LARGE_STAGES)
        gaps = np.full((n, len(scales)), np.nan)
        pending = np.ones(n, dtype=bool)
        offset = 0
        for stage in LARGE_STAGES:
            people = np.flatnonzero(pending)
            if not people.size:
                break
            wanted = (direction[people] == 0) | (direction[people] == np.sign(stage)[:, None])
            scale_of, person_of = np.nonzero(wanted)
            stage_gaps = np.full((len(stage), len(people)), np.nan)
            stage_gaps[wanted] = self._gaps(line, rows[people[person_of]], stage[scale_of])
            stage_gaps = stage_gaps.T
            gaps[people, offset : offset + len(stage)] = stage_gaps
            accepted = stage_gaps >= 0
            extreme = np.abs(stage) >= GRID_REACH
            pending[people] = accepted[:, extreme].any(axis=1) & ~accepted[:, ~extreme].any(axis=1)
            offset += len(stage)
        order = np.lexsort((scales < 0, np.abs(scales)))  # by size, as within a stage
        return scales[order], gaps[:, order]

    def _scaled(self, line: _Line, t: FloatArray) -> FloatArray:
        """The values of every line row at scales ``t``, projected."""
        values = line.start + t[:, None] * line.step
        return project_values(self.amortizer.spec, values, line.lower, line.upper)

    def _gaps(self, line: _Line, rows: npt.NDArray[np.int64], t: FloatArray) -> FloatArray:
        """:meth:`_gap` of line row ``rows[i]`` at scale ``t[i]``."""
        return line_gaps(self._search_model, self._lines(line), rows, t)

    def _lines(self, line: _Line) -> Lines:
        return Lines(
            line.table,
            line.intervene,
            self.columns,
            self.amortizer.spec.integer,
            self._search_model.threshold + FLOAT32_MARGIN,
        )

    def _gap(self, rows: FloatArray) -> FloatArray:
        """The classifier's float32 logit minus the acceptance threshold (>= 0: accepted),
        with a margin above its rounding: the answers are verified in float64."""
        return row_gaps(self._search_model, rows, self._search_model.threshold + FLOAT32_MARGIN)

    # -- answers with repair -----------------------------------------------------------

    def solve(
        self, x: FloatArray, constraints: Sequence[PersonConstraints]
    ) -> list[RecourseResult]:
        """One verified answer per person: the network's, else a repair's (see module doc)."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        arrays = ConstraintArrays.from_constraints(self.scm, x, constraints)
        batch = self.predict(x, arrays)
        each = batch.seconds / max(len(x), 1)
        factual = self.classifier.probability(x)
        results = []
        for i, person in enumerate(constraints):
            if batch.verified[i]:
                results.append(self._amortized_result(x[i], person, batch, i, each, factual[i]))
            elif factual[i] >= self.classifier.threshold:
                results.append(self._exact().solve(x[i], person))  # nothing to repair
            else:
                results.append(self._repaired(x[i], person, batch.intervene[i], each))
        return results

    def _exact(self) -> RecourseSolver:
        if self.exact is None:
            raise ValueError("Repairs need the exact solver: pass exact=RecourseSolver(...).")
        return self.exact

    def _amortized_result(
        self,
        x: FloatArray,
        person: PersonConstraints,
        batch: AmortizedBatch,
        i: int,
        each: float,
        factual_probability: float,
    ) -> RecourseResult:
        scm = self.scm
        acted = np.flatnonzero(batch.intervene[i])
        return RecourseResult(
            status=SolveStatus.FEASIBLE,
            factual=scm.named(x),
            action={scm.names[k]: float(batch.values[i, k]) for k in acted},
            counterfactual=scm.named(batch.counterfactual[i]),
            cost=float(batch.cost[i]),
            probability=float(batch.probability[i]),
            factual_probability=float(factual_probability),
            verified=True,
            verification_failures=(),
            solver=SolverInfo("amortizer", package_version(), each, 0.0, None, 0),
            message="amortized answer: verified, not proven optimal",
            constraints=person.to_dict(),
            answered_by="amortizer",
        )

    def _repaired(
        self, x: FloatArray, person: PersonConstraints, intervene: BoolArray, each: float
    ) -> RecourseResult:
        exact = self._exact()
        predicted = {self.scm.names[k] for k in np.flatnonzero(intervene)}
        if predicted:
            # The exact problem on the predicted features only: a cheap, small MILP.
            others = set(self.scm.actionable) - predicted
            restricted = dataclasses.replace(person, locks=person.locks | others)
            result = exact.solve(x, restricted)
            if result.verified and result.status is SolveStatus.OPTIMAL:
                return dataclasses.replace(
                    result,
                    status=SolveStatus.FEASIBLE,
                    constraints=person.to_dict(),
                    message="repaired: exact optimum over the predicted features only",
                    answered_by="mask-repair",
                    solver=_plus_seconds(result.solver, each),
                )
        result = exact.solve(x, person)
        return dataclasses.replace(
            result, answered_by="milp-repair", solver=_plus_seconds(result.solver, each)
        )


def check_compatible(
    spec: AmortizerSpec, scm: StructuralCausalModel, classifier: Classifier
) -> None:
    """Refuse an amortizer trained on another causal model or classifier (content hashes)."""
    for what, expected, actual in (
        ("causal model", spec.scm_hash, scm.content_hash()),
        ("classifier", spec.classifier_hash, classifier.content_hash()),
    ):
        if expected != actual:
            raise AmortizerMismatchError(
                f"This amortizer was trained for another {what} (content hash {expected[:12]}, "
                f"this one's is {actual[:12]}): retrain it with 'recourse train' on labels "
                f"of this {what}."
            )
    if tuple(spec.feature_names) != scm.names or tuple(spec.actionable) != scm.actionable:
        raise AmortizerMismatchError(
            f"This amortizer's features {list(spec.feature_names)} (actionable "
            f"{list(spec.actionable)}) are not the causal model's."
        )


class _Candidates(NamedTuple):
    """Action patterns to try: each one's person (row of the batch) and pattern."""

    person: npt.NDArray[np.int64]
    patterns: npt.NDArray[np.int64]
    allowed: BoolArray
    """Whether the pattern is allowed (else an empty mask)."""


class _Priced(NamedTuple):
    """Candidate actions before verification, a row each: the person's factual row, noise
    and constraints, the features set and their values (every column), and the cost."""

    x: FloatArray
    noise: FloatArray
    constraints: ConstraintArrays
    intervene: BoolArray
    values: FloatArray
    cost: FloatArray

    def take(self, rows: npt.NDArray[np.int64] | BoolArray) -> _Priced:
        return _Priced(
            self.x[rows],
            self.noise[rows],
            self.constraints.take(rows),
            self.intervene[rows],
            self.values[rows],
            self.cost[rows],
        )


@dataclass(frozen=True, eq=False)
class _Line:
    """The rows of a line search: values ``start + t step`` of the actionable features,
    projected into ``[lower, upper]``, set by the intervention ``intervene``."""

    x: FloatArray
    noise: FloatArray
    intervene: BoolArray
    start: FloatArray
    step: FloatArray
    lower: FloatArray
    upper: FloatArray
    table: FloatArray = field(init=False, repr=False)
    """The float fields side by side, so that an evaluation gathers its rows once."""

    def __post_init__(self) -> None:
        parts = (self.x, self.noise, self.start, self.step, self.lower, self.upper)
        object.__setattr__(self, "table", np.hstack(parts))


class _Bracket(NamedTuple):
    """Per row, scales (sizes, one direction) rejected at ``lo`` and accepted at ``hi``,
    with their logit gaps."""

    lo: FloatArray
    lo_gap: FloatArray
    hi: FloatArray
    hi_gap: FloatArray
    found: BoolArray

    @classmethod
    def of(
        cls, scales: FloatArray, gaps: FloatArray, zero_gap: FloatArray, sign: float
    ) -> _Bracket:
        """The first accepted scale of direction ``sign`` and the one before it (or 0)."""
        columns = np.flatnonzero(np.sign(scales) == sign)
        size = np.abs(scales[columns])
        side = gaps[:, columns]
        accepted = side >= 0
        first = np.argmax(accepted, axis=1)
        rows = np.arange(len(gaps))
        before = np.maximum(first - 1, 0)
        after_first = first > 0
        return cls(
            np.where(after_first, size[before], 0.0),
            np.where(after_first, side[rows, before], zero_gap),
            size[first],
            side[rows, first],
            accepted.any(axis=1),
        )

    def root(self) -> FloatArray:
        """Where the secant through both ends crosses the threshold (inf: no bracket)."""
        root = _secant_root(self.lo, self.lo_gap, self.hi, self.hi_gap)
        return np.where(self.found, root, np.inf)


def _secant_root(
    lo: FloatArray, lo_gap: FloatArray, hi: FloatArray, hi_gap: FloatArray
) -> FloatArray:
    """Where the chord through (lo, lo_gap) and (hi, hi_gap) crosses 0, within [lo, hi]."""
    rise = hi_gap - lo_gap
    rising = rise > 0
    share = np.where(
        rising, np.minimum(np.maximum(-lo_gap / np.where(rising, rise, 1.0), 0.0), 1.0), 1.0
    )
    return lo + share * (hi - lo)


def _actionable_ancestors(scm: StructuralCausalModel) -> BoolArray:
    """(K, K): entry [k, a] is true when actionable feature a is an ancestor of k; a
    feature with any such ancestor can be held (kept at its value while they move)."""
    columns = scm.actionable_columns
    return scm.ancestor_matrix()[np.ix_(columns, columns)]


def _usable_cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _plus_seconds(info: SolverInfo, seconds: float) -> SolverInfo:
    return dataclasses.replace(info, runtime_seconds=info.runtime_seconds + seconds)


# -- training from labels ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LabelData:
    """The exactly solved people of a label table, as arrays."""

    scm: StructuralCausalModel
    classifier: Classifier
    metadata: dict[str, str]
    person_id: npt.NDArray[np.int64]
    x: FloatArray
    people: list[PersonConstraints]
    constraints: ConstraintArrays
    """``people`` as arrays."""
    mask: BoolArray
    """(n, K) the optimal action's features."""
    values: FloatArray
    """(n, K) the optimal values (the current value where not acted on)."""
    cost: FloatArray


def read_labels(path: Path) -> LabelData:
    """The optimal, verified, non-empty answers of a ``recourse label`` table."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise AmortizerFileError(f"The label table {path} cannot be read: {exc}.") from None
    raw_metadata = parquet.schema_arrow.metadata or {}
    metadata = {k.decode(): v.decode() for k, v in raw_metadata.items()}
    missing = [
        k for k in ("dataset", "classifier", "cost_profile", "scm_hash") if k not in metadata
    ]
    if missing:
        raise AmortizerFileError(
            f"{path} is not a table written by 'recourse label': its metadata lacks {missing}."
        )
    if metadata["dataset"] not in DATASETS:
        raise AmortizerFileError(
            f"The labels' dataset must be one of {list(DATASETS)}. Got {metadata['dataset']!r}."
        )
    scm = load_scm(metadata["dataset"])
    classifier = load_classifier(metadata["dataset"], metadata["classifier"])
    for what, key, actual in (
        ("causal model", "scm_hash", scm.content_hash()),
        ("classifier", "classifier_hash", classifier.content_hash()),
    ):
        if metadata.get(key) != actual:
            raise AmortizerMismatchError(
                f"The labels in {path} were made with another {what} than the installed "
                f"{metadata['dataset']!r} one (content hashes differ): label again."
            )
    table = parquet.read().to_pandas()
    actionable = scm.actionable
    acted = table[[f"action_mask.{n}" for n in actionable]].to_numpy(dtype=bool)
    keep = (
        (table["status"] == SolveStatus.OPTIMAL.value).to_numpy()
        & table["verified"].to_numpy(dtype=bool)
        & acted.any(axis=1)
    )
    table, acted = table[keep], acted[keep]
    x = table[[f"factual.{n}" for n in scm.names]].to_numpy(dtype=float)
    people = [
        parse_constraints(json.loads(raw), scm, who=f"person {pid}")
        for raw, pid in zip(table["constraints"], table["person_id"], strict=True)
    ]
    columns = [scm.index[n] for n in actionable]
    chosen = table[[f"action_value.{n}" for n in actionable]].to_numpy(dtype=float)
    values = np.where(acted, chosen, x[:, columns])
    return LabelData(
        scm,
        classifier,
        metadata,
        table["person_id"].to_numpy(dtype=np.int64),
        x,
        people,
        ConstraintArrays.from_constraints(scm, x, people),
        acted,
        values,
        table["cost"].to_numpy(dtype=float),
    )


def train_amortizer(
    labels: LabelData,
    *,
    constraint_inputs: bool = True,
    seed: int = 0,
    grid: Sequence[Hyperparameters] = HYPERPARAMETER_GRID,
    label_file: str = "",
) -> tuple[Amortizer, dict[str, Any]]:
    """Train one network per hyperparameter setting; keep the best on a validation split.

    The split is by person (:data:`VALIDATION_SHARE`, seeded); the score is the mean cost
    ratio to the exact optimum of the verified raw answers, with :data:`INVALID_RATIO` for
    an invalid one (see :meth:`AmortizedSolver.predict`).
    """
    scm, classifier = labels.scm, labels.classifier
    if len(scm.actionable) > MAX_ACTIONABLE:
        raise AmortizerFileError(
            f"The amortizer enumerates action patterns: at most {MAX_ACTIONABLE} actionable "
            f"features. The model has {len(scm.actionable)}."
        )
    if len(labels.x) < 20:
        raise AmortizerFileError(
            f"Too few solved people to train on: {len(labels.x)} (at least 20 are needed)."
        )
    metadata = labels.metadata
    columns = [scm.index[n] for n in scm.actionable]
    integer = np.array(
        [scm.variables[j].type is not VariableType.CONTINUOUS for j in columns], dtype=bool
    )
    spec = AmortizerSpec(
        dataset=metadata["dataset"],
        classifier=metadata["classifier"],
        cost=metadata["cost_profile"],
        sparsity=0.0,
        scm_hash=metadata["scm_hash"],
        classifier_hash=metadata["classifier_hash"],
        feature_names=scm.names,
        actionable=scm.actionable,
        mean=np.asarray(classifier.mean, dtype=float),
        scale=np.asarray(classifier.scale, dtype=float),
        integer=integer,
        holdable=_actionable_ancestors(scm).any(axis=1),
        constraint_inputs=constraint_inputs,
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels.x))
    cut = int(round(len(order) * (1 - VALIDATION_SHARE)))
    train, validation = order[:cut], order[cut:]
    catalogue = spec.catalogue

    def split(rows: npt.NDArray[np.int64]) -> tuple[FloatArray, TrainingTargets]:
        arrays = labels.constraints.take(rows)
        x = labels.x[rows]
        change = (labels.values[rows] - x[:, columns]) / spec.scale[columns]
        held = labels.mask[rows] & (np.abs(change) <= 1e-9)
        pattern = np.where(labels.mask[rows], np.where(held, HOLD, CHANGE), NOT_ACTED)
        changed = pattern == CHANGE
        targets = TrainingTargets(
            pattern_index(pattern, spec.holdable),
            np.where(changed, change, 0.0),
            changed,
            allowed_patterns(arrays, x[:, columns], catalogue),
        )
        return encode_inputs(spec, x, arrays), targets

    train_set, validation_set = split(train), split(validation)
    candidates = []
    for i, params in enumerate(grid):
        network, history = train_network(*train_set, validation_set, params, seed + i)
        amortizer = Amortizer(spec, network)
        solver = AmortizedSolver(amortizer, scm, classifier)
        batch = solver.predict(labels.x[validation], labels.constraints.take(validation))
        ratio = batch.cost / labels.cost[validation]
        score = float(np.where(batch.verified, ratio, INVALID_RATIO).mean())
        candidates.append(
            (
                score,
                i,
                amortizer,
                {
                    "hidden": list(params.hidden),
                    "weight_decay": params.weight_decay,
                    "ensemble": params.ensemble,
                    "epochs": history["epochs"],
                    "validation_loss": history["validation_loss"],
                    "validation_raw_validity": float(batch.verified.mean()),
                    "validation_mean_cost_ratio": float(ratio[batch.verified].mean())
                    if batch.verified.any()
                    else None,
                    "validation_mask_agreement": float(
                        (batch.intervene[:, columns] == labels.mask[validation]).all(axis=1).mean()
                    ),
                    "score": score,
                },
            )
        )
    best = min(candidates, key=lambda c: (c[0], c[1]))
    report = {
        "label_file": label_file,
        "label_identity": metadata.get("identity", ""),
        "scheme": metadata.get("scheme", ""),
        "seed": seed,
        "people": {"train": len(train), "validation": len(validation)},
        "candidates": [c[3] for c in candidates],
        "chosen": best[1],
    }
    spec = dataclasses.replace(spec, training=report)
    return Amortizer(spec, best[2].network), report
