"""Form fields from a JSON schema, and the values typed into them back into JSON.

The editor renders a node's config form from its operator's `config_schema`, and the run
dialog renders the input form from the source's `input_schema`, with the same rules:
a string is a text input (a template or prompt a text area), a number a number input with
the schema's bounds, an enum a select, a boolean a checkbox, anything else (objects,
arrays) JSON in a text area. Parsing reports a message per field; whether the result
satisfies the schema is the validator's job (apps.graphs.validation), not this module's."""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]
# A field whose choices come from the tenant or the platform (models, secrets): name -> options.
ChoicesFor = Callable[[str], list[str] | None]

LONG_TEXT = {"prompt", "template"}
HELP = {
    "prompt": "A template: {{ field }} inserts a field of the incoming payload.",
    "template": "A template: {{ field }} inserts a field of the incoming payload.",
    "output": "The payload field the result is written to.",
    "input_schema": "A JSON schema the run's input must satisfy (JSON).",
    "example": "An example input, prefilled in run forms (JSON).",
    "cases": 'Value → output port, e.g. {"urgent": "fast", "other": "slow"} (JSON).',
    "by": "The id of the fanout.split node whose items this collects.",
    "auth_secret": "Sent as Authorization: Bearer <secret>. Add secrets in Settings → Secrets.",
    # The graph's policies.
    "ttl_s": "A run must finish within this many seconds, or it stops.",
    "budget_usd": "A run stops when its model calls have cost this much.",
    "max_fanout": "The most items one fan-out may produce.",
    "on_disconnect": "cancel: stop a run when its last viewer leaves; detach: keep it running.",
    "disconnect_grace_s": "How long a cancel-on-disconnect run waits for a viewer to return.",
}


@dataclass
class SchemaField:
    name: str
    widget: str  # text | textarea | number | select | checkbox | json
    required: bool
    value: str
    help: str = ""
    choices: list[str] = field(default_factory=list)
    step: str = "any"
    minimum: str = ""
    maximum: str = ""
    error: str = ""

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()

    @property
    def checked(self) -> bool:
        return self.value == "true"


def fields_for(
    schema: JSON, values: Mapping[str, Any], choices_for: ChoicesFor = lambda name: None
) -> list[SchemaField]:
    """One field per property of an object schema, filled with `values`."""
    required = set(schema.get("required", []))
    return [
        _field(name, prop if isinstance(prop, dict) else {}, name in required, values, choices_for)
        for name, prop in schema.get("properties", {}).items()
    ]


def fields_as_typed(
    schema: JSON,
    data: Mapping[str, str],
    prefix: str,
    errors: Mapping[str, str],
    choices_for: ChoicesFor = lambda name: None,
) -> list[SchemaField]:
    """The form again as it was submitted, each field with its error. Values are what was
    typed, not what parsed: a half-typed number must stay on screen to be corrected."""
    typed = {name: data.get(prefix + name, "") for name in schema.get("properties", {})}
    fields = fields_for(schema, {name: raw for name, raw in typed.items() if raw}, choices_for)
    for made in fields:
        made.value = typed[made.name]
        made.error = errors.get(made.name, "")
    return fields


def _field(
    name: str, prop: JSON, required: bool, values: Mapping[str, Any], choices_for: ChoicesFor
) -> SchemaField:
    value = values.get(name)
    made = SchemaField(name, _widget(name, prop), required, "", HELP.get(name, ""))
    options = choices_for(name)
    if made.widget == "select" or options is not None:
        made.widget = "select"
        made.choices = [str(choice) for choice in prop.get("enum", [])] or list(options or [])
        if value is not None and str(value) not in made.choices:
            made.choices.append(str(value))  # keep what the node has, even if now unknown
    if made.widget == "number":
        made.step = "1" if prop.get("type") == "integer" else "any"
        made.minimum = str(prop.get("minimum", ""))
        made.maximum = str(prop.get("maximum", ""))
    if "default" in prop and not made.help:
        made.help = f"Default: {_as_text(prop['default'])}."
    made.value = _rendered(made.widget, value)
    return made


def _widget(name: str, prop: JSON) -> str:
    if "enum" in prop:
        return "select"
    kind = prop.get("type")
    if kind == "string":
        return "textarea" if name in LONG_TEXT else "text"
    if kind in ("integer", "number"):
        return "number"
    if kind == "boolean":
        return "checkbox"
    return "json"


def _rendered(widget: str, value: Any) -> str:
    if value is None:
        return ""
    if widget == "checkbox":
        return "true" if value is True else ""
    if widget == "json":
        return json.dumps(value, indent=2, ensure_ascii=False)
    return _as_text(value)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_fields(
    schema: JSON, data: Mapping[str, str], prefix: str = ""
) -> tuple[JSON, dict[str, str]]:
    """(values, errors by field name) from submitted form data. Empty optional fields are
    left out, so the operator's defaults apply."""
    values: JSON = {}
    errors: dict[str, str] = {}
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        prop = prop if isinstance(prop, dict) else {}
        widget = _widget(name, prop)
        raw = data.get(prefix + name, "")
        if widget == "checkbox":
            if raw:
                values[name] = True
            continue
        if raw.strip() == "":
            if name in required:
                errors[name] = "This field is required."
            continue
        try:
            values[name] = _parsed(widget, prop, raw)
        except ValueError as exc:
            errors[name] = str(exc)
    return values, errors


def _parsed(widget: str, prop: JSON, raw: str) -> Any:
    if widget == "number":
        return _number(prop, raw.strip())
    if widget == "json":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
            ) from exc
    if widget == "select":
        return _enum_value(prop, raw)
    return raw


def _number(prop: JSON, raw: str) -> int | float:
    if prop.get("type") == "integer":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"Enter a whole number, not {raw!r}.") from None
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"Enter a number, not {raw!r}.") from None
    return int(number) if number.is_integer() else number


def _enum_value(prop: JSON, raw: str) -> Any:
    """The enum member spelt `raw` (enums may hold non-strings); `raw` itself otherwise."""
    for choice in prop.get("enum", []):
        if str(choice) == raw:
            return choice
    return raw
