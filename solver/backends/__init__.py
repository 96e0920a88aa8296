"""The registry of solver backends, by the names the CLI uses."""

from __future__ import annotations

import importlib

from solver.backends.base import Backend, BackendUnavailableError

# name -> (module, class); imported on demand so a missing optional library only
# affects its own backend.
_REGISTRY: dict[str, tuple[str, str]] = {
    "highs": ("solver.backends.highs", "HighsBackend"),
    "ortools": ("solver.backends.ortools", "OrToolsBackend"),
    "pyomo": ("solver.backends.pyomo", "PyomoBackend"),
}
DEFAULT_BACKEND = "highs"


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise ValueError(f"The backend must be one of {list(_REGISTRY)}. Got {name!r} instead.")
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"The backend {name!r} cannot be imported: {exc}") from None
    return getattr(module, class_name)


def create_backend(name: str) -> Backend:
    """A ready backend, or BackendUnavailableError naming what is missing."""
    cls = backend_class(name)
    if not cls.available():
        raise BackendUnavailableError(
            f"The backend {name!r} is not available here (its solver library is missing)."
        )
    return cls()


def available_backends() -> tuple[str, ...]:
    names = []
    for name in _REGISTRY:
        try:
            if backend_class(name).available():
                names.append(name)
        except BackendUnavailableError:
            continue
    return tuple(names)
