"""Tenant-checked reads of stream deployments, for the pages and the API: lookups by id
(missing and not-yours look the same: 404), the list's figures, one deployment's status as
the page shows it, and its windows' and memories' state. Every query goes through the
tenant-scoped managers."""

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.paginator import Page, Paginator
from django.db.models import (
    BigIntegerField,
    Case,
    Count,
    F,
    FloatField,
    IntegerField,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    When,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, Greatest
from django.shortcuts import get_object_or_404
from django.utils import timezone

from apps.graphs.models import GraphVersion, StreamGraph
from apps.graphs.validation import source_node
from apps.runs.models import Step, StepStatus
from apps.streams.models import (
    SOURCE_KINDS,
    DeadLetter,
    Deployment,
    KeyedState,
    PartitionOffset,
    ScheduleTick,
    SourceKind,
    WebhookDelivery,
)
from apps.streams.segment import Segment, segment_summary
from workers.operators.windows import state_owners

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
    # Event time up to which the partition is complete; None before its first record.
    watermark: datetime | None
    # How far the watermark is behind the wall clock (negative: ahead of it).
    watermark_behind: timedelta | None
    late: dict[str, int]  # events later than their window allowed, per window node

    @property
    def late_total(self) -> int:
        return sum(self.late.values())

    @property
    def behind(self) -> str:
        """ "12 s behind", "3 min behind", "2 s ahead": the watermark against the clock."""
        if self.watermark_behind is None:
            return ""
        return _distance(self.watermark_behind.total_seconds())


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
        _partition_row(o, now)
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


def _partition_row(offset: PartitionOffset, now: datetime) -> PartitionRow:
    watermark = datetime_of_ms(offset.watermark_ms)
    return PartitionRow(
        topic=offset.topic,
        partition=offset.partition,
        next_offset=offset.next_offset,
        high_watermark=offset.high_watermark,
        lag=offset.lag,
        records=offset.records,
        dead_letters=offset.dead_letters,
        rate=offset.rate,
        updated_at=offset.updated_at,
        fresh=offset.updated_at >= now - RATE_FRESH,
        watermark=watermark,
        watermark_behind=now - watermark if watermark is not None else None,
        late=late_counts(offset.late),
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


def datetime_of_ms(ms: int | None) -> datetime | None:
    """Epoch milliseconds as an aware UTC datetime; None for None and for a value no datetime
    holds (past year 9999), so a stray number never breaks a page."""
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def late_counts(raw: object) -> dict[str, int]:
    """A partition's `late` JSON as {node id: count} by node id, whatever else it may hold
    left out."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(node): count
        for node, count in sorted(raw.items())
        if isinstance(count, int) and not isinstance(count, bool)
    }


def _distance(seconds: float) -> str:
    size = abs(seconds)
    for unit, length in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if size >= 2 * length:
            amount = f"{round(size / length)} {unit}"
            break
    else:
        amount = f"{round(size)} s"
    return f"{amount} ahead" if seconds < 0 else f"{amount} behind"


# -- windows and memory -------------------------------------------------------------------

# A window entry's end (epoch ms) where it is a plain integer; anything else counts as none.
_END_MS = Case(
    When(value__end__regex=r"^-?[0-9]{1,18}$", then=Cast(KT("value__end"), BigIntegerField())),
    default=None,
    output_field=BigIntegerField(),
)


@dataclass(frozen=True)
class StateNode:
    """One stateful node of the deployed version (a window, a memory)."""

    id: str
    type: str


@dataclass(frozen=True)
class OwnerState:
    """The state of one owner: a window node's open windows, or a memory's lists (a memory
    node's own, or the store its nodes share), over all partitions."""

    owner: str
    nodes: list[StateNode]  # in the spec's order
    open_entries: int  # open windows; for memory, the keys held (per partition)
    oldest_end: datetime | None  # windows: the end of the oldest open one
    late_by_node: dict[str, int] = field(default_factory=dict)

    @property
    def late(self) -> int:
        return sum(self.late_by_node.values())

    @property
    def type(self) -> str:
        return self.nodes[0].type

    @property
    def is_window(self) -> bool:
        return self.type.startswith("window.")

    @property
    def store(self) -> str:
        """The shared memory store's name; "" for a node's own state."""
        return self.owner.removeprefix("store:") if self.owner.startswith("store:") else ""


@dataclass(frozen=True)
class NodeStateRow:
    """What the page shows of one stateful node."""

    node: StateNode
    state: OwnerState

    @property
    def late(self) -> int:
        return self.state.late_by_node.get(self.node.id, 0)

    @property
    def shared_with(self) -> list[str]:
        return [n.id for n in self.state.nodes if n.id != self.node.id]


def stateful_nodes(spec: dict[str, Any]) -> dict[str, list[StateNode]]:
    """The version's state owners, each with its nodes, in the spec's order."""
    return {
        owner: [StateNode(node["id"], node["type"]) for node in nodes]
        for owner, nodes in state_owners(spec).items()
    }


def state_of(
    deployment: Deployment, partitions: list[PartitionRow] | None = None
) -> list[OwnerState]:
    """The deployed version's state owners with what they hold: one aggregate query over the
    keyed state (grouped by owner) and the partitions' late counts (read here unless the
    caller has them from `deployment_status`)."""
    owners = stateful_nodes(deployment.version.spec)
    if not owners:
        return []
    if partitions is None:
        lates = [
            late_counts(raw)
            for raw in PartitionOffset.objects.filter(deployment=deployment).values_list(
                "late", flat=True
            )
        ]
    else:
        lates = [p.late for p in partitions]
    late: Counter[str] = Counter()
    for counts in lates:
        late.update(counts)
    held = {
        row["owner"]: row
        for row in KeyedState.objects.filter(deployment=deployment, owner__in=list(owners))
        .values("owner")
        .annotate(entries=Count("id"), oldest_end=Min(_END_MS))
        .order_by()
    }
    return [
        OwnerState(
            owner=owner,
            nodes=nodes,
            open_entries=held[owner]["entries"] if owner in held else 0,
            oldest_end=datetime_of_ms(held[owner]["oldest_end"]) if owner in held else None,
            late_by_node={n.id: late[n.id] for n in nodes if late[n.id]},
        )
        for owner, nodes in owners.items()
    ]


def state_by_node(owners: list[OwnerState], spec: dict[str, Any]) -> list[NodeStateRow]:
    """The owners' state as the page lists it: a row per stateful node, in the spec's order."""
    order = {node.get("id"): i for i, node in enumerate(spec.get("nodes", []))}
    rows = [NodeStateRow(node, state) for state in owners for node in state.nodes]
    return sorted(rows, key=lambda row: order.get(row.node.id, len(order)))


@dataclass(frozen=True)
class StateDrop:
    """One entry of `services.state_to_drop`, as the redeploy confirmation words it."""

    owner: str
    nodes: list[str]
    entries: int
    reason: str  # "config changed", "removed"
    type: str

    @property
    def label(self) -> str:
        """ "window 'w'", "memory 'm'", "memory store 'chat' (nodes a, b)"."""
        if self.owner.startswith("store:"):
            store = self.owner.removeprefix("store:")
            return f"memory store '{store}' (nodes {', '.join(self.nodes)})"
        kind = "window" if self.type.startswith("window.") else "memory"
        return f"{kind} '{self.owner}'"

    @property
    def held(self) -> str:
        """ "12 open windows", "1 key"."""
        if self.type.startswith("window."):
            noun = "open window" if self.entries == 1 else "open windows"
        else:
            noun = "key" if self.entries == 1 else "keys"
        return f"{self.entries} {noun}"


def drops_of(deployment: Deployment, drops: list[dict[str, Any]]) -> list[StateDrop]:
    """`services.state_to_drop`'s entries with their nodes' type, for the page."""
    types = {node.get("id"): node.get("type", "") for node in deployment.version.spec["nodes"]}
    return [
        StateDrop(
            owner=drop["owner"],
            nodes=list(drop["nodes"]),
            entries=int(drop["entries"]),
            reason=str(drop["reason"]),
            type=str(types.get(drop["nodes"][0], "")) if drop["nodes"] else "",
        )
        for drop in drops
    ]
