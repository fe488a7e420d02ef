"""The deployments pages: the list, one deployment's page (its status refreshed by an htmx
partial every REFRESH_S seconds), and the actions on it: deploy a graph as a stream (from
the graph's page), pause, resume, drain and stop, redeploy a version, replay a dead letter.

Reads go through apps.streams.access (tenant-checked: 404 for missing and not yours);
writes through apps.streams.services, for operators and above. A refusal
(DeploymentRefused) comes back as a message on the page, never as an error page.

A redeploy that would drop state (a window or memory node changed or gone) is not done at
once: the page shows what goes (GET redeploy/?version=N) and asks to confirm."""

from collections.abc import Callable
from uuid import UUID

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apps.graphs.access import graph_by_slug
from apps.graphs.models import GraphVersion
from apps.secrets.crypto import SecretUnreadable
from apps.streams.access import (
    dead_letter_for,
    deployment_for,
    deployment_status,
    deployments_with_figures,
    drops_of,
    figures_of,
    state_by_node,
    state_of,
    versions_of,
)
from apps.streams.models import Deployment, DeploymentStatus, SourceKind
from apps.streams.services import (
    DeploymentRefused,
    deploy,
    drain,
    pause,
    replay_dead_letter,
    resume,
    state_to_drop,
)
from apps.streams.webhooks import reveal_secret, rotate_secret
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role

REFRESH_S = 2
DEPLOYMENTS_PER_PAGE = 25


@require_GET
@tenant_member_required
def deployment_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(deployments_with_figures(), DEPLOYMENTS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    return render(
        request,
        "streams/list.html",
        {"page": page, "rows": [figures_of(d) for d in page.object_list]},
    )


def _context(request: HttpRequest, deployment: Deployment) -> dict[str, object]:
    view = deployment_status(deployment, page=request.GET.get("page"))
    return {
        "deployment": deployment,
        "graph": deployment.graph,
        "view": view,
        "state": state_by_node(state_of(deployment, view.partitions), deployment.version.spec),
        "is_kafka": deployment.source_kind == SourceKind.KAFKA,
        "webhook_url": request.build_absolute_uri(view.webhook_url) if view.webhook_url else "",
        "can_operate": membership_of(request).allows(Role.OPERATOR),
        "is_owner": membership_of(request).allows(Role.OWNER),
        "refresh_s": REFRESH_S,
    }


@require_GET
@tenant_member_required
def deployment_detail(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    deployment = deployment_for(deployment_id)
    context = {**_context(request, deployment), "versions": versions_of(deployment)}
    return render(request, "streams/detail.html", context)


@require_GET
@tenant_member_required
def deployment_figures(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    """The status part of the page alone, for its htmx polling."""
    deployment = deployment_for(deployment_id)
    return render(request, "streams/partials/status.html", _context(request, deployment))


@require_POST
@tenant_member_required
def deploy_graph(request: HttpRequest) -> HttpResponse:
    """ "Deploy as stream" on a graph's page: its deployed version becomes the graph's stream
    deployment (or the deployment moves to it)."""
    require_role(request, Role.OPERATOR)
    graph = graph_by_slug(request.POST.get("graph", ""))
    version = graph.deployed_version
    if version is None:
        messages.error(request, "Not deployed: this graph has no deployed version.")
        return redirect("graphs:detail", slug=graph.slug)
    try:
        deployment = deploy(graph=graph, version=version, actor=request.user)
    except DeploymentRefused as exc:
        messages.error(request, f"Not deployed: {exc}")
        return redirect("graphs:detail", slug=graph.slug)
    messages.success(request, f"Version {version.number} deployed as a stream")
    return redirect("streams:detail", deployment_id=deployment.id)


def _act(
    request: HttpRequest, deployment_id: UUID, action: Callable[[Deployment], str]
) -> HttpResponse:
    """Runs an action for an operator, with its outcome or refusal as a message."""
    require_role(request, Role.OPERATOR)
    deployment = deployment_for(deployment_id)
    try:
        done = action(deployment)
    except DeploymentRefused as exc:
        messages.error(request, f"Not done: {exc}")
    else:
        messages.success(request, done)
    return redirect("streams:detail", deployment_id=deployment.id)


@require_POST
@tenant_member_required
def pause_view(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    def act(deployment: Deployment) -> str:
        pause(deployment, actor=request.user)
        return "Paused: no records are taken until it is resumed."

    return _act(request, deployment_id, act)


@require_POST
@tenant_member_required
def resume_view(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    def act(deployment: Deployment) -> str:
        resume(deployment, actor=request.user)
        return "Resumed."

    return _act(request, deployment_id, act)


@require_POST
@tenant_member_required
def drain_view(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    def act(deployment: Deployment) -> str:
        drained = drain(deployment, actor=request.user)
        if drained.status == DeploymentStatus.DRAINING:
            return "Draining: it takes what the topics hold now, then stops."
        return "Stopped."

    return _act(request, deployment_id, act)


def _chosen_version(deployment: Deployment, raw: str) -> GraphVersion | None:
    """The graph's version a form names, or None for anything else."""
    # Digits only, ASCII ("²" is a digit to str.isdigit) and few of them.
    number = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else None
    return versions_of(deployment).filter(number=number).first() if number else None


def _is_deployed(deployment: Deployment, version: GraphVersion) -> bool:
    return version.pk == deployment.version_id and deployment.status != DeploymentStatus.STOPPED


@require_http_methods(["GET", "POST"])
@tenant_member_required
def redeploy_view(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    """POST moves the deployment to the chosen version, unless that would drop state and the
    form does not confirm it (confirmed against the version deployed when it was shown: if
    another redeploy came between, what goes may differ): then it goes to GET, the page with
    what would be dropped and a button to confirm."""
    if request.method == "GET":
        return _redeploy_preview(request, deployment_id)
    require_role(request, Role.OPERATOR)
    deployment = deployment_for(deployment_id)
    version = _chosen_version(deployment, request.POST.get("version", ""))
    if version is None:
        messages.error(request, "Not done: choose one of the graph's versions to deploy")
    elif _is_deployed(deployment, version):
        messages.success(request, f"Version {version.number} is already deployed.")
    elif not _confirmed(request, deployment) and state_to_drop(deployment, version):
        preview = reverse("streams:redeploy", args=[deployment.id])
        return redirect(f"{preview}?version={version.number}#redeploy")
    else:
        try:
            deploy(graph=deployment.graph, version=version, actor=request.user)
        except DeploymentRefused as exc:
            messages.error(request, f"Not done: {exc}")
        else:
            messages.success(request, f"Version {version.number} deployed.")
    return redirect("streams:detail", deployment_id=deployment.id)


def _confirmed(request: HttpRequest, deployment: Deployment) -> bool:
    shown_with = request.POST.get("from_version", "")
    return bool(request.POST.get("confirm")) and shown_with == str(deployment.version.number)


def _redeploy_preview(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    """The deployment's page with what redeploying `?version=` would drop, and (for an
    operator) the button that confirms it. A version the graph does not have is a 404."""
    deployment = deployment_for(deployment_id)
    version = _chosen_version(deployment, request.GET.get("version", ""))
    if version is None:
        raise Http404("The graph has no such version.")
    context = {
        **_context(request, deployment),
        "versions": versions_of(deployment),
        "preview": version,
        "preview_deployed": _is_deployed(deployment, version),
        "drops": drops_of(deployment, state_to_drop(deployment, version)),
    }
    return render(request, "streams/detail.html", context)


@require_POST
@tenant_member_required
def replay_view(request: HttpRequest, deployment_id: UUID, dead_letter_id: int) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    deployment = deployment_for(deployment_id)
    dead = dead_letter_for(deployment, dead_letter_id)
    try:
        replayed = replay_dead_letter(dead, actor=request.user)
    except DeploymentRefused as exc:
        messages.error(request, f"Not replayed: {exc}")
    else:
        if replayed.replayed_at is not None:
            messages.success(request, f"Dead letter {replayed.pk} replayed and taken.")
        else:
            messages.error(request, f"Dead letter {replayed.pk} failed again: {replayed.error}")
    return redirect("streams:detail", deployment_id=deployment.id)


@require_POST
@tenant_member_required
def secret_view(request: HttpRequest, deployment_id: UUID) -> HttpResponse:
    """The webhook's signing secret, shown to an owner on this one answer (a POST: it is not
    in a URL, a history entry or a cache); "rotate" makes a new one first."""
    require_role(request, Role.OWNER)
    deployment = deployment_for(deployment_id)
    context = {**_context(request, deployment), "versions": versions_of(deployment)}
    try:
        if request.POST.get("rotate"):
            deployment = rotate_secret(deployment, actor=request.user)
            messages.success(request, "A new signing secret is in force; the old one is refused.")
        context["webhook_secret"] = reveal_secret(deployment)
    except (DeploymentRefused, SecretUnreadable) as exc:
        messages.error(request, f"No secret to show: {exc}")
        return redirect("streams:detail", deployment_id=deployment.id)
    return render(request, "streams/detail.html", context)
