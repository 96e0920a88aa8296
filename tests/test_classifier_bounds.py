"""Neuron bounds of a ReLU network over a box, with and without the acceptance cut."""

from __future__ import annotations

import numpy as np
import pytest

from models.classifiers import Classifier, Layer


def random_network(seed: int, inputs: int = 4, width: int = 12) -> Classifier:
    rng = np.random.default_rng(seed)
    layers = (
        Layer(rng.normal(size=(inputs, width)), rng.normal(size=width)),
        Layer(rng.normal(size=(width, width)) / 2, rng.normal(size=width)),
        Layer(rng.normal(size=(width, 1)), rng.normal(size=1)),
    )
    names = tuple(f"f{i}" for i in range(inputs))
    return Classifier("mlp", names, rng.normal(size=inputs), rng.uniform(0.5, 2, inputs), layers)


def preactivations(clf: Classifier, x: np.ndarray) -> list[np.ndarray]:
    a = (x - clf.mean) / clf.scale
    values = []
    for position, layer in enumerate(clf.layers):
        z = a @ layer.weights + layer.bias
        values.append(z)
        if position < len(clf.layers) - 1:
            a = np.maximum(z, 0.0)
    return values


@pytest.mark.parametrize("seed", range(6))
def test_bounds_over_accepted_inputs_are_sound_and_nested(seed: int) -> None:
    clf = random_network(seed)
    rng = np.random.default_rng(100 + seed)
    # Inputs x = P y + q: the last input moves with the first, like a descendant.
    P = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0, 0]])
    q = rng.normal(size=4)
    lower, upper = -rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    y = rng.uniform(lower, upper, size=(20_000, 3))
    z = preactivations(clf, y @ P.T + q)
    threshold = float(np.quantile(z[-1][:, 0], 0.8))  # a fifth of the box is accepted
    plain = clf.preactivation_bounds_affine(P, q, lower, upper)
    cut = clf.preactivation_bounds_affine(P, q, lower, upper, logit_at_least=threshold)
    accepted = z[-1][:, 0] >= threshold
    for (lo, hi), (cut_lo, cut_hi), values in zip(plain, cut, z, strict=True):
        assert np.all(cut_lo >= lo) and np.all(cut_hi <= hi)
        assert np.all(values[accepted] >= cut_lo - 1e-9)
        assert np.all(values[accepted] <= cut_hi + 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_an_unreachable_threshold_is_proven_unreachable(seed: int) -> None:
    clf = random_network(seed)
    P, q = np.eye(4), np.zeros(4)
    lower, upper = -np.ones(4), np.ones(4)
    logit_upper = clf.preactivation_bounds_affine(P, q, lower, upper)[-1][1][0]
    cut = clf.preactivation_bounds_affine(P, q, lower, upper, logit_at_least=logit_upper + 0.5)
    assert cut[-1][1][0] < logit_upper + 0.5 or any(np.any(lo > hi) for lo, hi in cut)
