"""Train the classifiers a causal model ships with, on data sampled from the model itself.

Follows CARMA's set-up: 20,000 samples split 0.5 / 0.25 / 0.25 (train / validation / test),
standardized inputs, a ReLU MLP 32x32 or a logistic regression. Seeded and reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from models.classifiers import Classifier, Layer
from models.scm import StructuralCausalModel


def train_classifier(
    scm: StructuralCausalModel,
    kind: str,
    *,
    seed: int = 0,
    n_samples: int = 20_000,
    hidden_layers: tuple[int, ...] = (32, 32),
) -> Classifier:
    """Sample ``n_samples`` rows from ``scm``, label them, fit a classifier and report accuracy.

    The returned classifier's metadata records the seed, sizes, accuracies on the validation
    and test splits, and the model's content hash.
    """
    x, _ = scm.sample(n_samples, seed)
    y = scm.label(x, seed=seed + 1)
    metadata = {"model": scm.name, "model_variant": scm.variant, "model_hash": scm.content_hash()}
    return fit_classifier(
        x, y, scm.names, kind, seed=seed, hidden_layers=hidden_layers, metadata=metadata
    )


def fit_classifier(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    feature_names: Sequence[str],
    kind: str,
    *,
    seed: int = 0,
    hidden_layers: tuple[int, ...] = (32, 32),
    metadata: Mapping[str, Any] | None = None,
) -> Classifier:
    """Fit a classifier on rows ``x`` and 0/1 labels ``y``, split 0.5 / 0.25 / 0.25 in order.

    ``metadata`` (which model the data comes from) is recorded with the seed, sizes,
    accuracies per split and the training range of every feature.
    """
    if kind not in ("lr", "mlp"):
        raise ValueError(f"The classifier 'kind' must be 'lr' or 'mlp'. Got {kind!r} instead.")
    n_samples = len(x)
    n_train, n_val = n_samples // 2, n_samples // 4
    splits = {
        "train": slice(0, n_train),
        "validation": slice(n_train, n_train + n_val),
        "test": slice(n_train + n_val, n_samples),
    }
    scaler = StandardScaler().fit(x[splits["train"]])
    z = scaler.transform(x)
    if kind == "lr":
        model = LogisticRegression(max_iter=1000).fit(z[splits["train"]], y[splits["train"]])
        layers = (Layer(model.coef_.T.copy(), model.intercept_.copy()),)
    else:
        model = MLPClassifier(
            hidden_layer_sizes=hidden_layers,
            activation="relu",
            max_iter=500,
            early_stopping=False,
            random_state=seed,
        ).fit(z[splits["train"]], y[splits["train"]])
        layers = tuple(
            Layer(w.copy(), b.copy()) for w, b in zip(model.coefs_, model.intercepts_, strict=True)
        )
    accuracy = {
        f"{name}_accuracy": float(model.score(z[part], y[part])) for name, part in splits.items()
    }
    metadata = {
        **(metadata or {}),
        "seed": seed,
        "n_samples": n_samples,
        "split": [0.5, 0.25, 0.25],
        "hidden_layers": list(hidden_layers) if kind == "mlp" else [],
        "scikit_learn": sklearn.__version__,
        # The training range per feature: CARMA's cost divides by it.
        "train_min": x[splits["train"]].min(axis=0).tolist(),
        "train_max": x[splits["train"]].max(axis=0).tolist(),
        **accuracy,
    }
    return Classifier.from_dict(
        Classifier(
            kind,
            tuple(feature_names),
            scaler.mean_.copy(),
            scaler.scale_.copy(),
            layers,
            0.5,
            metadata,
        ).to_dict()
    )
