"""The run page (status, graph, steps and their lineage, result rows, usage), its htmx
partials, and the cancel and replay actions.

The page is rendered whole on first load. static/runs/live.js follows the run's live feed
(apps/live) and fires `sluice:refresh` on the body when steps or the run change; each
partial (summary, graph, steps, results, the open step's details) then reloads itself
from its own view. Without JavaScript an active run's page refreshes itself instead."""

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_GET, require_POST

from apps.graphs.forms import pretty_json
from apps.runs.access import run_by_id
from apps.runs.graph_layout import NODE_HEIGHT, NODE_WIDTH, PlacedNode, layout
from apps.runs.models import Event, ResultRow, Run, Step, StepStatus, Usage
from apps.runs.replay import ReplayRefused, replay_dead_steps, replayable_reason
from apps.runs.services import cancel_run
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role
from workers.flow.routing import priority_name

STEPS_PER_PAGE = 200
OUTPUT_PREVIEW_CHARS = 2000
INPUT_PREVIEW_CHARS = 20_000
ROWS_PER_TABLE = 100
DEAD_STEPS_SHOWN = 50
LINEAGE_SHOWN = 50  # input and output events listed on a step's details
LINEAGE_PREVIEW_CHARS = 1000

# The graph's per-node counts: a step's status and the category it is counted in. A failed
# step waits for its next attempt, but it has failed once: it shows as a failure.
COUNT_CATEGORIES = ("queued", "running", "done", "failed", "skipped")
CATEGORY_OF_STATUS = {
    StepStatus.QUEUED: "queued",
    StepStatus.RUNNING: "running",
    StepStatus.DONE: "done",
    StepStatus.FAILED: "failed",
    StepStatus.DEAD: "failed",
    StepStatus.SKIPPED: "skipped",
}
COUNT_WIDTH, COUNT_GAP = 34, 4  # the count boxes along the bottom of a node


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def elapsed(start: datetime | None, end: datetime | None) -> str:
    """Start to end, or to now while it is still going; "" when it never started."""
    if start is None:
        return ""
    return format_seconds(max(((end or timezone.now()) - start).total_seconds(), 0.0))


def milliseconds(ms: float | None) -> str:
    return "" if ms is None else format_seconds(ms / 1000)


def run_duration(run: Run) -> str:
    return elapsed(run.started_at, run.finished_at)


@dataclass(frozen=True)
class StepRow:
    step: Step
    duration: str
    outputs: list[str]


@dataclass(frozen=True)
class ResultTable:
    name: str
    count: int
    rows: list[str]


@dataclass(frozen=True)
class UsageSummary:
    tokens_in: int
    tokens_out: int
    wasted_tokens: int
    cost_usd: Decimal
    engines: list[str]
    models: list[str]
    stopped: int  # attempts whose generation a stop signal ended

    @property
    def simulated(self) -> bool:
        return "simulated" in self.engines


def _preview(payload: object, limit: int = OUTPUT_PREVIEW_CHARS) -> str:
    """Pretty JSON, cut at `limit` characters with a note of how much was left out."""
    text = pretty_json(payload)
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters)"


def _step_rows(steps: list[Step]) -> list[StepRow]:
    outputs: dict[UUID, list[str]] = defaultdict(list)
    events = Event.objects.filter(producer__in=[step.id for step in steps]).order_by("seq")
    for event in events:
        if event.producer_id is not None:
            outputs[event.producer_id].append(_preview(event.payload))
    return [
        StepRow(
            step,
            milliseconds(step.duration_ms),
            outputs[step.id],
        )
        for step in steps
    ]


def _result_tables(run: Run) -> list[ResultTable]:
    rows = ResultRow.objects.filter(run=run)
    counts = rows.values_list("table").annotate(n=Count("id")).order_by("table")
    return [
        ResultTable(
            table,
            count,
            [
                _preview(r.data)
                for r in rows.filter(table=table).order_by("created_at", "id")[:ROWS_PER_TABLE]
            ],
        )
        for table, count in counts
    ]


def _usage(run: Run) -> UsageSummary | None:
    usage = Usage.objects.filter(run=run)
    totals = usage.aggregate(
        rows=Count("id"),
        tokens_in=Sum("tokens_in"),
        tokens_out=Sum("tokens_out"),
        wasted=Sum("wasted_tokens"),
        cost=Sum("cost_usd"),
        stopped=Count("id", filter=Q(stop_latency_ms__isnull=False)),
    )
    if not totals["rows"]:
        return None
    return UsageSummary(
        tokens_in=totals["tokens_in"],
        tokens_out=totals["tokens_out"],
        wasted_tokens=totals["wasted"],
        cost_usd=totals["cost"],
        engines=sorted(set(usage.values_list("engine", flat=True))),
        models=sorted(set(usage.values_list("model", flat=True))),
        stopped=totals["stopped"],
    )


def usd(amount: Decimal | None) -> str:
    """A dollar amount as written, without trailing zeros or exponent: 20, 0.0005."""
    return "" if amount is None else f"{amount.normalize():f}"


@dataclass(frozen=True)
class CountBox:
    category: str
    n: int
    x: float


@dataclass(frozen=True)
class GraphNode:
    """A placed node with its steps counted by category, as the graph partial draws it."""

    placed: PlacedNode
    counts: dict[str, int]

    @property
    def state(self) -> str:
        """The one word for the node's look: failures first, then work in flight."""
        for category in ("failed", "running", "queued", "done", "skipped"):
            if self.counts[category]:
                return category
        return "idle"

    @property
    def boxes(self) -> list[CountBox]:
        left = (NODE_WIDTH - len(COUNT_CATEGORIES) * (COUNT_WIDTH + COUNT_GAP) + COUNT_GAP) / 2
        return [
            CountBox(category, self.counts[category], left + i * (COUNT_WIDTH + COUNT_GAP))
            for i, category in enumerate(COUNT_CATEGORIES)
        ]

    @property
    def label(self) -> str:
        counts = ", ".join(f"{self.counts[c]} {c}" for c in COUNT_CATEGORIES)
        return f"{self.placed.id} ({self.placed.type}): {counts}"


def _graph_context(run: Run) -> dict[str, object]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_CATEGORIES, 0))
    by_node_status = (
        Step.objects.filter(run=run).values("node_id", "status").annotate(n=Count("id")).order_by()
    )
    for row in by_node_status:
        counts[row["node_id"]][CATEGORY_OF_STATUS[row["status"]]] += row["n"]
    drawn = layout(run.spec)
    return {
        "graph_layout": drawn,
        "graph_nodes": [GraphNode(node, counts[node.id]) for node in drawn.nodes],
        "count_categories": COUNT_CATEGORIES,
        "node_width": NODE_WIDTH,
        "node_height": NODE_HEIGHT,
    }


@dataclass(frozen=True)
class LineageEvent:
    """An input or output event of a step: its payload, and for an output the steps that
    took it as input."""

    event: Event
    preview: str
    consumers: list[Step]


def _step_detail_context(run: Run, step: Step) -> dict[str, object]:
    inputs = (
        Event.objects.filter(run=run, id__in=step.inputs)
        .select_related("producer")
        .order_by("created_at", "seq")[:LINEAGE_SHOWN]
    )
    outputs = Event.objects.filter(run=run, producer=step).order_by("seq")
    shown = list(outputs[:LINEAGE_SHOWN])
    consumers: dict[UUID, list[Step]] = defaultdict(list)
    if shown:  # one query for the consumers of every output shown
        ids = {event.id for event in shown}
        taking = Step.objects.filter(run=run, inputs__overlap=list(ids))
        for consumer in taking.order_by("created_at", "node_id", "item_index"):
            for event_id in consumer.inputs:
                if event_id in ids:
                    consumers[event_id].append(consumer)
    return {
        "step": step,
        "duration": milliseconds(step.duration_ms),
        "operator_time": milliseconds(step.operator_ms),
        "priority": priority_name(step.priority),
        "inputs": [LineageEvent(e, _preview(e.payload, LINEAGE_PREVIEW_CHARS), []) for e in inputs],
        "input_count": len(step.inputs),
        "outputs": [
            LineageEvent(e, _preview(e.payload, LINEAGE_PREVIEW_CHARS), consumers[e.id])
            for e in shown
        ],
        "output_count": outputs.count() if len(shown) == LINEAGE_SHOWN else len(shown),
        "usage_rows": list(Usage.objects.filter(run=run, step=step).order_by("at", "id")),
    }


def _dead_steps(request: HttpRequest, run: Run, steps: QuerySet[Step]) -> dict[str, object]:
    dead = steps.filter(status=StepStatus.DEAD)
    count = dead.count()
    if not count:
        return {"dead_steps": [], "dead_count": 0}
    blocked = replayable_reason(run)
    return {
        "dead_steps": list(dead[:DEAD_STEPS_SHOWN]),
        "dead_count": count,
        "can_replay": blocked is None and membership_of(request).allows(Role.OPERATOR),
        "replay_blocked": blocked,
    }


def _summary_context(request: HttpRequest, run: Run) -> dict[str, object]:
    return {
        "run": run,
        "version": run.graph_version,
        "graph": run.graph_version.graph,
        "duration": run_duration(run),
        "usage": _usage(run),
        "budget": usd(run.budget_usd),
        "can_cancel": run.is_active and membership_of(request).allows(Role.OPERATOR),
        **_dead_steps(request, run, Step.objects.filter(run=run)),
    }


def _steps_context(request: HttpRequest, run: Run) -> dict[str, object]:
    steps = Step.objects.filter(run=run).order_by("created_at", "node_id", "item_index")
    steps_page = Paginator(steps, STEPS_PER_PAGE).get_page(request.GET.get("page"))
    return {
        "run": run,
        "steps_page": steps_page,
        "step_counts": list(steps.values_list("status").annotate(n=Count("id")).order_by("status")),
        "step_rows": _step_rows(list(steps_page.object_list)),
    }


def _feed_urls(run: Run) -> dict[str, str]:
    """Where live.js follows the run (apps/live/README.md). WebSocket routes cannot be
    reversed, so that path is written out; the step URL is a template the script fills."""
    return {
        "ws_url": f"/ws/runs/{run.id}/",
        "sse_url": reverse("run-events", args=[run.id]),
        "step_url": reverse("runs:step", args=[run.id, UUID(int=0)]),
    }


@require_GET
@tenant_member_required
def run_detail(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    context = {
        **_summary_context(request, run),
        **_graph_context(run),
        **_steps_context(request, run),
        "tables": _result_tables(run),
        "input_json": _preview(run.input, INPUT_PREVIEW_CHARS),
        "live": _feed_urls(run),
    }
    return render(request, "runs/detail.html", context)


@require_GET
@tenant_member_required
def summary(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    return render(request, "runs/partials/summary.html", _summary_context(request, run))


@require_GET
@tenant_member_required
def graph(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    return render(request, "runs/partials/graph.html", {"run": run, **_graph_context(run)})


@require_GET
@tenant_member_required
def steps(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    return render(request, "runs/partials/steps.html", _steps_context(request, run))


@require_GET
@tenant_member_required
def results(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    return render(
        request, "runs/partials/results.html", {"run": run, "tables": _result_tables(run)}
    )


@require_GET
@tenant_member_required
def step_detail(request: HttpRequest, run_id: UUID, step_id: UUID) -> HttpResponse:
    """The fragment for htmx; for a plain link (no JavaScript) the same inside a page."""
    run = run_by_id(run_id)
    step = get_object_or_404(Step.objects, run=run, id=step_id)
    fragment = request.headers.get("HX-Request") == "true"
    context = {
        "run": run,
        "graph": run.graph_version.graph,
        "level": 3 if fragment else 2,  # its heading: under the run page's h2, or the page's h1
        **_step_detail_context(run, step),
    }
    template = "runs/partials/step.html" if fragment else "runs/step.html"
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


@require_POST
@tenant_member_required
def cancel(request: HttpRequest, run_id: UUID) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    run = run_by_id(run_id)
    if cancel_run(run, actor=request.user):
        messages.success(request, "Run cancelled")
    else:
        messages.info(request, "Run had already finished")
    return redirect("runs:detail", run_id=run.id)


@require_POST
@tenant_member_required
def replay(request: HttpRequest, run_id: UUID) -> HttpResponse:
    require_role(request, Role.OPERATOR)
    run = run_by_id(run_id)
    try:
        count = replay_dead_steps(run, actor=request.user)
    except ReplayRefused as exc:
        messages.error(request, f"Not replayed: {exc}")
    else:
        messages.success(request, f"Replaying {count} dead step{'' if count == 1 else 's'}")
    return redirect("runs:detail", run_id=run.id)
