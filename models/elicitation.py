"""Simulated pre-hoc preference elicitation: each person's constraints for a labelling job.

Budde et al. (FAccT 2026, DOMAIN.md section 2) collect a person's individual actionability
before any recommendation, as hard constraints (locks, value limits) and soft ones
(rankings or scores of the features). Their protocol is not public; the schemes below are
this project's definition of it, for generating training and evaluation labels. Each
returns, per person, the raw constraints document that
:func:`models.preferences.parse_constraints` validates (keys ``lock``, ``bounds``,
``rank``, ``score``, ``soft_limits``).

Reproducibility: person ``i`` of a job with seed ``s`` draws everything from
``numpy.random.default_rng([s, i])``, so their constraints do not depend on chunking,
worker count or order. Feature scales and group thresholds come from a fixed reference
population of the model (:data:`REFERENCE_SIZE` people sampled with
:data:`REFERENCE_SEED`), not from the people being labelled.

Notation: ``K`` actionable features; ``sd_k`` feature k's standard deviation in the
reference population; ``x_k`` the person's current value; a *move radius* is
``r ~ Uniform(0.5, 2) * sd_k``.

Schemes:

- ``universal``: no personalization: no locks, no limits, unit weights (``{}``).
- ``hard``: the number of locked features is uniform on ``0 .. K-1`` (at least one stays
  free) and the locked ones are a uniformly random subset; each free feature then gets,
  with probability :data:`BOUND_PROBABILITY`, a value bound ``[x_k - r, x_k + r]`` clipped
  to the feature's domain ("I can move it by at most r").
- ``hard-group``: as ``hard``, but the number of locks is ``Binomial(K - 1, p)`` with
  ``p = LOCK_BASE + LOCK_STEP * d`` and ``d`` the number of the model's group attributes
  (:data:`GROUP_ATTRIBUTES`) on which the person is in the disadvantaged group; a group's
  real options thus differ (``p`` is capped at 1). Loan: ``gender = 0`` (the group its
  equations give lower income and larger loans) and income below the reference median, so
  ``p = 0.25, 0.45, 0.65`` for ``d = 0, 1, 2``; GSMC: women, the minority group and the
  low income group, as its model file defines them.
- ``rank``: a uniformly random order of the actionable features, easiest first; the
  :class:`~models.preferences.WeightScheme` turns it into weights (linear by default: the
  r-th easiest weighs ``1 + (r - 1)``, then normalized to mean 1).
- ``score``: a score per actionable feature, uniform on the integers 1 (very hard) to 5
  (very easy); weights ``1 + (5 - s)``, normalized to mean 1, by the same scheme.
- ``mixed`` (the default for training data): ``hard``'s locks and bounds, then ``rank`` or
  ``score`` (probability 1/2 each), then for each free feature without a bound, with
  probability :data:`SOFT_LIMIT_PROBABILITY`, a soft limit at a move radius ``r`` with a
  penalty of ``1 / sd_k`` per unit beyond it (one more cost unit per standard deviation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.scm import StructuralCausalModel

FloatArray = npt.NDArray[np.float64]

SCHEMES = ("universal", "hard", "hard-group", "rank", "score", "mixed")
DEFAULT_SCHEME = "mixed"

REFERENCE_SIZE = 10_000
"""People sampled from the model to set feature scales and group thresholds."""
REFERENCE_SEED = 0
BOUND_PROBABILITY = 0.3
"""``hard``/``mixed``: chance that a free feature gets a value bound."""
SOFT_LIMIT_PROBABILITY = 0.2
"""``mixed``: chance that a free, unbounded feature gets a soft limit."""
LOCK_BASE = 0.25
"""``hard-group``: lock probability of a person in no disadvantaged group."""
LOCK_STEP = 0.2
"""``hard-group``: added lock probability per disadvantaged group attribute."""
RADIUS_RANGE = (0.5, 2.0)
"""A move radius, in standard deviations of the feature."""


class ElicitationError(ValueError):
    """A scheme or group definition that cannot be used; the message names it."""


@dataclass(frozen=True)
class GroupAttribute:
    """A socio-demographic attribute and the side of it that is disadvantaged.

    Give exactly one of ``equals`` (a categorical attribute: the disadvantaged value) or
    ``below_quantile`` (a numeric one: values below this quantile of the reference
    population).
    """

    feature: str
    equals: float | None = None
    below_quantile: float | None = None

    def __post_init__(self) -> None:
        if (self.equals is None) == (self.below_quantile is None):
            raise ElicitationError(
                f"The group attribute {self.feature!r} must give exactly one of 'equals' and "
                f"'below_quantile'. Got equals={self.equals!r}, "
                f"below_quantile={self.below_quantile!r} instead."
            )
        if self.below_quantile is not None and not 0 < self.below_quantile < 1:
            raise ElicitationError(
                f"The 'below_quantile' of the group attribute {self.feature!r} must be in "
                f"(0, 1). Got {self.below_quantile!r} instead."
            )


GROUP_ATTRIBUTES: dict[str, tuple[GroupAttribute, ...]] = {
    "loan": (GroupAttribute("gender", equals=0.0), GroupAttribute("income", below_quantile=0.5)),
    # As instances/gsmc/scm.json describes them: women (1) and the minority group (1) have
    # lower incomes by construction; income group 0 is below the median income.
    "gsmc": (
        GroupAttribute("gender", equals=1.0),
        GroupAttribute("race", equals=1.0),
        GroupAttribute("income_group", equals=0.0),
    ),
}
"""Per model name (``scm.name``): the attributes that define disadvantaged groups. Another
model plugs in with its own entry."""


class PreferenceElicitor:
    """Draws each person's raw constraints under one scheme (see the module docstring).

    Parameters
    ----------
    scm : StructuralCausalModel
        The causal model: actionable features, domains, reference population.
    scheme : str
        One of :data:`SCHEMES`.
    seed : int
        The job's seed; person ``i`` draws from ``default_rng([seed, i])``.
    groups : sequence of GroupAttribute, optional
        The group attributes; default ``GROUP_ATTRIBUTES[scm.name]`` (none if absent).
    """

    def __init__(
        self,
        scm: StructuralCausalModel,
        scheme: str,
        seed: int,
        *,
        groups: Sequence[GroupAttribute] | None = None,
    ) -> None:
        if scheme not in SCHEMES:
            raise ElicitationError(
                f"The 'scheme' must be one of {list(SCHEMES)}. Got {scheme!r} instead."
            )
        self.scm, self.scheme, self.seed = scm, scheme, int(seed)
        self.groups = tuple(GROUP_ATTRIBUTES.get(scm.name, ()) if groups is None else groups)
        for group in self.groups:
            if group.feature not in scm.index:
                raise ElicitationError(
                    f"The group attribute {group.feature!r} is not a feature of the model "
                    f"{scm.name!r}; features are {list(scm.names)}."
                )
        if scheme == "hard-group" and not self.groups:
            raise ElicitationError(
                f"The scheme 'hard-group' needs group attributes for the model {scm.name!r}; "
                f"add an entry to models.elicitation.GROUP_ATTRIBUTES."
            )
        self.actionable = scm.actionable
        reference, _ = scm.sample(REFERENCE_SIZE, REFERENCE_SEED)
        self.sd = {k: float(np.std(reference[:, scm.index[k]])) for k in self.actionable}
        self._sd = np.array([self.sd[k] for k in self.actionable])
        self.thresholds = {
            g.feature: float(np.quantile(reference[:, scm.index[g.feature]], g.below_quantile))
            for g in self.groups
            if g.below_quantile is not None
        }

    def disadvantaged(self, x: FloatArray) -> dict[str, bool]:
        """Per group attribute: whether the person with factual row ``x`` is disadvantaged."""
        flags = {}
        for group in self.groups:
            value = float(x[self.scm.index[group.feature]])
            if group.equals is not None:
                flags[group.feature] = value == group.equals
            else:
                flags[group.feature] = value < self.thresholds[group.feature]
        return flags

    def lock_probability(self, x: FloatArray) -> float:
        """``hard-group``'s per-slot lock probability for the person with factual row ``x``."""
        return min(1.0, LOCK_BASE + LOCK_STEP * sum(self.disadvantaged(x).values()))

    def constraints(self, person_id: int, x: FloatArray) -> dict[str, Any]:
        """The raw constraints document of person ``person_id`` with factual row ``x``."""
        rng = np.random.default_rng([self.seed, int(person_id)])
        scheme = self.scheme
        raw: dict[str, Any] = {}
        if scheme in ("hard", "hard-group", "mixed"):
            raw.update(self._hard(rng, x, group_based=scheme == "hard-group"))
        if scheme == "rank" or (scheme == "mixed" and rng.random() < 0.5):
            raw["rank"] = [self.actionable[k] for k in rng.permutation(len(self.actionable))]
        elif scheme in ("score", "mixed"):
            scores = rng.integers(1, 6, size=len(self.actionable))
            raw["score"] = {k: int(s) for k, s in zip(self.actionable, scores, strict=True)}
        if scheme == "mixed":
            limits = self._soft_limits(rng, raw)
            if limits:
                raw["soft_limits"] = limits
        return raw

    def describe(self) -> dict[str, Any]:
        """The scheme and its parameters, for a job's metadata."""
        return {
            "scheme": self.scheme,
            "seed": self.seed,
            "reference": {"size": REFERENCE_SIZE, "seed": REFERENCE_SEED},
            "bound_probability": BOUND_PROBABILITY,
            "soft_limit_probability": SOFT_LIMIT_PROBABILITY,
            "lock_base": LOCK_BASE,
            "lock_step": LOCK_STEP,
            "radius_in_sd": list(RADIUS_RANGE),
            "groups": [
                {"feature": g.feature, "equals": g.equals, "below_quantile": g.below_quantile}
                for g in self.groups
            ],
        }

    # -- draws -------------------------------------------------------------------------

    def _hard(self, rng: np.random.Generator, x: FloatArray, *, group_based: bool) -> dict:
        count = len(self.actionable)
        if group_based:
            n_locks = int(rng.binomial(count - 1, self.lock_probability(x)))
        else:
            n_locks = int(rng.integers(0, count))
        locked = set(rng.permutation(count)[:n_locks].tolist())
        # One draw per feature, locked or not, so that one lock does not shift the others.
        bounded = rng.random(count) < BOUND_PROBABILITY
        radius = self._radii(rng)
        raw: dict[str, Any] = {"lock": [k for i, k in enumerate(self.actionable) if i in locked]}
        bounds = {}
        for i, name in enumerate(self.actionable):
            if bounded[i] and i not in locked:
                var = self.scm.variables[self.scm.index[name]]
                value = float(x[self.scm.index[name]])
                bounds[name] = [
                    max(value - radius[i], var.lower),
                    min(value + radius[i], var.upper),
                ]
        if bounds:
            raw["bounds"] = bounds
        return raw

    def _soft_limits(
        self, rng: np.random.Generator, raw: Mapping[str, Any]
    ) -> dict[str, dict[str, float]]:
        limited = rng.random(len(self.actionable)) < SOFT_LIMIT_PROBABILITY
        radius = self._radii(rng)
        fixed = set(raw.get("lock", [])) | set(raw.get("bounds", {}))
        return {
            name: {"limit": radius[i], "penalty": 1.0 / self.sd[name]}
            for i, name in enumerate(self.actionable)
            if limited[i] and name not in fixed
        }

    def _radii(self, rng: np.random.Generator) -> list[float]:
        """A move radius per actionable feature, in the feature's units."""
        return (rng.uniform(*RADIUS_RANGE, size=len(self.actionable)) * self._sd).tolist()
