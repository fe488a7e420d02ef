"""The usage page: totals for a period (7, 30 or 90 days), bar charts per day and per
graph with their data tables, and this month's spend against the tenant's budget."""

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from apps.tenants.access import tenant_member_required
from apps.usage import formatting
from apps.usage.charts import Chart, Point, column_chart, row_chart
from apps.usage.reports import (
    DEFAULT_DAYS,
    PERIOD_DAYS,
    Amounts,
    BadPeriod,
    UsageReport,
    budget_status,
    parse_days,
    usage_report,
)

# Graphs drawn in the per-graph charts; the table below them lists every graph.
MAX_GRAPH_BARS = 20


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    value: Callable[[Amounts], int | Decimal]
    text: Callable[[Amounts], str]


MEASURES = [
    Measure("tokens", "Tokens", lambda a: a.tokens, lambda a: formatting.count(a.tokens)),
    Measure("cost", "Cost", lambda a: a.cost_usd, lambda a: formatting.usd(a.cost_usd)),
    Measure(
        "wasted",
        "Wasted tokens",
        lambda a: a.wasted_tokens,
        lambda a: formatting.count(a.wasted_tokens),
    ),
]


@dataclass(frozen=True)
class ChartView:
    id: str
    title: str
    summary: str  # the chart in one sentence, for its aria-label
    chart: Chart
    measure: str


def _summary(title: str, chart: Chart, total: str) -> str:
    if chart.peak is None:
        return f"{title}: none in this period."
    return f"{title}: {total} in all; highest {chart.peak.text} ({chart.peak.label})."


def _charts(report: UsageReport) -> tuple[list[ChartView], list[ChartView]]:
    per_day, per_graph = [], []
    graphs = report.per_graph[:MAX_GRAPH_BARS]
    for m in MEASURES:
        total = m.text(report.totals)
        days = column_chart(
            [
                Point(d.day.isoformat(), m.value(d.amounts), m.text(d.amounts))
                for d in report.per_day
            ]
        )
        title = f"{m.title} per day, last {report.period.days} days"
        per_day.append(ChartView(f"day-{m.key}", title, _summary(title, days, total), days, m.key))
        rows = row_chart([Point(g.name, m.value(g.amounts), m.text(g.amounts)) for g in graphs])
        title = f"{m.title} per graph, last {report.period.days} days"
        per_graph.append(
            ChartView(f"graph-{m.key}", title, _summary(title, rows, total), rows, m.key)
        )
    return per_day, per_graph


@require_GET
@tenant_member_required
def overview(request: HttpRequest) -> HttpResponse:
    context: dict[str, object] = {"periods": PERIOD_DAYS, "default_days": DEFAULT_DAYS}
    try:
        days = parse_days(request.GET.get("days"))
    except BadPeriod as exc:
        context["error"] = str(exc)
        return render(request, "usage/overview.html", context, status=400)
    report = usage_report(days)
    per_day, per_graph = _charts(report) if not report.empty else ([], [])
    context.update(
        days=days,
        report=report,
        day_charts=per_day,
        graph_charts=per_graph,
        more_graphs=max(0, len(report.per_graph) - MAX_GRAPH_BARS),
        budget=budget_status(),
    )
    return render(request, "usage/overview.html", context)
