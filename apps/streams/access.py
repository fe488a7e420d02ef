"""Tenant-checked reads of stream deployments, for the pages and the API: lookups by id
(missing and not-yours look the same: 404), the list's figures, and one deployment's status
as the page shows it. Every query goes through the tenant-scoped managers."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.paginator import Page, Paginator
from django.db.models import (
    Count,
    F,
    FloatField,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce, Greatest
from django.shortcuts import get_object_or_404
from django.utils import timezone

from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.validation import source_node
from apps.runs.models import Step, StepStatus
from apps.streams.models import (
    SOURCE_KINDS,
    DeadLetter,
    Deployment,
    PartitionOffset,
    ScheduleTick,
    SourceKind,
    WebhookDelivery,
)
from apps.streams.segment import Segment, segment_summary

# A partition's rate counts towards events/s while its worker reported within this window.
RATE_FRESH = timedelta(seconds=15)
# Webhook and schedule deployments have no partitions: their events/s is the records taken
# over this window.
EVENT_WINDOW = timedelta(seconds=60)
DEAD_LETTERS_PER_PAGE = 20
# The steps counted as waiting on the page: not yet settled.
WAITING_STEP_STATUSES = (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.FAILED)


def deployment_for(deployment_id: UUID) -> Deployment:
    """The current tenant's deployment, or 404 (missing and another tenant's alike)."""
    return get_object_or_404(
        Deployment.objects.select_related("graph", "version", "run", "created_by"),
        id=deployment_id,
    )


def deployment_of_graph(graph: StreamGraph) -> Deployment | None:
    """The graph's deployment (one per graph), if it has one."""
    return Deployment.objects.select_related("version").filter(graph=graph).first()


def stream_source_kind(version: GraphVersion | None) -> str | None:
    """The source kind a version would deploy as, or None when it does not start with a
    stream source (or there is no version)."""
    if version is None:
        return None
    try:
        source = source_node(version.spec)
    except ValueError:
        return None
    kind = SOURCE_KINDS.get(source["type"])
    return str(kind) if kind is not None else None


def dead_letter_for(deployment: Deployment, dead_letter_id: int) -> DeadLetter:
    """One of the deployment's dead letters, or 404."""
    return get_object_or_404(DeadLetter.objects, deployment=deployment, id=dead_letter_id)


def dead_letters_of(deployment: Deployment) -> QuerySet[DeadLetter]:
    """The deployment's dead letters, newest first, replayed ones included."""
    return DeadLetter.objects.filter(deployment=deployment).order_by("-created_at", "-id")


def versions_of(deployment: Deployment) -> QuerySet[GraphVersion]:
    """The graph's versions, newest first: what a redeploy may choose."""
    return GraphVersion.objects.filter(graph_id=deployment.graph_id).order_by("-number")


# -- the list -----------------------------------------------------------------------------


def _summed(queryset: QuerySet[Any], value: Any, output: Any) -> Subquery:
    """One figure summed over the rows of `queryset` that point at the outer deployment."""
    rows = queryset.order_by().values("deployment").annotate(total=Sum(value)).values("total")
    return Subquery(rows, output_field=output)


def deployments_with_figures(now: datetime | None = None) -> QuerySet[Deployment]:
    """The current tenant's deployments, newest first, each annotated with what the list
    shows (read by `figures_of`): total lag, the Kafka rate, the records taken in the last
    minute (webhook and schedule) and the dead letters not yet replayed. One query."""
    now = now or timezone.now()
    offsets = PartitionOffset.objects.filter(deployment=OuterRef("pk"))
    lag = Greatest(F("high_watermark") - F("next_offset"), 0)
    deliveries = (
        _recent_deliveries(now)
        .filter(deployment=OuterRef("pk"))
        .order_by()
        .values("deployment")
        .annotate(n=Count("id"))
        .values("n")
    )
    ticks = (
        _recent_ticks(now)
        .filter(deployment=OuterRef("pk"))
        .order_by()
        .values("deployment")
        .annotate(n=Count("id"))
        .values("n")
    )
    unreplayed = (
        DeadLetter.objects.filter(deployment=OuterRef("pk"), replayed_at__isnull=True)
        .order_by()
        .values("deployment")
        .annotate(n=Count("id"))
        .values("n")
    )
    return (
        Deployment.objects.select_related("graph", "version")
        .annotate(
            total_lag=Coalesce(_summed(offsets, lag, IntegerField()), 0),
            kafka_rate=Coalesce(
                _summed(offsets.filter(updated_at__gte=now - RATE_FRESH), "rate", FloatField()),
                0.0,
            ),
            recent_events=Coalesce(Subquery(deliveries, output_field=IntegerField()), 0)
            + Coalesce(Subquery(ticks, output_field=IntegerField()), 0),
            unreplayed=Coalesce(Subquery(unreplayed, output_field=IntegerField()), 0),
        )
        .order_by("-created_at", "-id")
    )


@dataclass(frozen=True)
class DeploymentFigures:
    """What the list shows of one deployment."""

    deployment: Deployment
    lag: int
    events_per_s: float
    dead_letters: int


def figures_of(deployment: Deployment) -> DeploymentFigures:
    """The figures of a row from `deployments_with_figures`."""
    annotated: Any = deployment
    return DeploymentFigures(
        deployment=deployment,
        lag=int(annotated.total_lag),
        events_per_s=_events_per_s(
            deployment.source_kind, annotated.kafka_rate, annotated.recent_events
        ),
        dead_letters=int(annotated.unreplayed),
    )


def _events_per_s(source_kind: str, kafka_rate: float, recent_events: int) -> float:
    if source_kind == SourceKind.KAFKA:
        return float(kafka_rate)
    return recent_events / EVENT_WINDOW.total_seconds()


def _recent_deliveries(now: datetime) -> QuerySet[WebhookDelivery]:
    """Webhook requests taken in the window (indexed by deployment and time: a stream run's
    events are too many to count on every refresh)."""
    return WebhookDelivery.objects.filter(received_at__gte=now - EVENT_WINDOW)


def _recent_ticks(now: datetime) -> QuerySet[ScheduleTick]:
    return ScheduleTick.objects.filter(tick_at__gte=now - EVENT_WINDOW, tick_at__lte=now)


# -- one deployment -----------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionRow:
    topic: str
    partition: int
    next_offset: int
    high_watermark: int
    lag: int
    records: int
    dead_letters: int
    rate: float  # records/s over the worker's recent batches
    updated_at: datetime
    fresh: bool  # reported within RATE_FRESH: its rate counts towards events/s


@dataclass(frozen=True)
class WaitingSteps:
    """The stream run's unsettled steps of one node, by status."""

    node_id: str
    queued: int
    running: int
    failed: int

    @property
    def total(self) -> int:
        return self.queued + self.running + self.failed


@dataclass(frozen=True)
class DeploymentView:
    deployment: Deployment
    status: str
    version: int
    source_kind: str
    partitions: list[PartitionRow]
    total_lag: int
    events_per_s: float
    waiting: list[WaitingSteps]
    dead_letter_count: int  # not yet replayed
    dead_letters: Page  # newest first, replayed ones included
    segment: dict[str, Any]  # segment_summary: source, inside, steps
    webhook_url: str | None  # a path: the page makes it absolute
    last_tick: datetime | None

    @property
    def waiting_total(self) -> int:
        return sum(row.total for row in self.waiting)


def webhook_path(deployment: Deployment) -> str:
    return f"/hooks/{deployment.id}/"


def deployment_status(
    deployment: Deployment, *, page: int | str | None = None, now: datetime | None = None
) -> DeploymentView:
    """Everything the deployment page shows; `page` is the dead letters' page number."""
    now = now or timezone.now()
    partitions = [
        PartitionRow(
            topic=o.topic,
            partition=o.partition,
            next_offset=o.next_offset,
            high_watermark=o.high_watermark,
            lag=o.lag,
            records=o.records,
            dead_letters=o.dead_letters,
            rate=o.rate,
            updated_at=o.updated_at,
            fresh=o.updated_at >= now - RATE_FRESH,
        )
        for o in PartitionOffset.objects.filter(deployment=deployment).order_by(
            "topic", "partition"
        )
    ]
    if deployment.source_kind == SourceKind.KAFKA:
        events_per_s = sum(row.rate for row in partitions if row.fresh)
    else:
        taken = _recent_deliveries(now).filter(deployment=deployment).count()
        taken += _recent_ticks(now).filter(deployment=deployment).count()
        events_per_s = _events_per_s(deployment.source_kind, 0.0, taken)
    return DeploymentView(
        deployment=deployment,
        status=deployment.status,
        version=deployment.version.number,
        source_kind=deployment.source_kind,
        partitions=partitions,
        total_lag=sum(row.lag for row in partitions),
        events_per_s=events_per_s,
        waiting=waiting_steps(deployment),
        dead_letter_count=dead_letters_of(deployment).filter(replayed_at__isnull=True).count(),
        dead_letters=Paginator(dead_letters_of(deployment), DEAD_LETTERS_PER_PAGE).get_page(page),
        segment=segment_summary(Segment(deployment.version.spec, scope=deployment.id.hex[:12])),
        webhook_url=webhook_path(deployment)
        if deployment.source_kind == SourceKind.WEBHOOK
        else None,
        last_tick=_last_tick(deployment),
    )


def waiting_steps(deployment: Deployment) -> list[WaitingSteps]:
    """The stream run's steps not yet settled, per node, in the graph's node order."""
    rows = (
        Step.objects.filter(run_id=deployment.run_id, status__in=WAITING_STEP_STATUSES)
        .values("node_id")
        .annotate(
            queued=Count("id", filter=Q(status=StepStatus.QUEUED)),
            running=Count("id", filter=Q(status=StepStatus.RUNNING)),
            failed=Count("id", filter=Q(status=StepStatus.FAILED)),
        )
        .order_by()
    )
    order = {node["id"]: i for i, node in enumerate(deployment.version.spec["nodes"])}
    found = [
        WaitingSteps(row["node_id"], row["queued"], row["running"], row["failed"]) for row in rows
    ]
    return sorted(found, key=lambda row: (order.get(row.node_id, len(order)), row.node_id))


def _last_tick(deployment: Deployment) -> datetime | None:
    if deployment.source_kind != SourceKind.SCHEDULE:
        return None
    if deployment.last_tick_at is not None:
        return deployment.last_tick_at
    latest = ScheduleTick.objects.filter(deployment=deployment).order_by("-tick_at").first()
    return latest.tick_at if latest is not None else None
