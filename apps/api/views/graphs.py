"""Graphs and their versions: list, create, get, add a version (the API's "update": versions
are immutable), validate without saving, diff two versions, deploy one."""

from dataclasses import asdict
from typing import Any

from django.db.models import Max
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.base import TenantAPIView
from apps.api.estimates import InputProfile, estimate_version, parse_profile
from apps.api.idempotency import idempotent
from apps.api.pagination import PAGE_PARAMETERS, page_of, paginated
from apps.api.problems import Conflict
from apps.graphs.access import graph_by_slug, version_of
from apps.graphs.diff import MISSING, FieldChange, diff_specs
from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.services import add_version, create_graph, deploy_version, save_version
from apps.graphs.validation import validate_spec
from apps.tenants.keys import GRAPHS_READ, GRAPHS_WRITE

MAX_NUMBER = 2**31 - 1  # the largest version number the database holds
SPEC_HELP = "The graph spec: nodes, edges and policies (see the operator reference)."


class GraphSerializer(serializers.Serializer[StreamGraph]):
    slug = serializers.SlugField()
    name = serializers.CharField()
    description = serializers.CharField()
    deployed_version = serializers.IntegerField(allow_null=True)
    latest_version = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class GraphCreateSerializer(serializers.Serializer[Any]):
    slug = serializers.SlugField(max_length=63)
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, default="", allow_blank=True)
    spec = serializers.JSONField(help_text=SPEC_HELP)
    note = serializers.CharField(required=False, default="", allow_blank=True, max_length=500)


class VersionSerializer(serializers.Serializer[GraphVersion]):
    number = serializers.IntegerField()
    note = serializers.CharField()
    checksum = serializers.CharField()
    created_by = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    deployed = serializers.BooleanField()
    spec = serializers.JSONField(help_text=SPEC_HELP)


class VersionCreateSerializer(serializers.Serializer[Any]):
    spec = serializers.JSONField(help_text=SPEC_HELP)
    note = serializers.CharField(required=False, default="", allow_blank=True, max_length=500)
    deploy = serializers.BooleanField(
        required=False, default=False, help_text="Make it the version new runs use."
    )
    based_on = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_NUMBER,
        help_text="The version you edited: refused (409) if another was added since.",
    )


class SpecSerializer(serializers.Serializer[Any]):
    spec = serializers.JSONField(help_text=SPEC_HELP)


class SpecErrorSerializer(serializers.Serializer[Any]):
    where = serializers.CharField()
    field = serializers.CharField()
    message = serializers.CharField()


class ValidationResultSerializer(serializers.Serializer[Any]):
    valid = serializers.BooleanField()
    # DRF's metaclass takes declared fields off the class, so the name does not clash.
    errors = SpecErrorSerializer(many=True)  # type: ignore[assignment]


class DeploySerializer(serializers.Serializer[Any]):
    version = serializers.IntegerField(min_value=1, max_value=MAX_NUMBER)


class FieldChangeSerializer(serializers.Serializer[Any]):
    field = serializers.CharField()
    kind = serializers.ChoiceField(choices=["added", "removed", "changed"])
    before = serializers.JSONField(allow_null=True)
    after = serializers.JSONField(allow_null=True)


class NodeChangeSerializer(serializers.Serializer[Any]):
    id = serializers.CharField()
    type = serializers.CharField()
    changes = FieldChangeSerializer(many=True)


class EdgeSerializer(serializers.Serializer[Any]):
    source = serializers.CharField()  # type: ignore[assignment]  # taken off the class by DRF
    target = serializers.CharField()
    port = serializers.CharField()


class DiffSerializer(serializers.Serializer[Any]):
    summary = serializers.CharField()
    behaviour_changed = serializers.BooleanField()
    added_nodes = serializers.ListField(child=serializers.JSONField())
    removed_nodes = serializers.ListField(child=serializers.JSONField())
    changed_nodes = NodeChangeSerializer(many=True)
    moved_nodes = serializers.ListField(child=serializers.CharField())
    added_edges = EdgeSerializer(many=True)
    removed_edges = EdgeSerializer(many=True)
    policy_changes = FieldChangeSerializer(many=True)


def graph_data(graph: StreamGraph, latest: int | None) -> dict[str, Any]:
    deployed = graph.deployed_version
    return {
        "slug": graph.slug,
        "name": graph.name,
        "description": graph.description,
        "deployed_version": deployed.number if deployed is not None else None,
        "latest_version": latest,
        "created_at": graph.created_at,
    }


def version_data(version: GraphVersion, graph: StreamGraph) -> dict[str, Any]:
    return {
        "number": version.number,
        "note": version.note,
        "checksum": version.checksum,
        "created_by": version.created_by.get_username() if version.created_by else None,
        "created_at": version.created_at,
        "deployed": graph.deployed_version_id == version.pk,
        "spec": version.spec,
    }


def _latest(graph: StreamGraph) -> int | None:
    latest: int | None = graph.versions.aggregate(latest=Max("number"))["latest"]
    return latest


def deployed(graph: StreamGraph) -> GraphVersion:
    if graph.deployed_version is None:
        raise Conflict(f"The graph {graph.slug!r} has no deployed version; deploy one first.")
    return graph.deployed_version


def valid(serializer_class: type[serializers.Serializer[Any]], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class GraphListView(TenantAPIView):
    scopes = {"GET": GRAPHS_READ, "POST": GRAPHS_WRITE}

    @extend_schema(
        operation_id="graphs_list", parameters=PAGE_PARAMETERS, responses=paginated(GraphSerializer)
    )
    def get(self, request: Request) -> Response:
        graphs = StreamGraph.objects.select_related("deployed_version").annotate(
            latest=Max("versions__number")
        )
        return page_of(request, graphs, lambda g: graph_data(g, g.latest), ordering="slug")

    @extend_schema(
        operation_id="graphs_create",
        request=GraphCreateSerializer,
        responses={201: GraphSerializer},
        description="Creates a graph with its first version, deployed.",
    )
    @idempotent
    def post(self, request: Request) -> Response:
        data = valid(GraphCreateSerializer, request.data)
        graph = create_graph(actor=self.caller.actor, **data)
        response = Response(graph_data(graph, 1), status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/graphs/{graph.slug}/"
        return response


class GraphDetailView(TenantAPIView):
    scopes = {"GET": GRAPHS_READ}

    @extend_schema(operation_id="graphs_get", responses=GraphSerializer)
    def get(self, request: Request, slug: str) -> Response:
        graph = graph_by_slug(slug)
        return Response(graph_data(graph, _latest(graph)))


class VersionListView(TenantAPIView):
    scopes = {"GET": GRAPHS_READ, "POST": GRAPHS_WRITE}

    @extend_schema(
        operation_id="graph_versions_list",
        parameters=PAGE_PARAMETERS,
        responses=paginated(VersionSerializer),
    )
    def get(self, request: Request, slug: str) -> Response:
        graph = graph_by_slug(slug)
        versions = GraphVersion.objects.filter(graph=graph).select_related("created_by")
        return page_of(request, versions, lambda v: version_data(v, graph), ordering="-number")

    @extend_schema(
        operation_id="graph_versions_create",
        request=VersionCreateSerializer,
        responses={201: VersionSerializer},
        description=(
            "Updates a graph: adds a new immutable version, validated first. Deployed only"
            " when `deploy` is true."
        ),
    )
    @idempotent
    def post(self, request: Request, slug: str) -> Response:
        graph = graph_by_slug(slug)
        data = valid(VersionCreateSerializer, request.data)
        actor = self.caller.actor
        if "based_on" in data:
            version = save_version(
                graph=graph,
                spec=data["spec"],
                actor=actor,
                note=data["note"],
                based_on=data["based_on"],
            )
            if data["deploy"]:
                deploy_version(graph=graph, version=version, actor=actor)
        else:
            version = add_version(
                graph=graph,
                spec=data["spec"],
                actor=actor,
                note=data["note"],
                deploy=data["deploy"],
            )
        graph.refresh_from_db()
        response = Response(version_data(version, graph), status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/graphs/{graph.slug}/versions/{version.number}/"
        return response


class VersionDetailView(TenantAPIView):
    scopes = {"GET": GRAPHS_READ}

    @extend_schema(operation_id="graph_versions_get", responses=VersionSerializer)
    def get(self, request: Request, slug: str, number: int) -> Response:
        graph = graph_by_slug(slug)
        if number > MAX_NUMBER:
            raise NotFound("Not found, or not yours.")
        return Response(version_data(version_of(graph, number), graph))


class ValidateView(TenantAPIView):
    scopes = {"POST": GRAPHS_READ}

    @extend_schema(
        operation_id="graphs_validate",
        request=SpecSerializer,
        responses=ValidationResultSerializer,
        description="Checks a spec as saving would, and saves nothing.",
    )
    def post(self, request: Request) -> Response:
        spec = valid(SpecSerializer, request.data)["spec"]
        errors = [asdict(error) for error in validate_spec(spec)]
        return Response({"valid": not errors, "errors": errors})


class DiffView(TenantAPIView):
    scopes = {"GET": GRAPHS_READ}

    @extend_schema(
        operation_id="graphs_diff",
        parameters=[
            OpenApiParameter("from", int, required=True, description="The older version."),
            OpenApiParameter("to", int, required=True, description="The newer version."),
        ],
        responses=DiffSerializer,
    )
    def get(self, request: Request, slug: str) -> Response:
        numbers = valid(DiffQuerySerializer, request.query_params)
        graph = graph_by_slug(slug)
        old = version_of(graph, numbers["from"])
        new = version_of(graph, numbers["to"])
        diff = diff_specs(old.spec, new.spec)
        return Response(
            {
                "summary": diff.summary(),
                "behaviour_changed": diff.behaviour_changed,
                "added_nodes": diff.added_nodes,
                "removed_nodes": diff.removed_nodes,
                "changed_nodes": [
                    {"id": n.id, "type": n.type, "changes": [_change(c) for c in n.changes]}
                    for n in diff.changed_nodes
                ],
                "moved_nodes": diff.moved_nodes,
                "added_edges": [asdict(e) for e in diff.added_edges],
                "removed_edges": [asdict(e) for e in diff.removed_edges],
                "policy_changes": [_change(c) for c in diff.policy_changes],
            }
        )


class DiffQuerySerializer(serializers.Serializer[Any]):
    # "from" is a keyword in Python, hence the declared field names.
    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {
            "from": serializers.IntegerField(min_value=1, max_value=MAX_NUMBER),
            "to": serializers.IntegerField(min_value=1, max_value=MAX_NUMBER),
        }


def _change(change: FieldChange) -> dict[str, Any]:
    return {
        "field": change.field,
        "kind": change.kind,
        "before": None if change.before is MISSING else change.before,
        "after": None if change.after is MISSING else change.after,
    }


class DeployView(TenantAPIView):
    scopes = {"POST": GRAPHS_WRITE}

    @extend_schema(
        operation_id="graphs_deploy",
        request=DeploySerializer,
        responses=GraphSerializer,
        description="Makes a version the one new runs and stream events use.",
    )
    @idempotent
    def post(self, request: Request, slug: str) -> Response:
        number = valid(DeploySerializer, request.data)["version"]
        graph = graph_by_slug(slug)
        deploy_version(graph=graph, version=version_of(graph, number), actor=self.caller.actor)
        graph.refresh_from_db()
        return Response(graph_data(graph, _latest(graph)))


class ProfileSerializer(serializers.Serializer[Any]):
    """What a pre-flight estimate needs to know about the inputs beyond their count."""

    pages_per_item = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=100_000,
        help_text="Items each split node makes of one input (pages of a document).",
    )
    tokens_per_item = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=10_000_000,
        help_text="Prompt tokens in one whole input.",
    )


class EstimateRequestSerializer(ProfileSerializer):
    version = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_NUMBER,
        help_text="The version to estimate; the deployed one when left out.",
    )
    items = serializers.IntegerField(min_value=1, max_value=1_000_000)


class EstimateStepsSerializer(serializers.Serializer[Any]):
    total = serializers.IntegerField()
    per_node = serializers.DictField(child=serializers.IntegerField())


class EstimateTokensSerializer(serializers.Serializer[Any]):
    # "in" is a keyword in Python, hence the declared field names.
    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {"in": serializers.IntegerField(), "out": serializers.IntegerField()}


class EstimateSerializer(serializers.Serializer[Any]):
    steps = EstimateStepsSerializer()
    tokens = EstimateTokensSerializer()
    gpu_seconds = serializers.FloatField()
    cost_usd = serializers.CharField(help_text="US dollars, 6 decimal places.")
    wall_seconds = serializers.FloatField()
    assumptions = serializers.ListField(child=serializers.CharField())


def profile_from(data: dict[str, Any]) -> InputProfile:
    try:
        return parse_profile(data)
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        raise serializers.ValidationError({field: [message]}) from None


class EstimateView(TenantAPIView):
    scopes = {"POST": GRAPHS_READ}

    @extend_schema(
        operation_id="graphs_estimate",
        request=EstimateRequestSerializer,
        responses=EstimateSerializer,
        description=(
            "Before a batch: expected steps per node (with a 2% retry allowance), tokens,"
            " GPU-seconds, cost and wall time at current capacity, with the assumptions used."
        ),
    )
    def post(self, request: Request, slug: str) -> Response:
        data = valid(EstimateRequestSerializer, request.data)
        graph = graph_by_slug(slug)
        number = data.pop("version", None)
        version = version_of(graph, number) if number is not None else deployed(graph)
        return Response(estimate_version(version, profile_from(data)))
