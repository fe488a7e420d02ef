"""The graph editor: a new graph's form, the canvas page, and the round trips the canvas makes
(a node's config form, validation, auto-layout, save). The canvas keeps the unsaved graph in
the browser; every request carries what it needs, and only save writes anything.

Reads are open to every member (viewers see the graph and its forms read-only); writes need
the editor role, checked here on the server whatever the page showed."""

import json
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apps.editor import node_config
from apps.editor.choices import choices_for
from apps.editor.palette import node_outputs, palette
from apps.graphs.access import graph_by_slug, version_of
from apps.graphs.forms import FocusFirstErrorForm
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.services import GraphExists, StaleVersion, new_graph, save_version
from apps.graphs.validation import SpecError, validate_spec
from apps.runs.graph_layout import layout
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role
from sluice.problems import problem

JSON = dict[str, Any]
EMPTY_SPEC: JSON = {"nodes": [], "edges": []}
# Slugs that would collide with pages under /graphs/.
RESERVED_SLUGS = {"new"}


class NewGraphForm(FocusFirstErrorForm):
    name = forms.CharField(max_length=200, help_text="What the graph does, in a few words.")
    slug = forms.SlugField(
        max_length=63,
        required=False,
        help_text="Its address and API name; made from the name when left empty.",
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not cleaned.get("slug") and cleaned.get("name"):
            cleaned["slug"] = slugify(cleaned["name"])[:63]
            if not cleaned["slug"]:
                self.add_error("slug", "Choose a slug: the name has no letters or digits.")
        if cleaned.get("slug") in RESERVED_SLUGS:
            self.add_error("slug", f"{cleaned['slug']!r} is reserved; choose another slug.")
        return cleaned


@require_http_methods(["GET", "POST"])
@tenant_member_required
def new_graph_view(request: HttpRequest) -> HttpResponse:
    require_role(request, Role.EDITOR)
    form = NewGraphForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            graph = new_graph(
                slug=form.cleaned_data["slug"],
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
                actor=request.user,
            )
        except GraphExists as exc:
            form.add_error("slug", str(exc))
        else:
            return redirect("editor:edit", slug=graph.slug)
    status = 400 if form.errors else 200
    return render(request, "editor/new_graph.html", {"form": form}, status=status)


@require_GET
@tenant_member_required
def editor_page(request: HttpRequest, slug: str) -> HttpResponse:
    membership = membership_of(request)
    graph = graph_by_slug(slug)
    latest = _latest(graph)
    version = _opened_version(request, graph, latest)
    spec = version.spec if version is not None else EMPTY_SPEC
    groups = palette()
    context = {
        "graph": graph,
        "version": version,
        "latest": latest,
        "palette": groups,
        "editor_data": {
            "spec": spec,
            "palette": {item.type: item.as_json() for g in groups for item in g.items},
            "outputs": {node["id"]: node_outputs(node) for node in spec["nodes"]},
            "basedOn": latest.number if latest else None,
            "version": version.number if version else None,
            "canEdit": membership.allows(Role.EDITOR),
            "urls": _urls(graph),
        },
        "can_edit": membership.allows(Role.EDITOR),
        "can_run": membership.allows(Role.OPERATOR),
    }
    return render(request, "editor/editor.html", context)


def _latest(graph: StreamGraph) -> GraphVersion | None:
    return GraphVersion.objects.filter(graph=graph).order_by("-number").first()


def _opened_version(
    request: HttpRequest, graph: StreamGraph, latest: GraphVersion | None
) -> GraphVersion | None:
    number = request.GET.get("version", "")
    if number.isdigit():
        return version_of(graph, int(number))
    return latest


def _urls(graph: StreamGraph) -> dict[str, str]:
    names = [
        "node_form",
        "node_config",
        "policies_form",
        "policies",
        "validate",
        "save",
        "layout",
        "run_form",
    ]
    urls = {name: reverse(f"editor:{name}", args=[graph.slug]) for name in names}
    urls["edit"] = reverse("editor:edit", args=[graph.slug])
    urls["history"] = reverse("editor:history", args=[graph.slug])
    return urls


@require_POST
@tenant_member_required
def node_form_view(request: HttpRequest, slug: str) -> HttpResponse:
    """The selected node's form (read-only below the editor role)."""
    membership = membership_of(request)
    graph = graph_by_slug(slug)
    try:
        node, _spec = node_config.node_and_spec(request.POST)
    except node_config.BadRequest as exc:
        return HttpResponse(str(exc), status=400)
    form = node_config.form_for(node, choices_for)
    return _node_form(request, graph, form, editable=membership.allows(Role.EDITOR))


@require_POST
@tenant_member_required
def node_config_view(request: HttpRequest, slug: str) -> HttpResponse:
    """Applies the form to the node. Valid: the browser gets the node's new JSON in an
    `HX-Trigger` event and updates the canvas. Invalid: the form again, with the errors on
    its fields, and an event that marks the node on the canvas."""
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    try:
        node, spec = node_config.node_and_spec(request.POST)
    except node_config.BadRequest as exc:
        return HttpResponse(str(exc), status=400)
    updated, form = node_config.apply(node, spec, request.POST, choices_for)
    response = _node_form(request, graph, form, editable=True, applied=not form.has_errors)
    event = {
        "cell": request.POST.get("cell", ""),
        "node": updated,
        "outputs": node_outputs(updated),
        "valid": not form.has_errors,
    }
    response["HX-Trigger"] = json.dumps({"sluice:node-config": event})
    return response


def _node_form(
    request: HttpRequest,
    graph: StreamGraph,
    form: node_config.NodeForm,
    *,
    editable: bool,
    applied: bool = False,
) -> HttpResponse:
    context = {
        "graph": graph,
        "form": form,
        "editable": editable,
        "applied": applied,
        "cell": request.POST.get("cell", ""),
    }
    return render(request, "editor/partials/node_form.html", context)


def _body(request: HttpRequest) -> JSON:
    try:
        body = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise node_config.BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise node_config.BadRequest("the request body must be a JSON object")
    return body


def _error_json(error: SpecError) -> JSON:
    return {"where": error.where, "field": error.field, "message": error.message}


@require_POST
@tenant_member_required
def validate_view(request: HttpRequest, slug: str) -> JsonResponse:
    graph_by_slug(slug)  # 404 for another tenant's graph, like every other view
    try:
        spec = _body(request).get("spec")
    except node_config.BadRequest as exc:
        return problem(400, str(exc))
    errors = validate_spec(spec)
    return JsonResponse({"valid": not errors, "errors": [_error_json(e) for e in errors]})


@require_POST
@tenant_member_required
def layout_view(request: HttpRequest, slug: str) -> JsonResponse:
    """Positions for every node, layered left to right (the run page's layout)."""
    graph_by_slug(slug)
    try:
        spec = _body(request).get("spec")
    except node_config.BadRequest as exc:
        return problem(400, str(exc))
    if not isinstance(spec, dict) or not isinstance(spec.get("nodes"), list):
        return problem(400, "spec must be an object with a list of nodes")
    nodes = [n for n in spec["nodes"] if isinstance(n, dict) and isinstance(n.get("id"), str)]
    edges = [e for e in spec.get("edges", []) if isinstance(e, list) and len(e) >= 2]
    placed = layout({"nodes": nodes, "edges": edges})
    return JsonResponse({"positions": {n.id: {"x": n.x, "y": n.y} for n in placed.nodes}})


@require_POST
@tenant_member_required
def save_view(request: HttpRequest, slug: str) -> JsonResponse:
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    try:
        body = _body(request)
    except node_config.BadRequest as exc:
        return problem(400, str(exc))
    note = str(body.get("note", "")).strip()
    if len(note) > 500:
        return problem(400, "The note is too long (500 characters at most).")
    errors = validate_spec(body.get("spec"))
    if errors:
        count = len(errors)
        title = f"Not saved: the graph has {count} problem{'s' if count != 1 else ''}."
        return problem(400, title, errors=[_error_json(e) for e in errors])
    based_on = body.get("based_on")
    try:
        version = save_version(
            graph=graph,
            spec=body["spec"],
            actor=request.user,
            note=note,
            based_on=based_on if isinstance(based_on, int) else None,
        )
    except StaleVersion as exc:
        return problem(409, str(exc))
    # save_version deployed it on the graph row it locked, which the version holds.
    deployed = version.graph.deployed_version_id == version.pk
    return JsonResponse(
        {
            "number": version.number,
            "deployed": deployed,
            "message": f"Saved version {version.number}" + (" (deployed)" if deployed else ""),
            "editor_url": reverse("editor:edit", args=[graph.slug]) + f"?version={version.number}",
        },
        status=201,
    )
