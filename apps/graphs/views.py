"""Graph pages: the current tenant's graph list, and one graph's page with its deployed
version, recent runs, versions, the run form (operator+), the new-version form (editor+),
and for a version that starts with a stream source its stream deployment (the "Deploy as
stream" button posts to apps.streams' pages).

Every object comes from a tenant-scoped manager or a tenant-checked helper; writes go
through the services and show their errors next to the field they concern."""

import json
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import OuterRef, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from apps.graphs.access import graph_by_slug
from apps.graphs.forms import NewVersionForm, RunInputForm, pretty_json
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.services import add_version
from apps.graphs.validation import Edge, SpecInvalid, as_edge, node_queue, source_node
from apps.runs.models import Run
from apps.runs.services import InvalidInput, start_run
from apps.runs.views import run_duration
from apps.streams.access import deployment_of_graph, stream_source_kind
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role
from workers.inference.registry import platform_models
from workers.operators.base import JSON

GRAPHS_PER_PAGE = 25
RUNS_PER_PAGE = 20
CONFIG_PREVIEW_CHARS = 160


@dataclass(frozen=True)
class NodeRow:
    id: str
    type: str
    queue: str
    config: str
    simulated: bool


@dataclass(frozen=True)
class RunRow:
    run: Run
    duration: str


def _node_row(node: JSON) -> NodeRow:
    config = node.get("config", {})
    text = json.dumps(config, ensure_ascii=False, separators=(", ", ": ")) if config else ""
    if len(text) > CONFIG_PREVIEW_CHARS:
        text = text[: CONFIG_PREVIEW_CHARS - 1] + "…"
    model = platform_models().get(config.get("model", "default"))
    simulated = node["type"] == "llm.generate" and model is not None and model.simulated
    return NodeRow(node["id"], node["type"], node_queue(node), text, simulated)


def _edges(spec: JSON) -> list[Edge]:
    return [as_edge(e) for e in spec.get("edges", [])]


def _example_input(spec: JSON) -> Any:
    try:
        return source_node(spec).get("config", {}).get("example", {})
    except ValueError:  # no source node: nothing to prefill
        return {}


@require_GET
@tenant_member_required
def graph_list(request: HttpRequest) -> HttpResponse:
    last_run = Run.objects.filter(graph_version__graph=OuterRef("pk")).order_by("-created_at")
    graphs = (
        StreamGraph.objects.select_related("deployed_version")
        .annotate(
            last_run_id=Subquery(last_run.values("id")[:1]),
            last_run_status=Subquery(last_run.values("status")[:1]),
            last_run_at=Subquery(last_run.values("created_at")[:1]),
        )
        .order_by("name", "pk")
    )
    page = Paginator(graphs, GRAPHS_PER_PAGE).get_page(request.GET.get("page"))
    can_edit = membership_of(request).allows(Role.EDITOR)
    return render(request, "graphs/list.html", {"page": page, "can_edit": can_edit})


@require_GET
@tenant_member_required
def graph_detail(request: HttpRequest, slug: str) -> HttpResponse:
    return _detail_page(request, graph_by_slug(slug))


def _detail_page(
    request: HttpRequest,
    graph: StreamGraph,
    *,
    run_form: RunInputForm | None = None,
    version_form: NewVersionForm | None = None,
    status: int = 200,
) -> HttpResponse:
    membership = membership_of(request)
    version = graph.deployed_version
    spec: JSON = version.spec if version is not None else {"nodes": [], "edges": []}
    runs = Run.objects.filter(graph_version__graph=graph).select_related("graph_version")
    runs_page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "graph": graph,
        "version": version,
        "nodes": [_node_row(node) for node in spec.get("nodes", [])],
        "edges": _edges(spec),
        "can_run": membership.allows(Role.OPERATOR) and version is not None,
        # A version that starts with a stream source can be deployed as a stream.
        "stream_kind": stream_source_kind(version),
        "deployment": deployment_of_graph(graph),
        "can_edit": membership.allows(Role.EDITOR),
        "run_form": run_form
        or RunInputForm(initial={"payload": pretty_json(_example_input(spec))}),
        "version_form": version_form or NewVersionForm(initial={"spec": pretty_json(spec)}),
        "runs_page": runs_page,
        "run_rows": [RunRow(run, run_duration(run)) for run in runs_page.object_list],
        "versions": GraphVersion.objects.filter(graph=graph)
        .select_related("created_by")
        .order_by("-number"),
    }
    return render(request, "graphs/detail.html", context, status=status)


@require_POST
@tenant_member_required
def start_run_view(request: HttpRequest, slug: str) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    graph = graph_by_slug(slug)
    form = RunInputForm(request.POST)
    if form.is_valid():
        if graph.deployed_version is None:
            form.add_error(None, "This graph has no deployed version to run.")
        else:
            try:
                run = start_run(
                    version=graph.deployed_version,
                    payload=form.cleaned_data["payload"],
                    actor=request.user,
                )
            except InvalidInput as exc:
                form.add_error("payload", str(exc))
            else:
                return redirect("runs:detail", run_id=run.id)
    return _detail_page(request, graph, run_form=form, status=400)


@require_POST
@tenant_member_required
def new_version_view(request: HttpRequest, slug: str) -> HttpResponse:
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    form = NewVersionForm(request.POST)
    if form.is_valid():
        try:
            version = add_version(
                graph=graph,
                spec=form.cleaned_data["spec"],
                actor=request.user,
                note=form.cleaned_data["note"],
            )
        except SpecInvalid as exc:
            form.add_error("spec", [str(error) for error in exc.errors] or [str(exc)])
        else:
            messages.success(request, f"Version {version.number} saved and deployed")
            return redirect("graphs:detail", slug=graph.slug)
    return _detail_page(request, graph, version_form=form, status=400)
