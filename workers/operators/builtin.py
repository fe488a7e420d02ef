"""The first operators: a manual source, a template transform, a switch, fan-out, fan-in and
a table sink. `llm.generate` lives in workers/operators/llm.py."""

import json
from typing import Any

from workers.operators.base import (
    JSON,
    InputEvent,
    Operator,
    Output,
    PermanentError,
    SpecIssue,
    StepContext,
    StepResult,
    register,
)
from workers.operators.templating import render, syntax_error

# A collect's policies for failed items (see Collect.config_schema).
FAIL_RUN, COLLECT_SUCCEEDED = "fail_run", "collect_succeeded"
# "x-rule" is what validation says when a pattern does not match (JSON Schema ignores it).
FIELD_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}(?!\\n)$",
    "x-rule": "must be letters, digits and '_', not starting with a digit, at most 64 characters",
}


def template_variables(payload: JSON) -> dict[str, Any]:
    """What a template sees: the payload's fields by name, and the whole payload as `input`."""
    return {**payload, "input": payload}


def only_input(inputs: list[InputEvent]) -> InputEvent:
    if len(inputs) != 1:
        raise PermanentError(f"expected exactly one input event, got {len(inputs)}")
    return inputs[0]


@register
class ManualSource(Operator):
    type_name = "source.manual"
    description = "The run's input, as submitted from the form or the API."
    is_source = True
    cheap = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            # A JSON schema the run's input must satisfy, and an example to prefill forms.
            "input_schema": {"type": "object"},
            "example": {"type": "object"},
        },
    }

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        return StepResult(outputs=[Output(only_input(inputs).payload)])


@register
class TemplateTransform(Operator):
    type_name = "transform.template"
    description = "Renders a sandboxed Jinja2 template over the payload into one field."
    cheap = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["template"],
        "properties": {
            "template": {"type": "string", "minLength": 1},
            "output": FIELD_NAME,
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        problem = syntax_error(config["template"])
        return [SpecIssue("template", problem)] if problem else []

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        text = render(ctx.config["template"], template_variables(payload))
        return StepResult(outputs=[Output({**payload, ctx.config.get("output", "text"): text})])


@register
class Switch(Operator):
    type_name = "route.switch"
    description = "Sends the event to the port named for the value of one field."
    cheap = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["field", "cases"],
        "properties": {
            "field": FIELD_NAME,
            "cases": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": FIELD_NAME,
            },
            "default": FIELD_NAME,
        },
    }

    def output_ports(self, config: JSON) -> set[str]:
        ports = set(config.get("cases", {}).values())
        if "default" in config:
            ports.add(config["default"])
        return ports

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        port = ctx.config["cases"].get(
            case_key(payload.get(ctx.config["field"])), ctx.config.get("default")
        )
        # No matching case and no default: the event ends here, visibly, with no output.
        return StepResult(outputs=[Output(payload, port)] if port else [])


def case_key(value: object) -> str:
    """A payload value as a case name, spelt as in JSON: true, false, null, 1, 1.5, text."""
    return value if isinstance(value, str) else json.dumps(value)


@register
class Split(Operator):
    type_name = "fanout.split"
    description = "Turns a list field into one event per item, at most max_items of them."
    opens_scope = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["field"],
        "properties": {
            "field": FIELD_NAME,
            "max_items": {"type": "integer", "minimum": 1, "maximum": 100_000},
        },
    }

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        field = ctx.config["field"]
        items = payload.get(field)
        if not isinstance(items, list):
            raise PermanentError(f"field {field!r} must be a list, got {type(items).__name__}")
        limit = min(ctx.config.get("max_items", ctx.max_fanout), ctx.max_fanout)
        if len(items) > limit:
            raise PermanentError(f"{len(items)} items exceed the fan-out limit of {limit}")
        return StepResult(
            outputs=[Output({"item": item, "index": i}) for i, item in enumerate(items)]
        )


@register
class Collect(Operator):
    type_name = "collect"
    description = "Waits for every item of one fan-out and emits them as one list, in order."
    is_collect = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["by"],
        "properties": {
            "by": {"type": "string"},
            # When items of the fan-out fail (dead, or past their deadline): "fail_run" does
            # not collect and fails the run; "collect_succeeded" collects the rest and lists
            # the failures in the output.
            "on_item_failure": {"enum": [FAIL_RUN, COLLECT_SUCCEEDED]},
        },
    }

    def check(
        self, node_id: str, config: JSON, nodes: dict[str, JSON], parents: dict[str, set[str]]
    ) -> list[SpecIssue]:
        by = config["by"]
        if nodes.get(by, {}).get("type") != Split.type_name:
            return [SpecIssue("by", f"{by!r} is not a fanout.split node")]
        if by not in ancestors(node_id, parents):
            return [SpecIssue("by", f"{by!r} is not upstream of this node")]
        return []

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        ordered = sorted(inputs, key=lambda event: event.order)
        items = [event.payload for event in ordered]
        output: JSON = {"items": items, "count": len(items)}
        if collects_failures(ctx.config):
            output["failures"] = list(ctx.failures)
        return StepResult(outputs=[Output(output)])


def collects_failures(config: JSON) -> bool:
    return config.get("on_item_failure", FAIL_RUN) == COLLECT_SUCCEEDED


def ancestors(node_id: str, parents: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(parents.get(node_id, ()))
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(parents.get(current, ()))
    return seen


@register
class TableSink(Operator):
    type_name = "sink.table"
    description = "Writes the payload as one row of a named result table, exactly once."
    cheap = True
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["table"],
        "properties": {
            "table": {
                "type": "string",
                "pattern": "^[a-z][a-z0-9_]{0,63}(?!\\n)$",
                "x-rule": "must be lowercase letters, digits and '_', starting with a letter",
            }
        },
    }

    def run(self, ctx: StepContext, inputs: list[InputEvent]) -> StepResult:
        payload = only_input(inputs).payload
        return StepResult(outputs=[Output(payload)], table_rows=[(ctx.config["table"], payload)])
