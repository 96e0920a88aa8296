"""The exact recourse engine: one formulation, any backend, every answer verified.

Per person: (1) the factual row's noise is abducted; (2) a grid search with a line search
finds a cheap valid action, whose cost bounds the search box; (3) the MILP is filled with
this person's numbers and solved, one small MILP per set of acted-on features (mask) when
there are few to enumerate; for the squared cost, tangent cuts are added at the solution
until the true cost meets the proven bound; (4) the action is read off (binaries
rounded), re-simulated through the exact causal model and classifier, and checked against
every hard constraint. An answer that fails verification is re-solved with a ten times
larger validity margin and, when the model has interpolated (piecewise-linear) terms, four
times as many interpolation segments (at most twice); if it still fails it is returned
with ``verified=False`` and the reasons, never silently.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import PersonConstraints
from models.scm import StructuralCausalModel, VariableType
from solver.backends import DEFAULT_BACKEND, backend_class, create_backend
from solver.formulation import PersonContext, RecourseFormulation
from solver.grid import GridAction, grid_search, grid_search_by_mask
from solver.milp import BackendResult, FloatArray, NumericMILP, SolverSettings, SolveStatus
from solver.result import RecourseResult, SolverInfo
from solver.verify import verify_action

# Squared-cost cut rounds stop when true cost - proven bound <= this (relative, + absolute).
_CUT_TOLERANCE = 1e-7
_MAX_CUT_ROUNDS = 30
_MARGIN_RETRIES = 2


@dataclass(frozen=True)
class EngineOptions:
    """How the engine searches; the defaults are what the benchmarks measured best."""

    margin: float = 1e-4
    """Validity margin in logit units."""
    incumbent_grid: int | None = None
    """Values per feature of the incumbent grid search (0: no grid; the masks are then
    solved smallest first, each optimum the budget of the next). None: 7 for ReLU
    networks, whose MILPs get much faster with a budget close to the optimum (with the
    acceptance-cut neuron bounds, 9 cost more grid time than it saved and 5 gave worse
    budgets; without a grid Loan-MLP took seconds), and 0 for linear classifiers, whose
    per-mask MILPs are so cheap that a grid costs more than its budget saves (measured
    on Loan: 3.2 ms per person with 3 values, 2.6 ms without). A model with interpolated
    terms keeps 9 and 5: there the budget's box is also the interpolation's interval, so
    another grid gives another (equally valid) approximate optimum."""
    tangents: int = 9
    breakpoints: int = 16
    mask_features: int = 4
    """Solve one small MILP per set of acted-on features (a mask) when at most this many
    features need enumerating (0: always one MILP). When the grid runs and finds no valid
    action, one MILP is solved instead. A linear classifier without a grid, on a backend
    that solves few free binaries as LPs, gets one program instead (see ``_masks``)."""


class RecourseSolver:
    """Exact, verified recourse for one causal model, classifier and cost profile.

    Builds the MILP template once; :meth:`solve` fills and solves it per person.
    """

    def __init__(
        self,
        scm: StructuralCausalModel,
        classifier: Classifier,
        cost: CostProfile,
        *,
        backend: str = DEFAULT_BACKEND,
        settings: SolverSettings | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self.scm, self.classifier, self.cost = scm, classifier, cost
        self.options = options or EngineOptions()
        self.settings = settings or SolverSettings()
        # Formulations by number of interpolation segments: finer ones are built on demand
        # when an answer fails verification, and used for that person only.
        self._formulations: dict[int, RecourseFormulation] = {}
        self.formulation = self._refined(self.options.breakpoints)
        self.grid_values = self.options.incumbent_grid
        if self.grid_values is None:
            deep = len(classifier.layers) > 1
            if self.formulation.approximated:
                self.grid_values = 9 if deep else 5
            else:
                self.grid_values = 7 if deep else 0
        # For dropping no-op interventions: row k holds the features k descends from.
        self._ancestors = scm.ancestor_matrix()
        self.backend = create_backend(backend)
        self.backend_version = backend_class(backend).version()

    def solve(self, x: FloatArray, constraints: PersonConstraints) -> RecourseResult:
        """Optimal recourse for factual row ``x`` under ``constraints``."""
        start = time.perf_counter()
        scm, clf = self.scm, self.classifier
        self.formulation = self._formulations[self.options.breakpoints]
        x = np.asarray(x, dtype=float)
        noise = scm.abduct_noise(x[None, :])[0]
        factual_probability = float(clf.probability(x[None, :])[0])
        if factual_probability >= clf.threshold:
            return self._already_accepted(x, factual_probability, constraints, start)

        ranges = self.formulation.intervention_ranges(x, constraints)
        masks = self._masks(x, constraints, ranges) if ranges else None
        grid: dict[frozenset[str], GridAction] = {}
        if self.grid_values > 0 and ranges:
            grid = grid_search_by_mask(
                scm,
                clf,
                self.cost,
                x,
                noise,
                constraints,
                ranges,
                sorted({k for mask in masks[1] for k in mask}) if masks else (),
                values_per_feature=self.grid_values,
                logit_margin=self.options.margin,
                refine=True,
            )
        incumbent = min(grid.values(), key=lambda action: action.cost, default=None)
        budget = incumbent.cost if incumbent is not None else None
        if masks is not None:
            # Masks with a cheap grid action first (without a grid, small masks first):
            # their optimum shrinks the budget the harder masks are solved with (or
            # skipped under).
            free, enumerated = masks
            masks = (
                free,
                sorted(
                    enumerated,
                    key=lambda m: (
                        grid[frozenset(m)].cost if frozenset(m) in grid else np.inf,
                        len(m),
                    ),
                ),
            )

        margin = self.options.margin
        solves, solve_seconds = 0, 0.0
        deadline = start + self.settings.time_limit
        attempt = 0
        while True:
            if budget is None and self.grid_values > 0:
                # No valid grid action (often: no recourse), or a retry after the budget
                # cut the optimum off: one MILP, as the masks would all start unbounded.
                masks = None
            if masks is not None:
                outcome, ctx, rounds, seconds = self._solve_by_masks(
                    x, constraints, noise, budget, margin, deadline, *masks
                )
            else:
                ctx = self.formulation.context(
                    x, constraints, noise=noise, cost_budget=budget, margin=margin
                )
                outcome, rounds, seconds = self._solve_with_cuts(ctx, deadline)
            solves, solve_seconds = solves + rounds, solve_seconds + seconds
            if outcome.status is SolveStatus.INFEASIBLE and budget is not None:
                # The incumbent proves a solution exists; tolerances must have cut it off.
                budget = None
                continue
            if (
                outcome.status is SolveStatus.TIME_LIMIT
                and incumbent is not None
                and (outcome.objective is None or outcome.objective > incumbent.cost)
            ):
                # Out of time without anything better than the grid action: return that.
                intervene, values = incumbent.intervene, incumbent.values
            elif outcome.solution is not None:
                intervene, values = self._read_action(outcome.solution)
            else:
                return self._without_action(
                    outcome,
                    x,
                    factual_probability,
                    constraints,
                    start,
                    solves,
                    solve_seconds,
                    incumbent.cost if incumbent else None,
                )
            intervene = self._drop_no_op_interventions(x, noise, intervene, values)
            check = verify_action(scm, clf, self.cost, x, noise, constraints, intervene, values)
            if (
                check.verified
                or attempt == _MARGIN_RETRIES
                or outcome.status is not SolveStatus.OPTIMAL
            ):
                break
            attempt += 1
            margin *= 10
            if self.formulation.approximated:
                # The interpolation may be what went wrong: its error shrinks 16-fold.
                self.formulation = self._refined(4 * self.formulation.breakpoints)
        bound = outcome.bound
        gap = None if bound is None else max(0.0, check.cost - bound)
        return RecourseResult(
            status=outcome.status,
            factual=self.scm.named(x),
            action={scm.names[k]: float(values[k]) for k in np.flatnonzero(intervene)},
            counterfactual=self.scm.named(check.counterfactual),
            cost=check.cost,
            probability=check.probability,
            factual_probability=factual_probability,
            verified=check.verified,
            verification_failures=check.failures,
            solver=self._info(
                start, solves, solve_seconds, gap, incumbent.cost if incumbent else None
            ),
            cost_bound=bound,
            interpolation_error=self.formulation.interpolation_error(ctx),
            message=outcome.message,
            constraints=constraints.to_dict(),
        )

    def grid_oracle(
        self,
        x: FloatArray,
        constraints: PersonConstraints,
        *,
        values_per_feature: int = 15,
        logit_margin: float = 0.0,
    ) -> GridAction | None:
        """CARMA's M*: the cheapest valid action on a grid over this person's ranges.

        No MILP: the brute-force reference the exact answers are compared with.
        """
        x = np.asarray(x, dtype=float)
        return grid_search(
            self.scm,
            self.classifier,
            self.cost,
            x,
            self.scm.abduct_noise(x[None, :])[0],
            constraints,
            self.formulation.intervention_ranges(x, constraints),
            values_per_feature=values_per_feature,
            logit_margin=logit_margin,
        )

    # -- steps -------------------------------------------------------------------------

    def _refined(self, breakpoints: int) -> RecourseFormulation:
        """The formulation with ``breakpoints`` interpolation segments (built once)."""
        if breakpoints not in self._formulations:
            self._formulations[breakpoints] = RecourseFormulation(
                self.scm,
                self.classifier,
                self.cost,
                margin=self.options.margin,
                tangents=self.options.tangents,
                breakpoints=breakpoints,
            )
        return self._formulations[breakpoints]

    def _masks(
        self,
        x: FloatArray,
        constraints: PersonConstraints,
        intervention: dict[str, tuple[float, float]],
    ) -> tuple[frozenset[str], list[tuple[str, ...]]] | None:
        """Features acted on in every subproblem, and the masks over the others.

        None: solve one MILP instead. A feature no action can move otherwise (its parents
        are out of reach), whose current value this person may set, costs nothing to "act
        on" at its current value, so it needs no mask of its own (with no sparsity cost and
        no limit on the number of changes); the others are enumerated.
        """
        f, scm = self.formulation, self.scm
        reachable = set(f.reachable)
        free: list[str] = []
        if self.cost.sparsity == 0 and constraints.max_changes is None:
            free = [
                k
                for k in f.actionable
                if k in intervention
                and not set(scm.variables[scm.index[k]].parents) & reachable
                and intervention[k][0] <= x[scm.index[k]] <= intervention[k][1]
            ]
        rest = [k for k in f.actionable if k in intervention and k not in free]
        if len(rest) > self.options.mask_features:
            return None
        if (
            len(self.classifier.layers) == 1
            and self.grid_values == 0
            and self.cost.kind != "carma"
            and len(rest) < self.backend.enumerated_binaries
        ):
            # A linear classifier's program is tiny: when the backend solves it as one LP
            # per assignment of its binaries, one program (the backend picks the acted-on
            # features) beats a context per mask in Python (Loan, HiGHS: 8 LPs instead of
            # 4 contexts, 2 programs and 3 LPs per person). A MIP backend keeps the masks
            # (OR-Tools on Loan: 17% slower with one program), and so does the squared
            # cost, whose every cut round would re-solve all the LPs (1.6x slower).
            return frozenset(free), [()]
        limit = len(rest) if constraints.max_changes is None else constraints.max_changes
        masks = [
            mask
            for size in range(min(len(rest), limit) + 1)
            for mask in itertools.combinations(rest, size)
        ]
        return frozenset(free), masks

    def _solve_by_masks(
        self,
        x: FloatArray,
        constraints: PersonConstraints,
        noise: FloatArray,
        budget: float | None,
        margin: float,
        deadline: float,
        free: frozenset[str],
        masks: list[tuple[str, ...]],
    ) -> tuple[BackendResult, PersonContext, int, float]:
        """One MILP per mask, in the given order, the best cost so far the next one's budget.

        In a mask's MILP its features and the free ones are acted on (m = 1) and the other
        enumerated features are locked: fewer inputs move, the boxes are smaller and far
        fewer neurons are unstable. A mask whose classifier bound cannot reach the
        threshold within the budget is skipped without a solve. The answer is optimal when
        every mask was solved or skipped; a mask stopped by the time limit makes it
        ``time_limit``.
        """
        f = self.formulation
        enumerated = {k for mask in masks for k in mask}
        best: tuple[BackendResult, PersonContext] | None = None
        unfinished: BackendResult | None = None
        rounds, seconds = 0, 0.0
        ctx = None
        memo: dict = {}  # the masks' contexts share this person's equation bounds
        for mask in masks:
            locked = dataclasses.replace(
                constraints, locks=constraints.locks | (enumerated - set(mask))
            )
            ctx = f.context(
                x,
                locked,
                noise=noise,
                cost_budget=budget,
                margin=margin,
                forced=free | set(mask),
                memo=memo,
            )
            if not set(mask) <= set(ctx.intervention):
                continue  # a feature of this mask has no value within the budget
            if f.proves_no_recourse(ctx):
                continue  # proven: no action of this mask is valid within the budget
            outcome, r, sec = self._solve_with_cuts(ctx, deadline)
            rounds, seconds = rounds + r, seconds + sec
            if outcome.status not in (SolveStatus.OPTIMAL, SolveStatus.INFEASIBLE):
                unfinished = outcome
            if outcome.objective is not None and (
                best is None or outcome.objective < best[0].objective  # type: ignore[operator]
            ):
                best = (outcome, ctx)
                bound = outcome.objective * (1 + 1e-6) + 1e-9
                budget = bound if budget is None else min(budget, bound)
        assert ctx is not None  # masks always holds at least the empty mask
        if best is None:
            if unfinished is not None:
                return unfinished, ctx, rounds, seconds
            infeasible = BackendResult(
                SolveStatus.INFEASIBLE, None, None, None, seconds, "no mask has a valid action"
            )
            return infeasible, ctx, rounds, seconds
        outcome, best_ctx = best
        if unfinished is not None:
            bound = unfinished.bound
            outcome = dataclasses.replace(
                outcome,
                status=unfinished.status,
                bound=None if bound is None else min(bound, outcome.objective or bound),
            )
        return outcome, best_ctx, rounds, seconds

    def _solve_with_cuts(
        self, ctx: PersonContext, deadline: float
    ) -> tuple[BackendResult, int, float]:
        """Solve; for the squared cost add tangent cuts at the solution until tight.

        Every solve gets the time left until ``deadline``; when it runs out with cuts still
        violated, the answer is marked ``time_limit`` (its gap says how far it may be off).
        """
        if self.formulation.proves_no_recourse(ctx):
            proof = "the classifier's bounds exclude every accepted counterfactual"
            return BackendResult(SolveStatus.INFEASIBLE, None, None, None, 0.0, proof), 0, 0.0
        milp = self.formulation.instantiate(ctx)
        rounds, seconds = 0, 0.0
        while True:
            remaining = max(deadline - time.perf_counter(), 1e-3)
            settings = dataclasses.replace(self.settings, time_limit=remaining)
            outcome = self.backend.solve(milp, settings)
            rounds, seconds = rounds + 1, seconds + outcome.runtime_seconds
            if self.cost.kind != "carma" or outcome.solution is None:
                return outcome, rounds, seconds
            cuts = self._violated_tangents(ctx, outcome.solution)
            if not cuts:
                return outcome, rounds, seconds
            if rounds >= _MAX_CUT_ROUNDS or time.perf_counter() >= deadline:
                return dataclasses.replace(outcome, status=SolveStatus.TIME_LIMIT), rounds, seconds
            milp = _with_rows(milp, cuts)

    def _violated_tangents(
        self, ctx: PersonContext, solution: FloatArray
    ) -> list[tuple[dict[int, float], float]]:
        f = self.formulation
        cuts = []
        for k in f.actionable:
            if solution[f.m_col[k]] < 0.5:
                continue
            j = self.scm.index[k]
            a = ctx.cost_coefficients[k]
            delta = solution[f.x_col[k]] - ctx.x[j]
            true_cost = a * delta * delta
            if true_cost - solution[f.c_col[k]] <= _CUT_TOLERANCE * (1 + true_cost):
                continue
            # c >= a (2 t (x' - x^F) - t^2) at t = delta; m_k = 1 here, and the cut is only
            # valid for acted features, so relax it by W (1 - m) like the template's cuts.
            lo, hi = ctx.box[k]
            big_m = max(
                0.0, a * max(2 * delta * d - delta * delta for d in (lo - ctx.x[j], hi - ctx.x[j]))
            )
            big_m = big_m * (1 + 1e-9) + 1e-9
            cuts.append(
                (
                    {f.c_col[k]: 1.0, f.x_col[k]: -2 * a * delta, f.m_col[k]: -big_m},
                    -2 * a * delta * ctx.x[j] - a * delta * delta - big_m,
                )
            )
        return cuts

    def _read_action(self, solution: FloatArray) -> tuple[np.ndarray, FloatArray]:
        f = self.formulation
        intervene = np.zeros(self.scm.num_features, dtype=bool)
        values = np.zeros(self.scm.num_features)
        for k, col in f.m_col.items():
            if solution[col] > 0.5:
                j = self.scm.index[k]
                intervene[j] = True
                var = self.scm.variables[j]
                # Solver tolerances may leave a value a hair outside its domain (0 - 1e-9).
                value = min(max(float(solution[f.x_col[k]]), var.lower), var.upper)
                if var.type is not VariableType.CONTINUOUS:
                    value = float(round(value))
                values[j] = value
        return intervene, values

    def _drop_no_op_interventions(
        self, x: FloatArray, noise: FloatArray, intervene: np.ndarray, values: FloatArray
    ) -> np.ndarray:
        """Forget interventions that set a feature to the value it would take anyway.

        Ties let a solver 'act' on a feature without changing it (cost 0); telling the
        person to do so would be noise.
        """
        # One propagation per batch of candidates, not one per acted feature: row i leaves
        # candidate i alone under the current interventions, row n + i also every earlier
        # candidate that i descends from (candidates are in column order, which is
        # topological). Scanning the candidates in order and dropping each no-op replays
        # the feature-by-feature scan exactly: i's natural value depends only on which of
        # its candidate ancestors were dropped, so row i is right when none was dropped at
        # a value other than the one set (only that moves i), and row n + i when all were.
        # Otherwise (rare) the next batch starts at i.
        candidates = np.flatnonzero(intervene)
        while len(candidates):
            count = len(candidates)
            # earlier[i, j]: candidate i descends from candidate j (so j comes before i).
            earlier = self._ancestors[np.ix_(candidates, candidates)]
            alone = np.repeat(intervene[None, :], count, axis=0)
            alone[np.arange(count), candidates] = False
            with_ancestors = alone.copy()
            with_ancestors[:, candidates] &= ~earlier
            rows = 2 * count
            natural = self.scm.propagate_counterfactual(
                np.broadcast_to(x, (rows, len(x))),
                np.concatenate([alone, with_ancestors]),
                np.broadcast_to(values, (rows, len(x))),
                np.broadcast_to(noise, (rows, len(x))),
            )[np.arange(rows), np.tile(candidates, 2)].tolist()
            targets = values[candidates].tolist()
            intervene = intervene.copy()
            dropped = [False] * count
            moved = [False] * count  # dropped at a value other than the one set
            restart = count
            for i, ancestors in enumerate(np.flatnonzero(row).tolist() for row in earlier):
                if not any(moved[j] for j in ancestors):
                    value = natural[i]
                elif all(dropped[j] for j in ancestors):
                    value = natural[count + i]
                else:
                    restart = i
                    break
                target = targets[i]
                if abs(value - target) <= 1e-9 * (1 + abs(target)):
                    intervene[candidates[i]] = False
                    dropped[i] = True
                    # Left to its equation at exactly the value set, i changes nothing.
                    moved[i] = value != target
            candidates = candidates[restart:]
        return intervene

    def _info(
        self, start: float, solves: int, seconds: float, gap: float | None, incumbent: float | None
    ) -> SolverInfo:
        return SolverInfo(
            self.backend.name,
            self.backend_version,
            time.perf_counter() - start,
            seconds,
            gap,
            solves,
            incumbent,
        )

    def _already_accepted(
        self, x: FloatArray, probability: float, constraints: PersonConstraints, start: float
    ) -> RecourseResult:
        return RecourseResult(
            status=SolveStatus.OPTIMAL,
            factual=self.scm.named(x),
            action={},
            counterfactual=self.scm.named(x),
            cost=0.0,
            probability=probability,
            factual_probability=probability,
            verified=True,
            verification_failures=(),
            solver=self._info(start, 0, 0.0, 0.0, None),
            cost_bound=0.0,
            message="already accepted: no action needed",
            constraints=constraints.to_dict(),
        )

    def _without_action(
        self,
        outcome: BackendResult,
        x: FloatArray,
        probability: float,
        constraints: PersonConstraints,
        start: float,
        solves: int,
        seconds: float,
        incumbent: float | None,
    ) -> RecourseResult:
        message = outcome.message
        if outcome.status is SolveStatus.INFEASIBLE:
            message = "no action within this person's constraints makes the classifier accept"
        return RecourseResult.without_action(
            outcome.status,
            self.scm.named(x),
            probability,
            self._info(start, solves, seconds, None, incumbent),
            message,
            constraints.to_dict(),
        )


def _with_rows(milp: NumericMILP, rows: list[tuple[dict[int, float], float]]) -> NumericMILP:
    """``milp`` with extra rows ``sum coef * x >= lower`` (a new pattern)."""
    starts = [milp.row_start]
    indices, values = [milp.col_index], [milp.values]
    end = int(milp.row_start[-1])
    new_starts = []
    for entries, _ in rows:
        end += len(entries)
        new_starts.append(end)
        indices.append(np.fromiter(entries.keys(), dtype=np.int64))
        values.append(np.fromiter(entries.values(), dtype=float))
    starts.append(np.array(new_starts, dtype=np.int64))
    return NumericMILP(
        col_names=milp.col_names,
        col_lower=milp.col_lower,
        col_upper=milp.col_upper,
        objective=milp.objective,
        integer=milp.integer,
        row_names=milp.row_names + tuple(f"tangent_cut{i}" for i in range(len(rows))),
        row_lower=np.concatenate([milp.row_lower, [lower for _, lower in rows]]),
        row_upper=np.concatenate([milp.row_upper, np.full(len(rows), np.inf)]),
        row_start=np.concatenate(starts),
        col_index=np.concatenate(indices),
        values=np.concatenate(values),
        objective_offset=milp.objective_offset,
        pattern_key=(),
    )
