"""Running a saved version from the editor. The input form is derived from the source node:
one field per property of its `input_schema` (prefilled from its `example`), or a single
JSON field when the schema describes no properties. A started run opens its page."""

from typing import Any

from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from apps.editor.schema_forms import SchemaField, fields_as_typed, fields_for, parse_fields
from apps.graphs.access import graph_by_slug, version_of
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.validation import source_node
from apps.runs.services import InvalidInput, start_run
from apps.tenants.access import require_role, tenant_member_required
from apps.tenants.models import Role

JSON = dict[str, Any]
INPUT_PREFIX = "in."
# With no usable input schema, the whole input is one JSON field.
WHOLE_INPUT: JSON = {"type": "object", "required": ["payload"], "properties": {"payload": {}}}


def _input_schema(version: GraphVersion) -> tuple[JSON, JSON, bool]:
    """(schema for the form, prefill values, whether the form is the whole-JSON fallback)."""
    config = source_node(version.spec).get("config", {})
    schema, example = config.get("input_schema", {}), config.get("example", {})
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if isinstance(properties, dict) and properties:
        return schema, example if isinstance(example, dict) else {}, False
    return WHOLE_INPUT, {"payload": example if example else {}}, True


def _form_context(
    graph: StreamGraph, version: GraphVersion, fields: list[SchemaField], error: str = ""
) -> JSON:
    return {"graph": graph, "version": version, "fields": fields, "error": error}


@require_GET
@tenant_member_required
def run_form_view(request: HttpRequest, slug: str) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    graph = graph_by_slug(slug)
    version = version_of(graph, _number(request.GET))
    schema, values, _whole = _input_schema(version)
    context = _form_context(graph, version, fields_for(schema, values))
    return render(request, "editor/partials/run_form.html", context)


@require_POST
@tenant_member_required
def run_view(request: HttpRequest, slug: str) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    graph = graph_by_slug(slug)
    version = version_of(graph, _number(request.POST))
    schema, _values, whole = _input_schema(version)
    values, errors = parse_fields(schema, request.POST, INPUT_PREFIX)
    fields = fields_as_typed(schema, request.POST, INPUT_PREFIX, errors)
    if not errors:
        payload = values["payload"] if whole else values
        try:
            run = start_run(version=version, payload=payload, actor=request.user)
        except InvalidInput as exc:
            context = _form_context(graph, version, fields, error=str(exc))
            return render(request, "editor/partials/run_form.html", context)
        response = HttpResponse(status=204)
        response["HX-Redirect"] = reverse("runs:detail", args=[run.id])
        return response
    return render(request, "editor/partials/run_form.html", _form_context(graph, version, fields))


def _number(data: QueryDict) -> int:
    number = data.get("version", "")
    return int(number) if number.isdigit() else 0  # version 0 never exists: 404
