"""Shared fixtures: small hand-checkable models, the Loan instance, available backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instances import load_classifier, load_scm
from models.classifiers import Classifier
from models.costs import CostProfile
from models.scm import StructuralCausalModel
from solver.backends import available_backends, backend_names

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def backend_params() -> list:
    """Every registered backend; those not installed here are skipped with the reason."""
    available = set(available_backends())
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(name not in available, reason=f"{name} is not installed"),
        )
        for name in backend_names()
    ]


def two_feature_scm(b_follows_a: bool = True) -> StructuralCausalModel:
    """a -> b with b = 0.5 a + noise (or b = noise), both actionable in [-10, 10]."""
    return StructuralCausalModel.from_dict(
        {
            "schema_version": 1,
            "name": "two",
            "variables": [
                {
                    "name": "a",
                    "type": "continuous",
                    "role": "actionable",
                    "bounds": [-10, 10],
                    "equation": "noise",
                    "noise": {"distribution": "normal", "sd": 1},
                },
                {
                    "name": "b",
                    "type": "continuous",
                    "role": "actionable",
                    "bounds": [-10, 10],
                    "equation": "0.5 * a + noise" if b_follows_a else "noise",
                    "noise": {"distribution": "normal", "sd": 1},
                },
            ],
        }
    )


def sum_classifier(kind: str) -> Classifier:
    """Accepts when a + b >= 2 (logit a + b - 2; LR, or a ReLU MLP computing the same)."""
    if kind == "lr":
        layers = [{"weights": [[1.0], [1.0]], "bias": [-2.0]}]
    else:
        layers = [
            {"weights": [[1.0, 0.0], [0.0, 1.0]], "bias": [0.0, 0.0]},
            {"weights": [[1.0], [1.0]], "bias": [-2.0]},
        ]
    return Classifier.from_dict(
        {
            "schema_version": 1,
            "kind": kind,
            "feature_names": ["a", "b"],
            "scaler": {"mean": [0.0, 0.0], "scale": [1.0, 1.0]},
            "layers": layers,
        }
    )


def unit_cost(kind: str, names: tuple[str, ...] = ("a", "b")) -> CostProfile:
    return CostProfile(kind, names, {n: 1.0 for n in names}, {n: 1.0 for n in names})


@pytest.fixture(scope="session")
def loan_scm() -> StructuralCausalModel:
    return load_scm("loan")


@pytest.fixture(scope="session")
def loan_lr() -> Classifier:
    return load_classifier("loan", "lr")


@pytest.fixture(scope="session")
def loan_mlp() -> Classifier:
    return load_classifier("loan", "mlp")


def rejected(scm: StructuralCausalModel, clf: Classifier, n: int, seed: int) -> np.ndarray:
    x, _ = scm.sample(max(10 * n, 100), seed)
    return x[~clf.accepts(x)][:n]


def random_constraints(rng: np.random.Generator, actionable: tuple[str, ...]) -> dict:
    """A raw constraints document: up to 2 locks, a rank or scores, a direction, a limit."""
    raw: dict = {}
    locks = rng.choice(actionable, size=rng.integers(0, 3), replace=False)
    if len(locks):
        raw["lock"] = [str(n) for n in locks]
    if rng.random() < 0.5:
        raw["rank"] = [str(n) for n in rng.permutation(actionable)]
    elif rng.random() < 0.5:
        raw["score"] = {str(n): int(rng.integers(1, 6)) for n in actionable}
    if rng.random() < 0.3:
        raw["direction"] = {str(rng.choice(actionable)): "increase"}
    if rng.random() < 0.2:
        raw["max_changes"] = int(rng.integers(1, 3))
    return raw
