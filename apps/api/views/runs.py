"""Runs: start one with inputs, list (filters, cursor pages), get (status, per-node counts,
tokens and cost, the steps flow control routed or holds back), cancel, replay dead steps, read
outputs (paged) and one output's lineage."""

from collections import defaultdict
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db import connection
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.admission import admit
from apps.api.base import TenantAPIView
from apps.api.idempotency import idempotent
from apps.api.measured import money, step_totals
from apps.api.pagination import PAGE_PARAMETERS, page_of, paginated
from apps.api.problems import Conflict
from apps.api.views.graphs import MAX_NUMBER, deployed, valid
from apps.graphs.access import graph_by_slug, version_of
from apps.graphs.models import GraphVersion
from apps.graphs.validation import as_edge
from apps.runs.access import run_by_id
from apps.runs.models import Event, Run, RunKind, RunStatus, Step, StepStatus
from apps.runs.replay import replay_dead_steps
from apps.runs.services import cancel_run, start_run
from apps.tenants.keys import RUNS_READ, RUNS_WRITE
from workers.flow.routing import PRIORITIES, priority_name

# The most events one lineage answer lists: a collect over 20,000 items has that many.
LINEAGE_LIMIT = 1000
STEP_STATUSES = [s.value for s in StepStatus]
# A run's detail lists at most this many of the steps flow control routed or holds back.
FLOW_STEPS_SHOWN = 100


class TokensSerializer(serializers.Serializer[Any]):
    prompt = serializers.IntegerField()
    completion = serializers.IntegerField()
    wasted = serializers.IntegerField()


class NodeCountsSerializer(serializers.Serializer[Any]):
    node = serializers.CharField()
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="Steps by status.")


class RunSummarySerializer(serializers.Serializer[Run]):
    id = serializers.UUIDField()
    graph = serializers.SlugField()
    version = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=RunKind.choices)
    status = serializers.ChoiceField(choices=RunStatus.choices)
    error = serializers.CharField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    deadline = serializers.DateTimeField(allow_null=True)
    budget_usd = serializers.DecimalField(max_digits=12, decimal_places=6, allow_null=True)


class StepRoutingSerializer(serializers.Serializer[Step]):
    """A step's flow-control fields: which model served it, why, and why it waits."""

    model = serializers.CharField(help_text="The model that served it; empty until one has.")
    route = serializers.CharField(
        help_text="Why that model served it, when it was not simply the one asked for"
        " (a routing rule, a fallback, and why models before it were passed over)."
    )
    waiting = serializers.CharField(
        help_text="While flow control holds it back in the queue (every model it may use"
        " throttled or its breaker open, or shed for higher-priority work): why. Else empty."
    )
    priority = serializers.ChoiceField(
        choices=list(PRIORITIES), help_text="Its node's priority, for load shedding."
    )


class RoutedStepSerializer(StepRoutingSerializer):
    id = serializers.UUIDField()
    node = serializers.CharField()
    item = serializers.IntegerField(allow_null=True, help_text="Its item in a fan-out.")
    status = serializers.ChoiceField(choices=StepStatus.choices)


class RunFlowSerializer(serializers.Serializer[Any]):
    steps = RoutedStepSerializer(
        many=True,
        help_text="The run's steps with a route or a waiting reason, in the run's order:"
        f" the first {FLOW_STEPS_SHOWN}.",
    )
    truncated = serializers.BooleanField(help_text=f"More than {FLOW_STEPS_SHOWN} such steps.")


class RunSerializer(RunSummarySerializer):
    cost_usd = serializers.DecimalField(max_digits=12, decimal_places=6)
    tokens = TokensSerializer()
    steps = serializers.DictField(
        child=serializers.IntegerField(), help_text="Steps by status, over all nodes."
    )
    nodes = NodeCountsSerializer(many=True)
    flow = RunFlowSerializer(
        help_text="Steps served by another model than the one asked for, or waiting for one."
    )


class RunCreateSerializer(serializers.Serializer[Any]):
    graph = serializers.SlugField(max_length=63)
    version = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_NUMBER,
        help_text="A version number; the deployed version when left out.",
    )
    input = serializers.JSONField(help_text="The run's input: a JSON object.")


class RunFilterSerializer(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=RunStatus.choices, required=False)
    kind = serializers.ChoiceField(choices=RunKind.choices, required=False)
    graph = serializers.SlugField(required=False, max_length=63)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)


class ReplaySerializer(serializers.Serializer[Any]):
    steps = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        max_length=10_000,
        help_text="Only these dead steps; all of the run's dead steps when left out.",
    )


class ReplayResultSerializer(serializers.Serializer[Any]):
    replayed = serializers.IntegerField()
    run = RunSerializer()


class EventSerializer(serializers.Serializer[Event]):
    id = serializers.UUIDField()
    node = serializers.CharField()
    port = serializers.CharField()
    step = serializers.UUIDField(allow_null=True, help_text="The step that produced it.")
    key = serializers.CharField()
    event_time = serializers.DateTimeField()
    created_at = serializers.DateTimeField()
    payload = serializers.JSONField()


class LineageStepSerializer(StepRoutingSerializer):
    id = serializers.UUIDField()
    node = serializers.CharField()
    type = serializers.CharField()
    status = serializers.ChoiceField(choices=StepStatus.choices)
    attempt = serializers.IntegerField()
    inputs = serializers.ListField(child=serializers.UUIDField())
    error = serializers.CharField()


class LineageSerializer(serializers.Serializer[Any]):
    event = EventSerializer()
    events = EventSerializer(many=True, help_text="Every event upstream of it, itself included.")
    steps = LineageStepSerializer(many=True, help_text="The steps that produced those events.")
    truncated = serializers.BooleanField(help_text=f"More than {LINEAGE_LIMIT} events upstream.")


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "graph": run.graph_version.graph.slug,
        "version": run.graph_version.number,
        "kind": run.kind,
        "status": run.status,
        "error": run.error,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "deadline": run.deadline,
        "budget_usd": money(run.budget_usd) if run.budget_usd is not None else None,
    }


def step_routing(step: Step) -> dict[str, Any]:
    """StepRoutingSerializer's fields. A priority outside the three names (never written by
    the platform) is shown as the nearest one."""
    return {
        "model": step.model,
        "route": step.route,
        "waiting": step.waiting,
        "priority": priority_name(step.priority),
    }


def flow_steps(run: Run) -> dict[str, Any]:
    """RunFlowSerializer: the run's steps with a route or a waiting reason."""
    steps = list(
        Step.objects.filter(run_id=run.id)
        .exclude(route="", waiting="")  # either one set
        .only("id", "node_id", "item_index", "status", "model", "route", "waiting", "priority")
        .order_by("created_at", "node_id", "item_index")[: FLOW_STEPS_SHOWN + 1]
    )
    return {
        "steps": [
            {
                "id": step.id,
                "node": step.node_id,
                "item": step.item_index,
                "status": step.status,
                **step_routing(step),
            }
            for step in steps[:FLOW_STEPS_SHOWN]
        ],
        "truncated": len(steps) > FLOW_STEPS_SHOWN,
    }


def run_detail(run: Run, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The summary plus steps by node and status, tokens and cost, from `step_totals`
    (read here if not given), and the steps flow control routed or holds back."""
    rows = step_totals(run) if rows is None else rows
    per_node: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STEP_STATUSES, 0))
    totals = dict.fromkeys(STEP_STATUSES, 0)
    cost, tokens = Decimal(0), {"prompt": 0, "completion": 0, "wasted": 0}
    for row in rows:
        per_node[row["node_id"]][row["status"]] = row["n"]
        totals[row["status"]] += row["n"]
        cost += row["cost"] or 0
        tokens["prompt"] += row["tokens_in"] or 0
        tokens["completion"] += row["tokens_out"] or 0
        tokens["wasted"] += row["wasted"] or 0
    order = [node["id"] for node in run.spec["nodes"]]
    return {
        **run_summary(run),
        "cost_usd": money(cost),
        "tokens": tokens,
        "steps": totals,
        "nodes": [{"node": node, "counts": per_node[node]} for node in order],
        "flow": flow_steps(run),
    }


def event_data(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "node": event.node_id,
        "port": event.port,
        "step": event.producer_id,
        "key": event.key,
        "event_time": event.event_time,
        "created_at": event.created_at,
        "payload": event.payload,
    }


def terminal_nodes(spec: dict[str, Any]) -> list[str]:
    """Nodes nothing follows: where a run's results come out."""
    feeding = {as_edge(edge).source for edge in spec["edges"]}
    return [node["id"] for node in spec["nodes"] if node["id"] not in feeding]


def version_for(slug: str, number: int | None) -> GraphVersion:
    graph = graph_by_slug(slug)
    return version_of(graph, number) if number is not None else deployed(graph)


class RunListView(TenantAPIView):
    scopes = {"GET": RUNS_READ, "POST": RUNS_WRITE}

    @extend_schema(
        operation_id="runs_list",
        parameters=[RunFilterSerializer, *PAGE_PARAMETERS],
        responses=paginated(RunSummarySerializer),
    )
    def get(self, request: Request) -> Response:
        filters = valid(RunFilterSerializer, request.query_params)
        runs = Run.objects.select_related("graph_version__graph")
        for name, lookup in (
            ("status", "status"),
            ("kind", "kind"),
            ("graph", "graph_version__graph__slug"),
            ("created_after", "created_at__gte"),
            ("created_before", "created_at__lt"),
        ):
            if name in filters:
                runs = runs.filter(**{lookup: filters[name]})
        return page_of(request, runs, run_summary, ordering="-created_at")

    @extend_schema(
        operation_id="runs_create",
        request=RunCreateSerializer,
        responses={201: RunSerializer},
        description="Starts a run of a graph (its deployed version unless one is named).",
    )
    @idempotent
    def post(self, request: Request) -> Response:
        data = valid(RunCreateSerializer, request.data)
        version = version_for(data["graph"], data.get("version"))
        admit(self.caller.tenant, steps=1, events=1)
        run = start_run(version=version, payload=data["input"], actor=self.caller.actor)
        response = Response(run_detail(run_by_id(run.id)), status=status.HTTP_201_CREATED)
        response["Location"] = f"/api/runs/{run.id}/"
        return response


class RunDetailView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(operation_id="runs_get", responses=RunSerializer)
    def get(self, request: Request, run_id: UUID) -> Response:
        return Response(run_detail(run_by_id(run_id)))


class CancelView(TenantAPIView):
    scopes = {"POST": RUNS_WRITE}

    @extend_schema(
        operation_id="runs_cancel",
        request=None,
        responses=RunSerializer,
        description="Stops the run at once: waiting steps are skipped and generation stops.",
    )
    def post(self, request: Request, run_id: UUID) -> Response:
        run = run_by_id(run_id)
        if not cancel_run(run, actor=self.caller.actor):
            raise Conflict(f"The run already ended ({run.status}); there is nothing to cancel.")
        return Response(run_detail(run_by_id(run_id)))


class ReplayView(TenantAPIView):
    scopes = {"POST": RUNS_WRITE}

    @extend_schema(
        operation_id="runs_replay",
        request=ReplaySerializer,
        responses=ReplayResultSerializer,
        description="Queues the run's dead steps again with fresh attempts, in the same run.",
    )
    @idempotent
    def post(self, request: Request, run_id: UUID) -> Response:
        steps = valid(ReplaySerializer, request.data).get("steps")
        run = run_by_id(run_id)
        replayed = replay_dead_steps(run, actor=self.caller.actor, step_ids=steps)
        return Response({"replayed": replayed, "run": run_detail(run_by_id(run_id))})


class OutputsView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="runs_outputs",
        parameters=[
            OpenApiParameter(
                "node", str, description="Outputs of this node; the graph's last nodes if not."
            ),
            *PAGE_PARAMETERS,
        ],
        responses=paginated(EventSerializer),
    )
    def get(self, request: Request, run_id: UUID) -> Response:
        run = run_by_id(run_id)
        node = request.query_params.get("node")
        if node is not None and node not in run.nodes:
            raise serializers.ValidationError({"node": [f"the graph has no node {node!r}"]})
        nodes = [node] if node is not None else terminal_nodes(run.spec)
        events = Event.objects.filter(run_id=run.id, node_id__in=nodes, producer__isnull=False)
        return page_of(request, events, event_data, ordering=("created_at", "id"))


class LineageView(TenantAPIView):
    scopes = {"GET": RUNS_READ}

    @extend_schema(
        operation_id="runs_output_lineage",
        responses=LineageSerializer,
        description=(
            "Where one output came from: every event upstream of it back to the run's input,"
            " and the steps that produced them."
        ),
    )
    def get(self, request: Request, run_id: UUID, event_id: UUID) -> Response:
        run = run_by_id(run_id)
        event = Event.objects.filter(run_id=run.id, id=event_id).first()
        if event is None:
            raise NotFound("No such output in this run, or not yours.")
        upstream = _upstream_event_ids(run, event.id)
        events = list(Event.objects.filter(run_id=run.id, id__in=upstream).order_by("created_at"))
        producers = {e.producer_id for e in events if e.producer_id is not None}
        steps = Step.objects.filter(run_id=run.id, id__in=producers).order_by("created_at")
        return Response(
            {
                "event": event_data(event),
                "events": [event_data(e) for e in events],
                "steps": [
                    {
                        "id": s.id,
                        "node": s.node_id,
                        "type": s.node_type,
                        "status": s.status,
                        "attempt": s.attempt,
                        "inputs": s.inputs,
                        "error": s.error,
                        **step_routing(s),
                    }
                    for s in steps
                ],
                "truncated": len(upstream) > LINEAGE_LIMIT,
            }
        )


def _upstream_event_ids(run: Run, event_id: UUID) -> list[UUID]:
    """The event and everything upstream of it: each event's producer step, that step's
    input events, and so on back to the run's input. One recursive query, within the run."""
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH RECURSIVE up(id) AS ("
            "  SELECT %s::uuid"
            "  UNION"
            "  SELECT unnest(s.inputs) FROM up"
            "  JOIN runs_event e ON e.id = up.id AND e.run_id = %s AND e.tenant_id = %s"
            "  JOIN runs_step s ON s.id = e.producer_id"
            ") SELECT id FROM up LIMIT %s",
            [event_id, run.id, run.tenant_id, LINEAGE_LIMIT + 1],
        )
        return [row[0] for row in cursor.fetchall()]
