"""The run page (status, steps and their outputs, result rows, usage) and the cancel action.

The page refreshes itself every two seconds while the run is active; live streaming
replaces that later."""

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from apps.graphs.forms import pretty_json
from apps.runs.access import run_by_id
from apps.runs.models import Event, ResultRow, Run, Step, StepStatus, Usage
from apps.runs.replay import ReplayRefused, replay_dead_steps, replayable_reason
from apps.runs.services import cancel_run
from apps.tenants.access import membership_of, require_role, tenant_member_required
from apps.tenants.models import Role

STEPS_PER_PAGE = 200
OUTPUT_PREVIEW_CHARS = 2000
INPUT_PREVIEW_CHARS = 20_000
ROWS_PER_TABLE = 100
DEAD_STEPS_SHOWN = 50


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
            format_seconds(step.duration_ms / 1000) if step.duration_ms is not None else "",
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


@require_GET
@tenant_member_required
def run_detail(request: HttpRequest, run_id: UUID) -> HttpResponse:
    run = run_by_id(run_id)
    steps = Step.objects.filter(run=run).order_by("created_at", "node_id", "item_index")
    steps_page = Paginator(steps, STEPS_PER_PAGE).get_page(request.GET.get("page"))
    context = {
        "run": run,
        "version": run.graph_version,
        "graph": run.graph_version.graph,
        "duration": run_duration(run),
        "input_json": _preview(run.input, INPUT_PREVIEW_CHARS),
        "steps_page": steps_page,
        "step_counts": list(steps.values_list("status").annotate(n=Count("id")).order_by("status")),
        "step_rows": _step_rows(list(steps_page.object_list)),
        "tables": _result_tables(run),
        "usage": _usage(run),
        "budget": usd(run.budget_usd),
        "can_cancel": run.is_active and membership_of(request).allows(Role.OPERATOR),
        **_dead_steps(request, run, steps),
    }
    return render(request, "runs/detail.html", context)


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
