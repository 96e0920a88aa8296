"""Built-in instances: causal models, trained classifiers and example individuals.

Read through ``importlib.resources`` so they work from an installed package, whatever the
working directory.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from models.classifiers import Classifier
from models.scm import StructuralCausalModel

DATASETS = ("loan", "gsmc")
CLASSIFIER_KINDS = ("lr", "mlp")


class UnknownInstanceError(ValueError):
    """A built-in dataset or classifier name that does not exist."""


def _dataset_dir(dataset: str) -> resources.abc.Traversable:
    if dataset not in DATASETS:
        raise UnknownInstanceError(
            f"The dataset must be one of {list(DATASETS)}. Got {dataset!r} instead."
        )
    return resources.files("instances") / dataset


def load_scm(dataset: str, variant: str | None = None) -> StructuralCausalModel:
    """The built-in causal model ``dataset`` (optionally a named variant of it)."""
    return StructuralCausalModel.from_json(
        (_dataset_dir(dataset) / "scm.json").read_text(), variant
    )


def load_classifier(dataset: str, kind: str) -> Classifier:
    """The built-in trained classifier ``kind`` ('lr' or 'mlp') of ``dataset``."""
    if kind not in CLASSIFIER_KINDS:
        raise UnknownInstanceError(
            f"The classifier must be one of {list(CLASSIFIER_KINDS)}. Got {kind!r} instead."
        )
    return Classifier.from_json((_dataset_dir(dataset) / f"classifier_{kind}.json").read_text())


def load_example(dataset: str) -> dict[str, Any]:
    """The example instance document shipped with ``dataset``."""
    return json.loads((_dataset_dir(dataset) / "example_person.json").read_text())


def classifier_path(dataset: str, kind: str) -> resources.abc.Traversable:
    return _dataset_dir(dataset) / f"classifier_{kind}.json"
