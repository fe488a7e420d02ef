"""A node's config form: its fields from the operator's schema, and a submitted form turned
into the node's new JSON with errors on the fields they concern.

The canvas holds the unsaved graph, so each request carries the node and the whole spec as
the browser has them; the server keeps nothing between requests. A node is checked inside
that spec with the same validator that guards saving, and only the errors about this node's
id, label, config, retries and deadline are shown on the form (an unconnected node is not
the form's problem; Validate and Save report it on the canvas)."""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from django.http import QueryDict

from apps.editor.schema_forms import (
    ChoicesFor,
    SchemaField,
    fields_as_typed,
    fields_for,
    parse_fields,
)
from apps.graphs.validation import (
    DEFAULT_BACKOFF_S,
    DEFAULT_MAX_ATTEMPTS,
    NODE_ID_PATTERN,
    NODE_ID_RULE,
    SPEC_SCHEMA,
    SpecError,
    validate_spec,
)
from workers.operators import REGISTRY

JSON = dict[str, Any]
CONFIG_PREFIX = "cfg."
STEP_PREFIX = "step."
_NODE_PROPERTIES = SPEC_SCHEMA["properties"]["nodes"]["items"]["properties"]
# A node's own settings beside its config: retries and the step's deadline, with the bounds
# the spec schema gives them. Form name -> (where it lives in the node).
STEP_SCHEMA: JSON = {
    "type": "object",
    "properties": {
        "max_attempts": _NODE_PROPERTIES["retry"]["properties"]["max_attempts"],
        "backoff_s": _NODE_PROPERTIES["retry"]["properties"]["backoff_s"],
        "step_ttl_s": _NODE_PROPERTIES["ttl_s"],
    },
}
STEP_HELP = {
    "max_attempts": f"Attempts in all before the step is dead (default {DEFAULT_MAX_ATTEMPTS}).",
    "backoff_s": f"Seconds before the first retry, then doubling (default {DEFAULT_BACKOFF_S:g}).",
    "step_ttl_s": "The step is skipped if not finished this many seconds after it became ready.",
}
LABEL_MAX = 100


class BadRequest(ValueError):
    """The browser sent something no form of ours produces."""


@dataclass
class NodeForm:
    node_id: str
    type: str
    description: str
    label: str
    fields: list[SchemaField]
    step_fields: list[SchemaField]
    id_error: str = ""
    label_error: str = ""
    other_errors: list[str] = field(default_factory=list)

    @property
    def has_errors(self) -> bool:
        return bool(
            self.id_error
            or self.label_error
            or self.other_errors
            or any(f.error for f in [*self.fields, *self.step_fields])
        )


def load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise BadRequest(f"{what} is not valid JSON") from exc


def node_and_spec(data: QueryDict) -> tuple[JSON, JSON]:
    node, spec = load_json(data.get("node", ""), "node"), load_json(data.get("spec", ""), "spec")
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise BadRequest("node must be an object with a type")
    if node["type"] not in REGISTRY:
        raise BadRequest(f"unknown operator type {node['type']!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("nodes"), list):
        raise BadRequest("spec must be an object with a list of nodes")
    return node, spec


def form_for(node: JSON, choices_for: ChoicesFor) -> NodeForm:
    operator = REGISTRY[node["type"]]
    config = node.get("config") if isinstance(node.get("config"), dict) else {}
    return NodeForm(
        node_id=str(node.get("id", "")),
        type=operator.type_name,
        description=operator.description,
        label=str(node.get("label", "")),
        fields=fields_for(operator.config_schema, config or {}, choices_for),
        step_fields=_step_fields(node),
    )


def _step_fields(node: JSON) -> list[SchemaField]:
    retry = node.get("retry") if isinstance(node.get("retry"), dict) else {}
    values = {
        "max_attempts": (retry or {}).get("max_attempts"),
        "backoff_s": (retry or {}).get("backoff_s"),
        "step_ttl_s": node.get("ttl_s"),
    }
    return _with_help(fields_for(STEP_SCHEMA, values))


def _with_help(fields: list[SchemaField]) -> list[SchemaField]:
    for schema_field in fields:
        schema_field.help = STEP_HELP[schema_field.name]
    return fields


def _with_step_settings(node: JSON, settings: JSON) -> JSON:
    """`node` with retry and ttl_s as the form set them; an emptied field is removed."""
    updated = {key: value for key, value in node.items() if key not in ("retry", "ttl_s")}
    retry = {key: settings[key] for key in ("max_attempts", "backoff_s") if key in settings}
    if retry:
        updated["retry"] = retry
    if "step_ttl_s" in settings:
        updated["ttl_s"] = settings["step_ttl_s"]
    return updated


def apply(
    node: JSON, spec: JSON, data: QueryDict, choices_for: ChoicesFor
) -> tuple[JSON, NodeForm]:
    """The node as the form describes it, and the form re-rendered with any errors."""
    operator = REGISTRY[node["type"]]
    config, config_errors = parse_fields(operator.config_schema, data, CONFIG_PREFIX)
    settings, step_errors = parse_fields(STEP_SCHEMA, data, STEP_PREFIX)
    new_id = data.get("node_id", "").strip()
    label = data.get("label", "").strip()
    updated = {
        key: value
        for key, value in _with_step_settings(node, settings).items()
        if key not in ("config", "label")
    }
    updated["id"] = new_id
    if config:
        updated["config"] = config
    if label:
        updated["label"] = label
    form = NodeForm(
        node_id=new_id,
        type=operator.type_name,
        description=operator.description,
        label=label,
        fields=fields_as_typed(
            operator.config_schema, data, CONFIG_PREFIX, config_errors, choices_for
        ),
        step_fields=_with_help(fields_as_typed(STEP_SCHEMA, data, STEP_PREFIX, step_errors)),
    )
    form.id_error = _id_error(new_id, str(node.get("id", "")), spec)
    form.label_error = f"At most {LABEL_MAX} characters." if len(label) > LABEL_MAX else ""
    if not config_errors and not step_errors and not form.id_error:
        _attach_spec_errors(form, _errors_about(updated, node, spec))
    return updated, form


def _id_error(new_id: str, old_id: str, spec: JSON) -> str:
    if not new_id:
        return "Every node needs an id."
    if not re.match(NODE_ID_PATTERN, new_id):
        return "The id " + NODE_ID_RULE + "."
    others = {n.get("id") for n in spec["nodes"] if isinstance(n, dict)} - {old_id}
    if new_id in others:
        return f"Another node is already called {new_id!r}."
    return ""


def _errors_about(updated: JSON, original: JSON, spec: JSON) -> list[SpecError]:
    """The validator's errors about this node, checked inside the rest of the graph."""
    old_id = original.get("id")
    others = [n for n in spec["nodes"] if isinstance(n, dict) and n.get("id") != old_id]
    nodes = [*others, updated]
    edges = [_renamed(e, old_id, updated["id"]) for e in spec.get("edges", [])]
    where = f"node '{updated['id']}'"
    return [
        error
        for error in validate_spec({**spec, "nodes": nodes, "edges": edges})
        if error.where == where
        and (error.field.startswith(("config", "retry.")) or error.field in _NODE_KEYS)
    ]


# Node-level fields an operator's own check may name (llm.generate: resources.queue).
_NODE_KEYS = {"id", "label", "type", "resources.queue", "ttl_s"}
# Where a validator error about a node's own settings goes on the form.
_STEP_FIELD_OF = {
    "retry.max_attempts": "max_attempts",
    "retry.backoff_s": "backoff_s",
    "ttl_s": "step_ttl_s",
}


def _renamed(edge: Any, old: Any, new: str) -> Any:
    if not isinstance(edge, list):
        return edge
    return [new if i < 2 and end == old else end for i, end in enumerate(edge)]


def _attach_spec_errors(form: NodeForm, errors: list[SpecError]) -> None:
    by_name = {f.name: f for f in form.fields}
    step_fields = {f.name: f for f in form.step_fields}
    for error in errors:
        step_field = step_fields.get(_STEP_FIELD_OF.get(error.field, ""))
        if step_field is not None:
            step_field.error = step_field.error or error.message[:1].upper() + error.message[1:]
            continue
        name = error.field.removeprefix("config").lstrip(".").split(".", 1)[0].split("[", 1)[0]
        target = by_name.get(name) if error.field.startswith("config") else None
        message = error.message[:1].upper() + error.message[1:]
        if target is not None and not target.error:
            target.error = message
        elif error.field == "id":
            form.id_error = form.id_error or message
        else:
            form.other_errors.append(f"{error.field}: {message}" if error.field else message)
