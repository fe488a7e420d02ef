"""Where the run page draws a graph's nodes and edges: pure geometry, spec in, positions out.

Nodes go in columns (layers) left to right by the longest path from a source, so every
edge points right and a node sits after everything that feeds it. Within a column, one
pass orders nodes by the mean height of their parents, which keeps most edges short.
A spec has at most 500 nodes and validation refuses cycles; should one get here anyway,
its nodes are still placed (after their placed parents) rather than lost."""

from collections import deque
from dataclasses import dataclass
from typing import Any

from apps.graphs.validation import as_edge

NODE_WIDTH = 200
NODE_HEIGHT = 86
GAP_X = 72  # between columns: room for the edges and their port labels
GAP_Y = 22
MARGIN = 12
WAYPOINT_HEIGHT = 8  # the slot an edge takes in a column it crosses

Slot = tuple[str, int]  # (node id, -1) for a node; ("edge <index>", its column) for a waypoint


@dataclass(frozen=True)
class PlacedNode:
    id: str
    type: str
    layer: int
    x: float  # top-left corner of the box
    y: float


@dataclass(frozen=True)
class PlacedEdge:
    source: str
    target: str
    port: str
    path: str  # SVG path data, from the source's right side to the target's left side
    mid_x: float  # where a port label goes
    mid_y: float


@dataclass(frozen=True)
class GraphLayout:
    nodes: list[PlacedNode]
    edges: list[PlacedEdge]
    width: float
    height: float


def _edges(spec: dict[str, Any], known: set[str]) -> list[tuple[str, str, str]]:
    """(source, target, port) for each edge between known nodes, in the spec's order."""
    edges = [as_edge(item) for item in spec.get("edges", [])]
    return [edge for edge in edges if edge.source in known and edge.target in known]


def layers(spec: dict[str, Any]) -> dict[str, int]:
    """Each node's layer: 0 for a node nothing feeds, else one past its furthest parent."""
    order = [node["id"] for node in spec["nodes"]]
    parents: dict[str, list[str]] = {node_id: [] for node_id in order}
    children: dict[str, list[str]] = {node_id: [] for node_id in order}
    for source, target, _ in _edges(spec, set(order)):
        parents[target].append(source)
        children[source].append(target)
    waiting = {node_id: len(parents[node_id]) for node_id in order}
    ready = deque(node_id for node_id in order if not waiting[node_id])
    layer: dict[str, int] = {}
    while ready:  # Kahn's order: a node's parents all have layers before it does
        node_id = ready.popleft()
        layer[node_id] = max((layer[p] + 1 for p in parents[node_id]), default=0)
        for child in children[node_id]:
            waiting[child] -= 1
            if not waiting[child]:
                ready.append(child)
    for node_id in order:  # only on a cycle: after whichever parents were placed
        if node_id not in layer:
            layer[node_id] = max((layer[p] + 1 for p in parents[node_id] if p in layer), default=0)
    return layer


def layout(spec: dict[str, Any]) -> GraphLayout:
    layer_of = layers(spec)
    types = {node["id"]: str(node.get("type", "")) for node in spec["nodes"]}
    edges = _edges(spec, set(layer_of))
    # An edge that skips columns gets a waypoint in each column it crosses, which takes a
    # slot there like a thin node, so the edge passes between boxes rather than behind them.
    items: dict[Slot, int] = {(node_id, -1): layer for node_id, layer in layer_of.items()}
    feeds: dict[Slot, list[Slot]] = {slot: [] for slot in items}
    routes: list[tuple[str, str, str, list[Slot]]] = []
    for number, (source, target, port) in enumerate(edges):
        chain: list[Slot] = [(source, -1)]
        for layer in range(layer_of[source] + 1, layer_of[target]):
            waypoint = (f"edge {number}", layer)
            items[waypoint] = layer
            feeds[waypoint] = [chain[-1]]
            chain.append(waypoint)
        feeds[(target, -1)].append(chain[-1])
        routes.append((source, target, port, chain[1:]))

    columns: list[list[Slot]] = [[] for _ in range(max(items.values(), default=-1) + 1)]
    for slot, layer in items.items():  # nodes in the spec's order, then waypoints
        columns[layer].append(slot)
    height = max((_column_height(column) for column in columns), default=0) + 2 * MARGIN

    centre_y: dict[Slot, float] = {}
    for number, column in enumerate(columns):
        if number:  # by the mean height of what feeds each slot; the spec's order breaks ties
            order = {slot: i for i, slot in enumerate(column)}
            column.sort(key=lambda slot: (_mean_of(feeds[slot], centre_y), order[slot]))
        y = (height - _column_height(column)) / 2
        for slot in column:
            centre_y[slot] = y + _slot_height(slot) / 2
            y += _slot_height(slot) + GAP_Y

    nodes = [
        PlacedNode(
            node_id,
            types[node_id],
            layer,
            _column_x(layer),
            centre_y[(node_id, -1)] - NODE_HEIGHT / 2,
        )
        for node_id, layer in layer_of.items()
    ]
    at = {node.id: node for node in nodes}
    return GraphLayout(
        nodes=sorted(nodes, key=lambda node: (node.layer, node.y)),
        edges=[
            _edge(at[source], at[target], port, [(items[w], centre_y[w]) for w in waypoints])
            for source, target, port, waypoints in routes
        ],
        width=len(columns) * (NODE_WIDTH + GAP_X) - GAP_X + 2 * MARGIN if columns else 2 * MARGIN,
        height=height,
    )


def _slot_height(slot: Slot) -> float:
    return NODE_HEIGHT if slot[1] < 0 else WAYPOINT_HEIGHT


def _column_height(column: list[Slot]) -> float:
    return sum(_slot_height(slot) for slot in column) + GAP_Y * (len(column) - 1)


def _column_x(layer: int) -> float:
    return MARGIN + layer * (NODE_WIDTH + GAP_X)


def _mean_of(slots: list[Slot], centre_y: dict[Slot, float]) -> float:
    heights = [centre_y[slot] for slot in slots if slot in centre_y]
    return sum(heights) / len(heights) if heights else 0.0


def _edge(
    source: PlacedNode, target: PlacedNode, port: str, waypoints: list[tuple[int, float]]
) -> PlacedEdge:
    """Curves from the source's right side to the target's left side, straight across each
    column it passes (waypoints: column, height). The first curve is symmetric, so its
    midpoint, where a port label goes, is the midpoint of its ends."""
    x, y = source.x + NODE_WIDTH, source.y + NODE_HEIGHT / 2
    path = [f"M{x:g},{y:g}"]
    stops = [(_column_x(layer), height) for layer, height in waypoints]
    stops.append((target.x, target.y + NODE_HEIGHT / 2))
    mid_x, mid_y = (x + stops[0][0]) / 2, (y + stops[0][1]) / 2
    for number, (x2, y2) in enumerate(stops):
        bend = max(abs(x2 - x) / 2, GAP_X / 2)
        path.append(f"C{x + bend:g},{y:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}")
        x, y = x2, y2
        if number < len(stops) - 1:
            x += NODE_WIDTH
            path.append(f"H{x:g}")
    return PlacedEdge(source.id, target.id, port, " ".join(path), mid_x, mid_y)
