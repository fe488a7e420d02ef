"""A graph's policies (deadline, budget, fan-out limit, what a disconnect does) in the editor:
a form from the spec schema's policies part, checked on the server and handed back to the
canvas, which keeps them with the unsaved graph until it is saved."""

import json
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST
from jsonschema import Draft202012Validator

from apps.editor import node_config
from apps.editor.schema_forms import fields_as_typed, fields_for, parse_fields
from apps.graphs.access import graph_by_slug
from apps.graphs.validation import SPEC_SCHEMA
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role

JSON = dict[str, Any]
POLICIES_SCHEMA: JSON = SPEC_SCHEMA["properties"]["policies"]
POLICIES_PREFIX = "policy."


@require_POST
@tenant_member_required
def policies_form_view(request: HttpRequest, slug: str) -> HttpResponse:
    """The graph's policies (deadline, budget, fan-out limit, disconnect) as a form."""
    membership = membership_of(request)
    graph = graph_by_slug(slug)
    try:
        policies = node_config.load_json(request.POST.get("policies", "{}"), "policies")
    except node_config.BadRequest as exc:
        return HttpResponse(str(exc), status=400)
    fields = fields_for(POLICIES_SCHEMA, policies if isinstance(policies, dict) else {})
    context = {"graph": graph, "fields": fields, "editable": membership.allows(Role.EDITOR)}
    return render(request, "editor/partials/policies_form.html", context)


@require_POST
@tenant_member_required
def policies_view(request: HttpRequest, slug: str) -> HttpResponse:
    """Checks the policies form; valid ones go back to the canvas in an HX-Trigger event."""
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    policies, errors = parse_fields(POLICIES_SCHEMA, request.POST, POLICIES_PREFIX)
    if not errors:
        for error in Draft202012Validator(POLICIES_SCHEMA).iter_errors(policies):
            name = str(error.absolute_path[0]) if error.absolute_path else ""
            errors.setdefault(name, error.message[:1].upper() + error.message[1:] + ".")
    fields = fields_as_typed(POLICIES_SCHEMA, request.POST, POLICIES_PREFIX, errors)
    context = {
        "graph": graph,
        "fields": fields,
        "editable": True,
        "applied": not errors,
    }
    response = render(request, "editor/partials/policies_form.html", context)
    event = {"policies": policies, "valid": not errors}
    response["HX-Trigger"] = json.dumps({"sluice:policies": event})
    return response
