"""Stream deployments: list, deploy a graph (or move its deployment to another version),
get one's status (partitions and lag, events/s, steps waiting, dead letters, where nodes
run), pause, resume, drain, redeploy, list dead letters and replay one; the state its
windows and memory nodes hold, and what a redeploy to another version would drop of it.

Reads need runs:read and writes runs:write (an operator's role, as on the pages). A
refusal of the services (DeploymentRefused: resume a running deployment, a source Kafka
cannot serve here) is a 409 carrying its message. Another tenant's deployment or dead
letter is a 404, like a missing one."""

from typing import Any
from uuid import UUID

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.base import TenantAPIView
from apps.api.pagination import PAGE_PARAMETERS, page_of, paginated
from apps.api.problems import Conflict
from apps.api.views.graphs import MAX_NUMBER, deployed, valid
from apps.graphs.access import graph_by_slug
from apps.graphs.models import GraphVersion, StreamGraph
from apps.streams import services
from apps.streams.access import (
    OwnerState,
    dead_letter_for,
    dead_letters_of,
    deployment_for,
    deployment_status,
    deployments_with_figures,
    figures_of,
    state_of,
    versions_of,
)
from apps.streams.models import DeadLetter, Deployment, DeploymentStatus, SourceKind
from apps.tenants.keys import RUNS_READ, RUNS_WRITE

# -- what clients send and get ------------------------------------------------------------


class DeploymentSummarySerializer(serializers.Serializer[Deployment]):
    id = serializers.UUIDField()
    graph = serializers.SlugField()
    version = serializers.IntegerField(help_text="The version deployed now.")
    source_kind = serializers.ChoiceField(choices=SourceKind.choices)
    status = serializers.ChoiceField(choices=DeploymentStatus.choices)
    run = serializers.UUIDField(help_text="The stream run its events and steps belong to.")
    lag = serializers.IntegerField(
        help_text="Kafka: records in its partitions not read yet, over all partitions. 0 for"
        " webhook and schedule sources."
    )
    events_per_s = serializers.FloatField(
        help_text="Kafka: the partitions' recent rates (those reported in the last 15 s);"
        " webhook and schedule: records taken over the last minute, per second."
    )
    dead_letters = serializers.IntegerField(help_text="Dead letters not replayed yet.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class PartitionSerializer(serializers.Serializer[Any]):
    topic = serializers.CharField()
    partition = serializers.IntegerField()
    next_offset = serializers.IntegerField(help_text="The next offset to read.")
    high_watermark = serializers.IntegerField(help_text="The partition's end, as last seen.")
    lag = serializers.IntegerField()
    records = serializers.IntegerField(help_text="Records taken.")
    dead_letters = serializers.IntegerField()
    rate = serializers.FloatField(help_text="Records per second over recent batches.")
    updated_at = serializers.DateTimeField()
    watermark = serializers.DateTimeField(
        allow_null=True,
        help_text="Event time up to which the partition is complete (the latest event time"
        " seen, less the source's max_delay_s); windows close on it. Null before a record.",
    )
    late = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Events that came after their window had closed, per window node id.",
    )


class WaitingStepsSerializer(serializers.Serializer[Any]):
    node = serializers.CharField()
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    failed = serializers.IntegerField(help_text="Failed once, waiting for their next attempt.")


class SegmentSerializer(serializers.Serializer[Any]):
    source = serializers.CharField()  # type: ignore[assignment]  # taken off the class by DRF
    inside = serializers.ListField(
        child=serializers.CharField(), help_text="Nodes run inside each micro-batch."
    )
    steps = serializers.ListField(
        child=serializers.CharField(),
        help_text="Nodes where a record leaves the segment and becomes a durable step.",
    )


class DeadLetterSerializer(serializers.Serializer[DeadLetter]):
    id = serializers.IntegerField()
    topic = serializers.CharField(help_text="Empty for webhook and schedule sources.")
    partition = serializers.IntegerField(allow_null=True)
    offset = serializers.IntegerField(allow_null=True)
    key = serializers.CharField()
    error = serializers.CharField()
    payload = serializers.CharField(help_text="The record's value, as text.")
    created_at = serializers.DateTimeField()
    replayed_at = serializers.DateTimeField(allow_null=True)


class DeploymentSerializer(DeploymentSummarySerializer):
    partitions = PartitionSerializer(many=True, help_text="Kafka only; else empty.")
    steps_waiting = WaitingStepsSerializer(
        many=True, help_text="The stream run's steps not settled yet, per node."
    )
    recent_dead_letters = DeadLetterSerializer(
        many=True, help_text="The newest dead letters; all of them under dead-letters/."
    )
    segment = SegmentSerializer()
    webhook_url = serializers.URLField(
        allow_null=True, help_text="Webhook source: where to POST signed records."
    )
    last_tick_at = serializers.DateTimeField(
        allow_null=True, help_text="Schedule source: the last tick that fired."
    )


class DeploymentCreateSerializer(serializers.Serializer[Any]):
    graph = serializers.SlugField(max_length=63)
    version = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_NUMBER,
        help_text="A version number; the graph's deployed version when left out.",
    )


class RedeploySerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1, max_value=MAX_NUMBER)


class OwnerStateSerializer(serializers.Serializer[Any]):
    owner = serializers.CharField(
        help_text="Whose state: a window or memory node's id, or `store:<name>` for the"
        " memory nodes sharing that store."
    )
    nodes = serializers.ListField(child=serializers.CharField())
    type = serializers.CharField(help_text="window.tumbling, window.hopping, … or memory.")
    open_entries = serializers.IntegerField(
        help_text="Windows: the open windows; memory: the keys held. Per key and partition."
    )
    late = serializers.IntegerField(
        help_text="Events that came after their window had closed, over all partitions."
    )
    oldest_end = serializers.DateTimeField(
        allow_null=True, help_text="Windows: when the oldest open window ends (event time)."
    )


class DeploymentStateSerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(help_text="The version deployed now.")
    owners = OwnerStateSerializer(
        many=True,
        help_text="Every state owner of the deployed version, in the spec's order (a spec"
        " has at most a few hundred nodes, so this is never paged).",
    )


class StatePreviewQuerySerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1, max_value=MAX_NUMBER)


class StateDropSerializer(serializers.Serializer[Any]):
    owner = serializers.CharField()
    nodes = serializers.ListField(
        child=serializers.CharField(), help_text="The owner's nodes in the version deployed now."
    )
    entries = serializers.IntegerField(help_text="Open windows or memory keys dropped.")
    reason = serializers.ChoiceField(choices=["config changed", "removed"])


class StatePreviewSerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(help_text="The version previewed.")
    drops = StateDropSerializer(
        many=True,
        help_text="The state redeploying to `version` drops; empty when it keeps it all.",
    )


class DeadLetterReplaySerializer(serializers.Serializer[Any]):
    replayed = serializers.BooleanField(
        help_text="Taken this time; false when it failed again (its `error` says why)."
    )
    dead_letter = DeadLetterSerializer()


# -- from rows to answers -----------------------------------------------------------------


def _common(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.id,
        "graph": deployment.graph.slug,
        "version": deployment.version.number,
        "source_kind": deployment.source_kind,
        "status": deployment.status,
        "run": deployment.run_id,
        "created_at": deployment.created_at,
        "updated_at": deployment.updated_at,
    }


def summary_data(deployment: Deployment) -> dict[str, Any]:
    """A row of `deployments_with_figures`."""
    figures = figures_of(deployment)
    return {
        **_common(deployment),
        "lag": figures.lag,
        "events_per_s": figures.events_per_s,
        "dead_letters": figures.dead_letters,
    }


def dead_letter_data(dead: DeadLetter) -> dict[str, Any]:
    return {
        "id": dead.pk,
        "topic": dead.topic,
        "partition": dead.partition,
        "offset": dead.offset,
        "key": dead.key,
        "error": dead.error,
        "payload": dead.payload,
        "created_at": dead.created_at,
        "replayed_at": dead.replayed_at,
    }


def deployment_data(request: Request, deployment: Deployment) -> dict[str, Any]:
    view = deployment_status(deployment)
    return {
        **_common(deployment),
        "lag": view.total_lag,
        "events_per_s": view.events_per_s,
        "dead_letters": view.dead_letter_count,
        "partitions": [
            {
                "topic": p.topic,
                "partition": p.partition,
                "next_offset": p.next_offset,
                "high_watermark": p.high_watermark,
                "lag": p.lag,
                "records": p.records,
                "dead_letters": p.dead_letters,
                "rate": p.rate,
                "updated_at": p.updated_at,
                "watermark": p.watermark,
                "late": p.late,
            }
            for p in view.partitions
        ],
        "steps_waiting": [
            {"node": w.node_id, "queued": w.queued, "running": w.running, "failed": w.failed}
            for w in view.waiting
        ],
        "recent_dead_letters": [dead_letter_data(d) for d in view.dead_letters.object_list],
        "segment": view.segment,
        "webhook_url": request.build_absolute_uri(view.webhook_url) if view.webhook_url else None,
        "last_tick_at": view.last_tick,
    }


def _current(request: Request, deployment_id: UUID) -> Response:
    """The deployment as it is now, read again after a change."""
    return Response(deployment_data(request, deployment_for(deployment_id)))


def owner_state_data(state: OwnerState) -> dict[str, Any]:
    return {
        "owner": state.owner,
        "nodes": [node.id for node in state.nodes],
        "type": state.type,
        "open_entries": state.open_entries,
        "late": state.late,
        "oldest_end": state.oldest_end,
    }


def _version_of(deployment: Deployment, number: int) -> GraphVersion:
    """One of the deployment's graph's versions; another number is a 400 naming `version`."""
    version = versions_of(deployment).filter(number=number).first()
    if version is None:
        raise serializers.ValidationError({"version": [f"the graph has no version {number}"]})
    return version


def _version(graph: StreamGraph, number: int) -> GraphVersion:
    version = GraphVersion.objects.filter(graph=graph, number=number).first()
    if version is None:
        raise serializers.ValidationError({"version": [f"the graph has no version {number}"]})
    return version


# -- endpoints ----------------------------------------------------------------------------


class DeploymentListView(TenantAPIView):
    scopes = {"GET": RUNS_READ, "POST": RUNS_WRITE}

    @extend_schema(
        operation_id="deployments_list",
        parameters=PAGE_PARAMETERS,
        responses=paginated(DeploymentSummarySerializer),
    )
    def get(self, request: Request) -> Response:
        return page_of(
            request, deployments_with_figures(), summary_data, ordering=("-created_at", "-id")
        )

    @extend_schema(
        operation_id="deployments_create",
        request=DeploymentCreateSerializer,
        responses={201: DeploymentSerializer},
        description=(
            "Deploys a graph as a stream: its version (the deployed one unless named) must"
            " start with source.kafka, source.webhook or source.schedule. A graph has one"
            " deployment: deploying another version moves it there (a redeploy), and"
            " deploying the version it already runs changes nothing."
        ),
    )
    def post(self, request: Request) -> Response:
        data = valid(DeploymentCreateSerializer, request.data)
        graph = graph_by_slug(data["graph"])
        number = data.get("version")
        version = _version(graph, number) if number is not None else deployed(graph)
        try:
            deployment = services.deploy(graph=graph, version=version, actor=self.caller.actor)
        except services.DeploymentRefused as exc:
            raise Conflict(str(exc)) from None
        response = _current(request, deployment.id)
        response.status_code = status.HTTP_201_CREATED
        response["Location"] = f"/api/deployments/{deployment.id}/"
        return response


class DeploymentDetailView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(operation_id="deployments_get", responses=DeploymentSerializer)
    def get(self, request: Request, deployment_id: UUID) -> Response:
        return _current(request, deployment_id)


class _Transition(TenantAPIView):
    """POST moves the deployment with `change`; a refusal is a 409."""

    scopes = {"POST": RUNS_WRITE}

    def change(self, deployment: Deployment) -> None:
        raise NotImplementedError

    def post(self, request: Request, deployment_id: UUID) -> Response:
        try:
            self.change(deployment_for(deployment_id))
        except services.DeploymentRefused as exc:
            raise Conflict(str(exc)) from None
        return _current(request, deployment_id)


@extend_schema_view(
    post=extend_schema(
        operation_id="deployments_pause",
        request=None,
        responses=DeploymentSerializer,
        description="A running deployment stops taking records until resumed.",
    )
)
class PauseView(_Transition):
    def change(self, deployment: Deployment) -> None:
        services.pause(deployment, actor=self.caller.actor)


@extend_schema_view(
    post=extend_schema(
        operation_id="deployments_resume",
        request=None,
        responses=DeploymentSerializer,
        description="A paused deployment takes records again.",
    )
)
class ResumeView(_Transition):
    def change(self, deployment: Deployment) -> None:
        services.resume(deployment, actor=self.caller.actor)


@extend_schema_view(
    post=extend_schema(
        operation_id="deployments_drain",
        request=None,
        responses=DeploymentSerializer,
        description=(
            "Kafka: takes what the topics hold now, then stops (status `draining`, then"
            " `stopped`). Webhook and schedule: stops at once."
        ),
    )
)
class DrainView(_Transition):
    def change(self, deployment: Deployment) -> None:
        services.drain(deployment, actor=self.caller.actor)


class RedeployView(TenantAPIView):
    scopes = {"POST": RUNS_WRITE}

    @extend_schema(
        operation_id="deployments_redeploy",
        request=RedeploySerializer,
        responses=DeploymentSerializer,
        description=(
            "Moves the deployment to another version of its graph (or starts a stopped one"
            " again): the new version takes each partition over at the offset the old one"
            " reached, so no record is taken twice."
        ),
    )
    def post(self, request: Request, deployment_id: UUID) -> Response:
        number = valid(RedeploySerializer, request.data)["version"]
        deployment = deployment_for(deployment_id)
        version = _version_of(deployment, number)
        try:
            services.deploy(graph=deployment.graph, version=version, actor=self.caller.actor)
        except services.DeploymentRefused as exc:
            raise Conflict(str(exc)) from None
        return _current(request, deployment_id)


class StateView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="deployments_state",
        responses=DeploymentStateSerializer,
        description=(
            "What the deployed version's windows and memory nodes hold, per state owner:"
            " open windows (memory: keys held) over all partitions, late events and the"
            " oldest open window's end. A version with neither has no owners."
        ),
    )
    def get(self, request: Request, deployment_id: UUID) -> Response:
        deployment = deployment_for(deployment_id)
        return Response(
            {
                "version": deployment.version.number,
                "owners": [owner_state_data(state) for state in state_of(deployment)],
            }
        )


class StatePreviewView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="deployments_state_preview",
        parameters=[
            OpenApiParameter(
                "version", int, required=True, description="A version of the deployment's graph."
            )
        ],
        responses=StatePreviewSerializer,
        description=(
            "What redeploying to `version` would drop: the state of every window or memory"
            " node whose id or config changes or that goes. Nothing changes; a number the"
            " graph has no version for is a 400."
        ),
    )
    def get(self, request: Request, deployment_id: UUID) -> Response:
        deployment = deployment_for(deployment_id)
        number = valid(StatePreviewQuerySerializer, request.query_params)["version"]
        version = _version_of(deployment, number)
        drops = services.state_to_drop(deployment, version)
        return Response({"version": version.number, "drops": drops})


class DeadLetterListView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="deployments_dead_letters",
        parameters=PAGE_PARAMETERS,
        responses=paginated(DeadLetterSerializer),
        description="The deployment's dead letters, newest first, replayed ones included.",
    )
    def get(self, request: Request, deployment_id: UUID) -> Response:
        deployment = deployment_for(deployment_id)
        return page_of(
            request,
            dead_letters_of(deployment),
            dead_letter_data,
            ordering=("-created_at", "-id"),
        )


class ReplayView(TenantAPIView):
    scopes = {"POST": RUNS_WRITE}

    @extend_schema(
        operation_id="deployments_dead_letter_replay",
        request=None,
        responses=DeadLetterReplaySerializer,
        description=(
            "Runs the dead letter's record through the version deployed now and takes it"
            " exactly once. If it fails again nothing is taken and `error` says why; a"
            " letter already replayed, or a stopped deployment, is a 409."
        ),
    )
    def post(self, request: Request, deployment_id: UUID, dead_letter_id: int) -> Response:
        dead = dead_letter_for(deployment_for(deployment_id), dead_letter_id)
        try:
            replayed = services.replay_dead_letter(dead, actor=self.caller.actor)
        except services.DeploymentRefused as exc:
            raise Conflict(str(exc)) from None
        return Response(
            {
                "replayed": replayed.replayed_at is not None,
                "dead_letter": dead_letter_data(replayed),
            }
        )
