"""What changed between two versions of a graph, in terms a person reads: nodes added and
removed, fields of a node changed (config keys one by one), edges added and removed, policies
changed. Pure: two specs in, a SpecDiff out. Where a node sits on the canvas is not a change
to what the graph does, so positions are reported apart, as "moved"."""

import json
from dataclasses import dataclass, field
from typing import Any

from apps.audit.diff import compact
from apps.graphs.validation import DEFAULT_PORT, as_edge

JSON = dict[str, Any]
# Node keys that are layout, not behaviour.
LAYOUT_KEYS = {"position"}


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any  # MISSING when the field was added
    after: Any  # MISSING when the field was removed

    @property
    def kind(self) -> str:
        if self.before is MISSING:
            return "added"
        if self.after is MISSING:
            return "removed"
        return "changed"

    def before_text(self) -> str:
        return _text(self.before)

    def after_text(self) -> str:
        return _text(self.after)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class NodeChange:
    id: str
    type: str
    changes: list[FieldChange]


@dataclass(frozen=True)
class EdgeRef:
    source: str
    target: str
    port: str

    def __str__(self) -> str:
        port = "" if self.port == DEFAULT_PORT else f" [{self.port}]"
        return f"{self.source} → {self.target}{port}"


@dataclass
class SpecDiff:
    added_nodes: list[JSON] = field(default_factory=list)
    removed_nodes: list[JSON] = field(default_factory=list)
    changed_nodes: list[NodeChange] = field(default_factory=list)
    moved_nodes: list[str] = field(default_factory=list)
    added_edges: list[EdgeRef] = field(default_factory=list)
    removed_edges: list[EdgeRef] = field(default_factory=list)
    policy_changes: list[FieldChange] = field(default_factory=list)

    @property
    def behaviour_changed(self) -> bool:
        """Whether anything but positions differs."""
        return any(
            (
                self.added_nodes,
                self.removed_nodes,
                self.changed_nodes,
                self.added_edges,
                self.removed_edges,
                self.policy_changes,
            )
        )

    def summary(self) -> str:
        parts = [
            _count(len(self.added_nodes), "node added", "nodes added"),
            _count(len(self.removed_nodes), "node removed", "nodes removed"),
            _count(len(self.changed_nodes), "node changed", "nodes changed"),
            _count(len(self.added_edges), "edge added", "edges added"),
            _count(len(self.removed_edges), "edge removed", "edges removed"),
            _count(len(self.policy_changes), "policy changed", "policies changed"),
            _count(len(self.moved_nodes), "node moved", "nodes moved"),
        ]
        return ", ".join(part for part in parts if part) or "no changes"


def diff_specs(old: JSON, new: JSON) -> SpecDiff:
    diff = SpecDiff()
    old_nodes = {node["id"]: node for node in old.get("nodes", [])}
    new_nodes = {node["id"]: node for node in new.get("nodes", [])}
    diff.added_nodes = [node for id_, node in new_nodes.items() if id_ not in old_nodes]
    diff.removed_nodes = [node for id_, node in old_nodes.items() if id_ not in new_nodes]
    for id_, after in new_nodes.items():
        before = old_nodes.get(id_)
        if before is None:
            continue
        changes = _field_changes(_behaviour(before), _behaviour(after))
        if changes:
            diff.changed_nodes.append(NodeChange(id_, after["type"], changes))
        if before.get("position") != after.get("position"):
            diff.moved_nodes.append(id_)
    old_edges, new_edges = _edge_set(old), _edge_set(new)
    diff.added_edges = [edge for edge in new_edges if edge not in old_edges]
    diff.removed_edges = [edge for edge in old_edges if edge not in new_edges]
    diff.policy_changes = _field_changes(old.get("policies", {}), new.get("policies", {}))
    return diff


def _behaviour(node: JSON) -> JSON:
    return {key: value for key, value in node.items() if key not in LAYOUT_KEYS and key != "id"}


def _flatten(value: JSON, prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted keys, one level per object; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return flat


def _field_changes(before: JSON, after: JSON) -> list[FieldChange]:
    old, new = _flatten(before), _flatten(after)
    changes = []
    for name in sorted(old.keys() | new.keys()):
        was, now = old.get(name, MISSING), new.get(name, MISSING)
        # Compared as JSON: in Python 1 == True == 1.0, in a spec they differ.
        if was is MISSING or now is MISSING or compact(was) != compact(now):
            changes.append(FieldChange(name, was, now))
    return changes


def _edge_set(spec: JSON) -> list[EdgeRef]:
    edges: list[EdgeRef] = []
    for item in spec.get("edges", []):
        edge = EdgeRef(*as_edge(item))
        if edge not in edges:
            edges.append(edge)
    return edges


def _text(value: Any) -> str:
    if value is MISSING:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _count(n: int, one: str, many: str) -> str:
    if n == 0:
        return ""
    return f"1 {one}" if n == 1 else f"{n} {many}"
