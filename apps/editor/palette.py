"""The editor's palette: every registered operator, grouped by kind, with what the canvas
needs to draw it (ports) and what the config form needs (the schema). Built from the one
operator registry, so a new operator appears in the editor without touching it."""

from dataclasses import dataclass
from typing import Any

from workers.operators import REGISTRY, Operator

JSON = dict[str, Any]

# Kind = the part of the type name before the first dot; listed in the order a graph reads.
KIND_TITLES = {
    "source": "Sources",
    "transform": "Transforms",
    "route": "Routing",
    "fanout": "Fan-out",
    "collect": "Fan-in",
    "llm": "Inference",
    "tool": "Tools",
    "sink": "Sinks",
}
OTHER_KIND = "Other"


@dataclass(frozen=True)
class PaletteItem:
    type: str
    kind: str
    description: str
    has_input: bool
    # Output ports known without a config; a route.switch's come from its cases.
    outputs: list[str]

    def as_json(self) -> JSON:
        return {
            "type": self.type,
            "kind": self.kind,
            "description": self.description,
            "has_input": self.has_input,
            "outputs": self.outputs,
        }


@dataclass(frozen=True)
class PaletteGroup:
    kind: str
    title: str
    items: list[PaletteItem]


def kind_of(type_name: str) -> str:
    return type_name.split(".", 1)[0]


def _item(operator: Operator) -> PaletteItem:
    return PaletteItem(
        type=operator.type_name,
        kind=kind_of(operator.type_name),
        description=operator.description,
        has_input=not operator.is_source,
        outputs=sorted(operator.output_ports({})),
    )


def palette() -> list[PaletteGroup]:
    groups: dict[str, list[PaletteItem]] = {}
    for operator in REGISTRY.values():
        groups.setdefault(kind_of(operator.type_name), []).append(_item(operator))
    order = list(KIND_TITLES)
    kinds = sorted(groups, key=lambda kind: order.index(kind) if kind in order else len(order))
    return [
        PaletteGroup(kind, KIND_TITLES.get(kind, OTHER_KIND), sorted(groups[kind], key=_by_type))
        for kind in kinds
    ]


def _by_type(item: PaletteItem) -> str:
    return item.type


def node_outputs(node: JSON) -> list[str]:
    """The output ports a node has with its current config (unknown type: none)."""
    operator = REGISTRY.get(node.get("type", ""))
    if operator is None:
        return []
    config = node.get("config", {})
    try:
        return sorted(operator.output_ports(config if isinstance(config, dict) else {}))
    except (AttributeError, TypeError):  # a config the form has not made valid yet
        return []
