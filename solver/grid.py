"""Brute-force grid search over actions: CARMA's M* oracle, and the engine's incumbent.

Every combination of "leave it" or one of ``values_per_feature`` evenly spaced values per
feature this person may act on is simulated through the causal model and the classifier
in numpy batches; the cheapest valid one is kept. With 15 values per feature this is the
oracle of CARMA's paper (only optimal on its grid); with a few values and a line search
it gives the exact engine a cheap valid action whose cost bounds the search box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.classifiers import Classifier
from models.costs import CostProfile
from models.preferences import PersonConstraints
from models.scm import StructuralCausalModel, VariableType
from solver.milp import BoolArray, FloatArray

_CHUNK = 50_000


@dataclass(frozen=True)
class GridAction:
    intervene: BoolArray
    values: FloatArray
    cost: float
    candidates: int
    """How many actions were simulated."""


def grid_search(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: PersonConstraints,
    ranges: dict[str, tuple[float, float]],
    *,
    values_per_feature: int = 15,
    logit_margin: float = 0.0,
    refine: bool = False,
) -> GridAction | None:
    """The cheapest valid action on the grid, or None when no grid point is valid.

    ``ranges`` holds, per feature this person may act on, the interval of values they may
    set (bounds and direction already applied). Valid means ``logit >= logit(threshold) +
    logit_margin``. ``refine`` adds a line search between the factual row and the best
    grid action (cheap, and usually much closer to the optimum).
    """
    found = grid_search_by_mask(
        scm,
        classifier,
        cost,
        x,
        noise,
        constraints,
        ranges,
        (),
        values_per_feature=values_per_feature,
        logit_margin=logit_margin,
        refine=refine,
    )
    return found.get(frozenset())


def grid_search_by_mask(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: PersonConstraints,
    ranges: dict[str, tuple[float, float]],
    enumerated: Sequence[str],
    *,
    values_per_feature: int = 15,
    logit_margin: float = 0.0,
    refine: bool = False,
) -> dict[frozenset[str], GridAction]:
    """:func:`grid_search`, keeping the cheapest valid action per mask.

    A grid action's mask is the set of ``enumerated`` features it acts on; masks with no
    valid grid action are absent. The engine orders its per-mask MILPs by these costs.
    """
    names = [name for name in scm.names if name in ranges]
    options = []
    for name in names:
        lo, hi = ranges[name]
        grid = np.linspace(lo, hi, values_per_feature)
        if scm.variables[scm.index[name]].type is not VariableType.CONTINUOUS:
            grid = np.unique(np.round(grid))
        options.append(np.concatenate([[np.nan], grid]))  # nan: leave the feature alone
    columns = [scm.index[name] for name in names]
    keyed = [scm.index[name] for name in enumerated if name in ranges]
    threshold = classifier.logit_threshold + logit_margin
    best: dict[frozenset[str], GridAction] = {}
    simulated = 0
    sizes = [len(option) for option in options]
    total = int(np.prod(sizes)) if options else 0
    for first in range(0, total, _CHUNK):
        # Rows in itertools.product's order (the first feature varies slowest), built
        # from their flat index: the first of equally cheap actions wins, as before.
        flat = np.arange(first, min(first + _CHUNK, total))
        table = np.column_stack(
            [
                option[index]
                for option, index in zip(options, np.unravel_index(flat, sizes), strict=True)
            ]
        )
        intervene = np.zeros((len(table), scm.num_features), dtype=bool)
        values = np.zeros((len(table), scm.num_features))
        intervene[:, columns] = ~np.isnan(table)
        values[:, columns] = np.nan_to_num(table)
        if constraints.max_changes is not None:
            keep = intervene.sum(axis=1) <= constraints.max_changes
            intervene, values = intervene[keep], values[keep]
        simulated += len(intervene)
        costs = _valid_costs(
            scm, classifier, cost, x, noise, constraints, intervene, values, threshold
        )
        keys = intervene[:, keyed] @ (1 << np.arange(len(keyed)))
        for key in np.unique(keys[np.isfinite(costs)]):
            i = int(np.argmin(np.where(keys == key, costs, np.inf)))
            mask = frozenset(scm.names[k] for k in keyed if intervene[i, k])
            found = GridAction(intervene[i].copy(), values[i].copy(), float(costs[i]), simulated)
            best[mask] = _better(best.get(mask), found)  # type: ignore[assignment]
    if refine and best:
        refined = _line_search(
            scm, classifier, cost, x, noise, constraints, list(best.values()), threshold, ranges
        )
        best = dict(zip(best, refined, strict=True))
    return best


def _valid_costs(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: PersonConstraints,
    intervene: BoolArray,
    values: FloatArray,
    threshold: float,
) -> FloatArray:
    """Each action's cost, inf where it is not valid."""
    if len(intervene) == 0:
        return np.zeros(0)
    rows = np.broadcast_to(x, intervene.shape)
    counterfactual = scm.propagate_counterfactual(
        rows, intervene, values, np.broadcast_to(noise, intervene.shape)
    )
    valid = (classifier.logit(counterfactual) >= threshold) & scm.one_hot_valid(counterfactual)
    if not valid.any():
        return np.full(len(intervene), np.inf)
    return np.where(valid, cost.cost(scm.names, x, intervene, values, constraints), np.inf)


def _line_search(
    scm: StructuralCausalModel,
    classifier: Classifier,
    cost: CostProfile,
    x: FloatArray,
    noise: FloatArray,
    constraints: PersonConstraints,
    actions: list[GridAction],
    threshold: float,
    ranges: dict[str, tuple[float, float]],
) -> list[GridAction]:
    """Shrink each action towards the factual row, and each feature alone, keeping validity.

    The candidates of all actions are simulated in one batch per round.
    """
    best = list(actions)
    steps = np.linspace(0.0, 1.0, 33)
    for _ in range(2):
        blocks = []
        for action in best:
            acted = np.flatnonzero(action.intervene)
            # Scale all changes together, then each changed feature on its own: one row of
            # `moves` per direction, the steps within it.
            moves = np.zeros((1 + len(acted), len(x)), dtype=bool)
            moves[0, acted] = True
            moves[np.arange(1, 1 + len(acted)), acted] = True
            scaled = x + steps[:, None] * (action.values - x)
            values = np.where(moves[:, None, :], scaled, action.values).reshape(-1, len(x))
            # A person's range need not contain their current value: stay inside it.
            lo, hi = np.array([ranges[scm.names[k]] for k in acted]).reshape(-1, 2).T
            values[:, acted] = np.clip(values[:, acted], lo, hi)
            whole = [k for k in acted if scm.variables[k].type is not VariableType.CONTINUOUS]
            values[:, whole] = np.round(values[:, whole])
            blocks.append((np.repeat(action.intervene[None, :], len(values), axis=0), values))
        intervene = np.concatenate([block[0] for block in blocks])
        values = np.concatenate([block[1] for block in blocks])
        costs = _valid_costs(
            scm, classifier, cost, x, noise, constraints, intervene, values, threshold
        )
        start = 0
        for position, (block, _) in enumerate(blocks):
            end = start + len(block)
            segment = costs[start:end]
            if np.isfinite(segment).any():
                i = start + int(np.argmin(segment))
                found = GridAction(
                    intervene[i].copy(),
                    values[i].copy(),
                    float(costs[i]),
                    best[position].candidates + len(block),
                )
                best[position] = _better(best[position], found)  # type: ignore[assignment]
            else:
                best[position] = _better(best[position], None)  # type: ignore[assignment]
            start = end
    return best


def _better(a: GridAction | None, b: GridAction | None) -> GridAction | None:
    if a is None:
        return b
    if b is None:
        return GridAction(a.intervene, a.values, a.cost, a.candidates)
    winner = b if b.cost < a.cost else a
    return GridAction(winner.intervene, winner.values, winner.cost, max(a.candidates, b.candidates))
