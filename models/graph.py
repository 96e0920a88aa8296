"""A causal graph as data: parents, role and optional bounds per feature, read from TOML.

The file has one table per feature (node), in any order::

    [age]
    role = "immutable"

    [income]
    role = "actionable"
    parents = ["age", "education"]
    bounds = [0, 20000]        # optional: the values an intervention may set

``role`` is required (``immutable``, ``actionable`` or ``non_actionable``); ``parents``
defaults to none. The graph must be acyclic, and an immutable node cannot have a parent
that an action can move. :meth:`CausalGraph.order` lists the nodes parents first.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.scm import Role

NODE_KEYS = ("role", "parents", "bounds")


class GraphError(ValueError):
    """A causal graph breaks a rule; the message names the node and the value."""


@dataclass(frozen=True)
class Node:
    """One feature of the graph."""

    name: str
    role: Role
    parents: tuple[str, ...]
    bounds: tuple[float, float] | None


@dataclass(frozen=True)
class CausalGraph:
    """A validated DAG; :attr:`nodes` are in topological order (parents first)."""

    nodes: tuple[Node, ...]

    @property
    def order(self) -> tuple[str, ...]:
        """The node names, parents first."""
        return tuple(node.name for node in self.nodes)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> CausalGraph:
        """Check a parsed graph document (see the module docstring) and order its nodes."""
        if not document:
            raise GraphError("The graph must have at least one node (a [feature] table).")
        nodes = {name: _parse_node(name, raw) for name, raw in document.items()}
        for node in nodes.values():
            unknown = [p for p in node.parents if p not in nodes]
            if unknown:
                raise GraphError(
                    f"The 'parents' of node {node.name!r} must be nodes of the graph. Got "
                    f"{unknown} instead; give each parent its own [{unknown[0]}] table."
                )
        ordered = _topological_order(nodes)
        _check_roles(ordered)
        return cls(tuple(ordered))

    @classmethod
    def from_toml(cls, text: str, *, where: str = "the graph") -> CausalGraph:
        """Parse and check a TOML graph; ``where`` names it in error messages."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GraphError(f"{where[:1].upper()}{where[1:]} is not valid TOML: {exc}.") from None
        return cls.from_dict(document)


def read_graph(path: Path) -> CausalGraph:
    """Read and check a TOML graph file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GraphError(f"The graph file {path.name} cannot be read: {exc}.") from None
    return CausalGraph.from_toml(text, where=f"the graph file {path.name}")


def _parse_node(name: str, raw: Any) -> Node:
    if not name.isidentifier():
        raise GraphError(
            f"The node {name!r} must be a name of letters, digits and underscores that does "
            f"not start with a digit (equations refer to it); rename the column."
        )
    if not isinstance(raw, Mapping):
        raise GraphError(
            f"The node {name!r} must be a table with 'role' and optional 'parents' and "
            f"'bounds'. Got {raw!r} instead."
        )
    unknown = sorted(set(raw) - set(NODE_KEYS))
    if unknown:
        raise GraphError(
            f"The node {name!r} has unknown keys {unknown}; allowed keys are {list(NODE_KEYS)}."
        )
    try:
        role = Role(raw.get("role"))
    except ValueError:
        raise GraphError(
            f"The 'role' of node {name!r} must be one of {[r.value for r in Role]}. "
            f"Got {raw.get('role')!r} instead."
        ) from None
    parents = raw.get("parents", [])
    if (
        not isinstance(parents, list)
        or not all(isinstance(p, str) for p in parents)
        or len(set(parents)) != len(parents)
    ):
        raise GraphError(
            f"The 'parents' of node {name!r} must be a list of distinct node names. "
            f"Got {parents!r} instead."
        )
    if name in parents:
        raise GraphError(f"The 'parents' of node {name!r} must not include the node itself.")
    bounds = raw.get("bounds")
    if bounds is not None and not (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        and bounds[0] < bounds[1]
    ):
        raise GraphError(
            f"The 'bounds' of node {name!r} must be [lower, upper] with lower < upper. "
            f"Got {bounds!r} instead."
        )
    return Node(
        name,
        role,
        tuple(parents),
        None if bounds is None else (float(bounds[0]), float(bounds[1])),
    )


def _topological_order(nodes: Mapping[str, Node]) -> list[Node]:
    """Parents first; among nodes that are ready, the file's order (Kahn's algorithm)."""
    placed: list[Node] = []
    done: set[str] = set()
    remaining = list(nodes.values())
    while remaining:
        ready = [node for node in remaining if set(node.parents) <= done]
        if not ready:
            raise GraphError(f"The graph has a cycle: {' -> '.join(_cycle(remaining))}.")
        for node in ready:
            placed.append(node)
            done.add(node.name)
        remaining = [node for node in remaining if node.name not in done]
    return placed


def _cycle(nodes: list[Node]) -> list[str]:
    """One cycle among ``nodes``, every one of which has a parent among them."""
    names = {node.name for node in nodes}
    parents = {node.name: [p for p in node.parents if p in names] for node in nodes}
    path = [nodes[0].name]
    while path.count(path[-1]) < 2:
        path.append(parents[path[-1]][0])
    start = path.index(path[-1])
    return list(reversed(path[start:]))


def _check_roles(nodes: list[Node]) -> None:
    movable: set[str] = set()
    for node in nodes:
        moved_by = [p for p in node.parents if p in movable]
        if node.role is Role.IMMUTABLE and moved_by:
            raise GraphError(
                f"The node {node.name!r} is 'immutable' but its parent {moved_by[0]!r} can be "
                f"moved by an action (it is actionable or downstream of one); make "
                f"{node.name!r} 'non_actionable'."
            )
        if node.role is Role.ACTIONABLE or moved_by:
            movable.add(node.name)
