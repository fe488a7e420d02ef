"""A graph's version history: every version with its note and author, a readable diff of any
two, rollback (a new version equal to an old one) and deploy (the version new runs use)."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from apps.graphs.access import graph_by_slug, version_of
from apps.graphs.diff import diff_specs
from apps.graphs.models import GraphVersion
from apps.graphs.services import deploy_version, roll_back
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role

VERSIONS_PER_PAGE = 30


@require_GET
@tenant_member_required
def history_view(request: HttpRequest, slug: str) -> HttpResponse:
    graph = graph_by_slug(slug)
    versions = GraphVersion.objects.filter(graph=graph).select_related("created_by")
    page = Paginator(versions.order_by("-number"), VERSIONS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    context = {
        "graph": graph,
        "page": page,
        "can_edit": membership_of(request).allows(Role.EDITOR),
        "latest": versions.order_by("-number").values_list("number", flat=True).first(),
    }
    return render(request, "editor/history.html", context)


@require_GET
@tenant_member_required
def diff_view(request: HttpRequest, slug: str) -> HttpResponse:
    graph = graph_by_slug(slug)
    old_number, new_number = request.GET.get("from", ""), request.GET.get("to", "")
    if not (old_number.isdigit() and new_number.isdigit()):
        messages.error(request, "Choose two versions to compare.")
        return redirect("editor:history", slug=graph.slug)
    old, new = version_of(graph, int(old_number)), version_of(graph, int(new_number))
    context = {"graph": graph, "old": old, "new": new, "diff": diff_specs(old.spec, new.spec)}
    return render(request, "editor/diff.html", context)


@require_POST
@tenant_member_required
def rollback_view(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    target = version_of(graph, number)
    version = roll_back(graph=graph, to=target, actor=request.user)
    deployed = version.graph.deployed_version_id == version.pk  # the graph row roll_back locked
    messages.success(
        request,
        f"Version {version.number} is a copy of version {number}"
        + (" and is deployed." if deployed else "; deploy it when you are ready."),
    )
    return redirect("editor:history", slug=graph.slug)


@require_POST
@tenant_member_required
def deploy_view(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    require_role(request, Role.EDITOR)
    graph = graph_by_slug(slug)
    version = version_of(graph, number)
    deploy_version(graph=graph, version=version, actor=request.user)
    messages.success(request, f"Version {number} is deployed: new runs use it.")
    return redirect("editor:history", slug=graph.slug)
