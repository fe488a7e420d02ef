"""Validation of a graph version's spec, and the small readers the engine uses on a valid one.

`validate_spec` is a pure function: no database, no settings. It returns every problem it
can find, each naming where it is (a node, an edge, the policies or the spec as a whole) and
which field, so the editor, the API and the CLI can all point at it. Stages run in order and
a later stage is skipped when an earlier failure would only make it report noise.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from workers.operators import REGISTRY
from workers.operators.builtin import Split
from workers.queues import Queue

JSON = dict[str, Any]

MAX_NODES = 500
MAX_SPEC_BYTES = 256 * 1024
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 1.0
DEFAULT_PORT = "out"

# `(?!\n)` stops Python's `$` from accepting a trailing newline; it is a no-op in ECMAScript.
NODE_ID_PATTERN = r"^[a-z][a-z0-9_-]{0,63}(?!\n)$"
NODE_ID_RULE = (
    "must start with a lowercase letter followed by up to 63 lowercase letters, digits, '_' or '-'"
)
EDGE_SHAPE_RULE = "must be [from, to] or [from, to, port]"
EDGE_ITEMS = ("from", "to", "port")

_NODE_SCHEMA: JSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "type"],
    "properties": {
        "id": {"type": "string", "pattern": NODE_ID_PATTERN},
        "type": {"type": "string"},
        "config": {"type": "object"},
        "retry": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
                "backoff_s": {"type": "number", "minimum": 0, "maximum": 3600},
            },
        },
        # The step must finish within this many seconds of becoming ready, else it is skipped
        # with reason "deadline" and counts as failed.
        "ttl_s": {"type": "integer", "minimum": 1, "maximum": 86400},
        # false: never run in a chain, even when cheap (each step gets its own message and
        # commit; for measuring or isolating a node).
        "chain": {"type": "boolean"},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"queue": {"enum": [queue.value for queue in Queue]}},
        },
        "label": {"type": "string", "maxLength": 100},
        "position": {
            "type": "object",
            "additionalProperties": False,
            "required": ["x", "y"],
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        },
    },
}

SPEC_SCHEMA: JSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["nodes"],
    "properties": {
        "nodes": {"type": "array", "minItems": 1, "maxItems": MAX_NODES, "items": _NODE_SCHEMA},
        "edges": {
            "type": "array",
            "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "string"}},
        },
        "policies": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ttl_s": {"type": "integer", "minimum": 1, "maximum": 86400},
                "budget_usd": {"type": "number", "minimum": 0},
                "max_fanout": {"type": "integer", "minimum": 1, "maximum": 100_000},
                "on_disconnect": {"enum": ["cancel", "detach"]},
                "disconnect_grace_s": {"type": "number", "minimum": 0, "maximum": 3600},
            },
        },
    },
}

_SPEC_VALIDATOR = Draft202012Validator(SPEC_SCHEMA)


@dataclass(frozen=True)
class SpecError:
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.where}: {self.field}: {self.message}"
        return f"{self.where}: {self.message}"


class SpecInvalid(Exception):
    def __init__(self, errors: list[SpecError]) -> None:
        super().__init__("; ".join(str(error) for error in errors))
        self.errors = errors


class Edge(NamedTuple):
    source: str
    target: str
    port: str


@dataclass
class _Graph:
    """The parts of a structurally sound spec that the later stages work on."""

    nodes: list[JSON]
    by_id: dict[str, JSON]
    edges: list[tuple[int, Edge]]  # well-formed edges only, with their index in the spec
    edges_well_formed: bool
    parents: dict[str, set[str]]
    duplicate_ids: bool = False
    all_types_known: bool = True
    schema_ok: set[str] = field(default_factory=set)  # config passed its operator's schema
    config_ok: set[str] = field(default_factory=set)  # ... and the operator's own check


# -- public API ---------------------------------------------------------------------------


def validate_spec(spec: object) -> list[SpecError]:
    """Every problem found in `spec`; [] when it is valid."""
    if not isinstance(spec, dict):
        return [SpecError("spec", "", f"spec must be a JSON object, got {_json_type(spec)}")]
    errors = _size_errors(spec)
    if errors:
        return errors
    errors = _schema_errors(spec)
    if not _nodes_usable(spec.get("nodes")):
        return errors
    graph = _build_graph(spec)
    errors += _duplicate_id_errors(graph)
    errors += _unknown_type_errors(graph)
    errors += _config_errors(graph)
    edge_errors = _edge_errors(graph)
    errors += edge_errors
    errors += _source_errors(graph)
    if graph.edges_well_formed and not edge_errors and not graph.duplicate_ids:
        errors += _cycle_errors(graph)
    errors += _collect_errors(graph)
    return errors


def check_spec(spec: object) -> JSON:
    """`spec` itself when it is valid; raises SpecInvalid with every problem otherwise."""
    errors = validate_spec(spec)
    if errors or not isinstance(spec, dict):
        raise SpecInvalid(errors)
    return spec


def node_queue(node: JSON) -> str:
    return REGISTRY[node["type"]].queue(node)


def node_max_attempts(node: JSON) -> int:
    return int(node.get("retry", {}).get("max_attempts", DEFAULT_MAX_ATTEMPTS))


def node_backoff_s(node: JSON) -> float:
    return float(node.get("retry", {}).get("backoff_s", DEFAULT_BACKOFF_S))


def node_ttl_s(node: JSON) -> int | None:
    ttl = node.get("ttl_s")
    return int(ttl) if ttl is not None else None


def spec_max_fanout(spec: JSON, default: int) -> int:
    return int(spec.get("policies", {}).get("max_fanout", default))


def source_node(spec: JSON) -> JSON:
    nodes: list[JSON] = spec["nodes"]
    for node in nodes:
        if _is_source(node):
            return node
    raise ValueError("the spec has no source node")


def downstream(spec: JSON, node_id: str, port: str) -> list[str]:
    """Targets of the edges leaving `node_id` on `port`, in the spec's order."""
    return [
        edge.target
        for edge in map(as_edge, spec.get("edges", []))
        if edge.source == node_id and edge.port == port
    ]


# -- stage 1: shape and size --------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", tuple: "array", str: "string", int: "integer"}
    for python_type, name in names.items():
        if isinstance(value, python_type):
            return name
    return "number" if isinstance(value, float) else type(value).__name__


def _size_errors(spec: JSON) -> list[SpecError]:
    try:
        size = len(json.dumps(spec, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        return [SpecError("spec", "", f"spec is not valid JSON: {exc}")]
    if size > MAX_SPEC_BYTES:
        return [SpecError("spec", "", f"spec is {size} bytes; the limit is {MAX_SPEC_BYTES} bytes")]
    return []


# -- stage 2: the top-level schema --------------------------------------------------------


def _path_key(path: Iterable[str | int]) -> list[tuple[int, int, str]]:
    return [(0, part, "") if isinstance(part, int) else (1, 0, part) for part in path]


def _sorted_errors(validator: Draft202012Validator, instance: object) -> list[ValidationError]:
    return sorted(validator.iter_errors(instance), key=lambda e: _path_key(e.absolute_path))


def _dotted(path: Iterable[str | int], prefix: str = "") -> str:
    text = prefix
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _schema_errors(spec: JSON) -> list[SpecError]:
    return [_translate(spec, error) for error in _sorted_errors(_SPEC_VALIDATOR, spec)]


def _translate(spec: JSON, error: ValidationError) -> SpecError:
    path = list(error.absolute_path)
    if not path:
        return SpecError("spec", "", error.message)
    head, rest = path[0], path[1:]
    if head == "nodes":
        return _node_schema_error(spec["nodes"], rest, error)
    if head == "edges":
        return _edge_schema_error(rest, error)
    if head == "policies":
        return SpecError("policies", _dotted(rest), error.message)
    return SpecError("spec", _dotted(path), error.message)


def _node_where(node: object, index: int) -> str:
    if isinstance(node, dict) and isinstance(node.get("id"), str):
        return f"node '{node['id']}'"
    return f"nodes[{index}]"


def _node_schema_error(
    nodes: list[Any], rest: list[str | int], error: ValidationError
) -> SpecError:
    if not rest:
        if error.validator == "maxItems":
            return SpecError("spec", "nodes", f"{len(nodes)} nodes; the limit is {MAX_NODES}")
        if error.validator == "minItems":
            return SpecError("spec", "nodes", "the graph needs at least one node")
        return SpecError("spec", "nodes", error.message)
    index, inner = int(rest[0]), rest[1:]
    message = error.message
    if inner == ["id"] and error.validator == "pattern":
        message = NODE_ID_RULE
    return SpecError(_node_where(nodes[index], index), _dotted(inner), message)


def _edge_schema_error(rest: list[str | int], error: ValidationError) -> SpecError:
    if not rest:
        return SpecError("spec", "edges", error.message)
    where = f"edge {rest[0]}"
    if len(rest) == 1:
        shape = error.validator in ("type", "minItems", "maxItems")
        return SpecError(where, "", EDGE_SHAPE_RULE if shape else error.message)
    item = rest[1]
    name = EDGE_ITEMS[item] if isinstance(item, int) and item < len(EDGE_ITEMS) else str(item)
    return SpecError(where, _dotted(rest[2:], name), error.message)


def _nodes_usable(nodes: object) -> bool:
    """Whether the node list is sound enough for the graph-level stages to make sense."""
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_NODES:
        return False
    return all(
        isinstance(node, dict)
        and isinstance(node.get("id"), str)
        and isinstance(node.get("type"), str)
        for node in nodes
    )


# -- the graph the later stages share -----------------------------------------------------


def as_edge(item: Sequence[str]) -> Edge:
    """A well-formed spec edge, [from, to] or [from, to, port], as an Edge."""
    return Edge(item[0], item[1], item[2] if len(item) > 2 else DEFAULT_PORT)


def _is_well_formed_edge(item: object) -> bool:
    return (
        isinstance(item, list)
        and 2 <= len(item) <= 3
        and all(isinstance(part, str) for part in item)
    )


def _build_graph(spec: JSON) -> _Graph:
    nodes: list[JSON] = spec["nodes"]
    raw_edges = spec.get("edges", [])
    items = list(enumerate(raw_edges)) if isinstance(raw_edges, list) else []
    edges = [(i, as_edge(item)) for i, item in items if _is_well_formed_edge(item)]
    parents: dict[str, set[str]] = {}
    for _, edge in edges:
        parents.setdefault(edge.target, set()).add(edge.source)
    by_id: dict[str, JSON] = {}
    for node in nodes:
        by_id.setdefault(node["id"], node)
    return _Graph(
        nodes=nodes,
        by_id=by_id,
        edges=edges,
        edges_well_formed=isinstance(raw_edges, list) and len(edges) == len(raw_edges),
        parents=parents,
    )


def _node_label(node: JSON) -> str:
    return f"node '{node['id']}'"


# -- stages 3 and 4: ids and types --------------------------------------------------------


def _duplicate_id_errors(graph: _Graph) -> list[SpecError]:
    seen: set[str] = set()
    reported: set[str] = set()
    errors = []
    for node in graph.nodes:
        node_id = node["id"]
        if node_id in seen and node_id not in reported:
            errors.append(SpecError(_node_label(node), "id", "is used by more than one node"))
            reported.add(node_id)
        seen.add(node_id)
    graph.duplicate_ids = bool(reported)
    return errors


def _unknown_type_errors(graph: _Graph) -> list[SpecError]:
    known = ", ".join(sorted(REGISTRY))
    errors = []
    for node in graph.nodes:
        if node["type"] not in REGISTRY:
            message = f"unknown operator type '{node['type']}' (known: {known})"
            errors.append(SpecError(_node_label(node), "type", message))
    graph.all_types_known = not errors
    return errors


# -- stage 5: each node's config ----------------------------------------------------------


@cache
def _config_validator(type_name: str) -> Draft202012Validator:
    return Draft202012Validator(REGISTRY[type_name].config_schema)


def _config_errors(graph: _Graph) -> list[SpecError]:
    errors: list[SpecError] = []
    for node in graph.nodes:
        config = node.get("config", {})
        if node["type"] in REGISTRY and isinstance(config, dict):
            errors += _node_config_errors(graph, node, config)
    return errors


def _config_message(error: ValidationError) -> str:
    """A pattern's rule in words when the operator's schema gives one ("x-rule")."""
    rule = error.schema.get("x-rule") if isinstance(error.schema, dict) else None
    if error.validator == "pattern" and isinstance(rule, str):
        return f"{error.instance!r} {rule}"
    return error.message


def _node_config_errors(graph: _Graph, node: JSON, config: JSON) -> list[SpecError]:
    where = _node_label(node)
    schema_errors = _sorted_errors(_config_validator(node["type"]), config)
    if schema_errors:
        return [
            SpecError(where, _dotted(e.absolute_path, "config"), _config_message(e))
            for e in schema_errors
        ]
    graph.schema_ok.add(node["id"])
    operator = REGISTRY[node["type"]]
    try:
        issues = operator.check(node["id"], config, graph.by_id, graph.parents)
    except RecursionError:
        return [SpecError(where, "config", "is nested too deeply to check")]
    if not issues:
        graph.config_ok.add(node["id"])
    return [
        SpecError(
            where,
            _dotted([issue.field], "config") if issue.in_config else issue.field,
            issue.message,
        )
        for issue in issues
    ]


# -- stage 6: edges -----------------------------------------------------------------------


def _edge_errors(graph: _Graph) -> list[SpecError]:
    errors: list[SpecError] = []
    seen: set[Edge] = set()
    into_source: set[str] = set()
    for index, edge in graph.edges:
        where = f"edge {index}"
        missing = [x for x in dict.fromkeys((edge.source, edge.target)) if x not in graph.by_id]
        if missing:
            errors += [SpecError(where, "", f"node '{x}' does not exist") for x in missing]
            continue
        if edge in seen:
            errors.append(SpecError(where, "", "duplicate edge"))
            continue
        seen.add(edge)
        errors += _port_errors(graph, where, edge)
        target = graph.by_id[edge.target]
        if _is_source(target) and edge.target not in into_source:
            into_source.add(edge.target)
            errors.append(SpecError(_node_label(target), "", "a source cannot have incoming edges"))
    return errors


def _is_source(node: JSON) -> bool:
    operator = REGISTRY.get(node["type"])
    return operator is not None and operator.is_source


def _port_errors(graph: _Graph, where: str, edge: Edge) -> list[SpecError]:
    source = graph.by_id[edge.source]
    if edge.source not in graph.schema_ok:
        return []  # unknown type or bad config: its ports are unknowable and already reported
    ports = REGISTRY[source["type"]].output_ports(source.get("config", {}))
    if edge.port in ports:
        return []
    listed = ", ".join(sorted(ports))
    message = f"node '{edge.source}' has no port '{edge.port}' (its ports: {listed})"
    return [SpecError(where, "", message)]


# -- stage 7: one source, everything reachable from it ------------------------------------


def _source_errors(graph: _Graph) -> list[SpecError]:
    if not graph.all_types_known:
        return []  # a mistyped source would be reported twice
    errors = []
    sources = [node for node in graph.nodes if _is_source(node)]
    if len(sources) != 1:
        message = f"the graph needs exactly one source node, found {len(sources)}"
        errors.append(SpecError("spec", "nodes", message))
    if graph.edges_well_formed:
        errors += _unreached_errors(graph)
    return errors


def _unreached_errors(graph: _Graph) -> list[SpecError]:
    targets = {edge.target for _, edge in graph.edges}
    message = "has no incoming edge; only the source node may start the graph"
    errors = []
    for node_id, node in graph.by_id.items():
        if node_id not in targets and not _is_source(node):
            errors.append(SpecError(_node_label(node), "", message))
    return errors


# -- stage 8: cycles ----------------------------------------------------------------------


def _cycle_errors(graph: _Graph) -> list[SpecError]:
    children: dict[str, list[str]] = {}
    for _, edge in graph.edges:
        children.setdefault(edge.source, []).append(edge.target)
    cycle = _find_cycle(list(graph.by_id), children)
    if cycle is None:
        return []
    return [SpecError("spec", "edges", "graph has a cycle: " + " -> ".join(cycle))]


def _find_cycle(order: list[str], children: dict[str, list[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], found by an iterative depth-first search, or None."""
    done: set[str] = set()
    for root in order:
        if root in done:
            continue
        path = [root]
        on_path = {root}
        stack = [iter(children.get(root, []))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                path.append(child)
                on_path.add(child)
                stack.append(iter(children.get(child, [])))
    return None


# -- stage 9: one collect per fan-out -----------------------------------------------------


def _collect_errors(graph: _Graph) -> list[SpecError]:
    collected_by: dict[str, str] = {}
    errors = []
    for node in graph.nodes:
        operator = REGISTRY.get(node["type"])
        if operator is None or not operator.is_collect or node["id"] not in graph.config_ok:
            continue
        by = node.get("config", {}).get("by")
        if not isinstance(by, str) or graph.by_id.get(by, {}).get("type") != Split.type_name:
            continue
        if by in collected_by:
            message = f"fan-out '{by}' is already collected by '{collected_by[by]}'"
            errors.append(SpecError(_node_label(node), "config.by", message))
        else:
            collected_by[by] = node["id"]
    return errors
