"""The usage report: sums per day (every day of the period) and per graph, computed in
PostgreSQL over the current tenant's rows only, and the month's spend against the budget."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.tenants.context import tenant_context
from apps.usage.reports import (
    DEFAULT_DAYS,
    Amounts,
    BadPeriod,
    budget_status,
    parse_days,
    usage_report,
)
from tests.conftest import World
from tests.usage.helpers import add_usage, another_run, graph_with_run, noon

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
TODAY = NOW.date()


def day(offset: int) -> datetime:
    return noon(TODAY - timedelta(days=offset))


def test_sums_per_day_cover_every_day_of_the_period(world: World) -> None:
    run = graph_with_run(world, "summarize")
    add_usage(run, day(2), tokens_in=100, tokens_out=50, wasted=5, seconds=1.5, cost="0.25")
    add_usage(run, day(2), tokens_in=10, tokens_out=20, wasted=0, seconds=0.5, cost="0.05")
    add_usage(run, day(0), tokens_in=1, tokens_out=2, wasted=2, seconds=0.25, cost="0.001")
    # 00:00:00 UTC on the first day is in; a moment before it is not.
    first_day = datetime.combine(TODAY - timedelta(days=6), datetime.min.time(), tzinfo=UTC)
    add_usage(run, first_day, tokens_in=7)
    add_usage(run, first_day - timedelta(microseconds=1), tokens_in=1000)
    with tenant_context(world.acme):
        report = usage_report(7, now=NOW)
    assert [d.day for d in report.per_day] == [TODAY - timedelta(days=i) for i in range(6, -1, -1)]
    by_day = {d.day: d.amounts for d in report.per_day}
    assert by_day[TODAY - timedelta(days=2)] == Amounts(110, 70, 5, 2.0, Decimal("0.30"))
    assert by_day[TODAY] == Amounts(1, 2, 2, 0.25, Decimal("0.001"))
    assert by_day[TODAY - timedelta(days=6)] == Amounts(tokens_in=7)
    assert by_day[TODAY - timedelta(days=1)] == Amounts()  # a day with no usage: zero
    assert report.records == 4 and not report.empty
    assert report.totals == Amounts(118, 72, 7, 2.25, Decimal("0.301"))
    assert report.totals.tokens == 190


def test_sums_per_graph_highest_cost_first(world: World) -> None:
    cheap = graph_with_run(world, "cheap")
    dear = graph_with_run(world, "dear")
    dear_again = another_run(world, dear.graph_version.graph)  # the same graph again
    add_usage(cheap, day(1), tokens_in=500, cost="0.01")
    add_usage(dear, day(1), tokens_out=10, wasted=3, cost="1.00")
    add_usage(dear_again, day(3), tokens_out=5, cost="0.50")
    with tenant_context(world.acme):
        report = usage_report(30, now=NOW)
    assert [(g.slug, g.name) for g in report.per_graph] == [("dear", "Dear"), ("cheap", "Cheap")]
    assert report.per_graph[0].amounts == Amounts(0, 15, 3, 0.0, Decimal("1.50"))
    assert report.per_graph[1].amounts == Amounts(500, 0, 0, 0.0, Decimal("0.01"))


def test_another_tenants_usage_is_never_counted(world: World) -> None:
    ours = graph_with_run(world, "ours")
    theirs = graph_with_run(world, "theirs", tenant=world.globex)
    add_usage(ours, day(1), tokens_in=1, cost="0.10")
    add_usage(theirs, day(1), tokens_in=1000, cost="99")
    with tenant_context(world.acme):
        report = usage_report(30, now=NOW)
        budget = budget_status(now=NOW)
    assert report.totals == Amounts(tokens_in=1, cost_usd=Decimal("0.10"))
    assert [g.slug for g in report.per_graph] == ["ours"]
    assert budget.spent_usd == Decimal("0.10")
    with tenant_context(world.globex):
        assert usage_report(30, now=NOW).totals.tokens_in == 1000


def test_the_report_is_aggregated_in_a_fixed_number_of_queries(world: World) -> None:
    run = graph_with_run(world, "busy")
    for offset in range(20):
        add_usage(run, day(offset), tokens_in=offset, cost="0.01")
    with tenant_context(world.acme), CaptureQueriesContext(connection) as queries:
        report = usage_report(90, now=NOW)
    assert report.records == 20 and report.totals.tokens_in == sum(range(20))
    assert len(queries) == 3  # totals, per day, per graph: never one per row


def test_an_empty_period_is_empty_with_zero_days(world: World) -> None:
    run = graph_with_run(world, "old")
    add_usage(run, day(40), tokens_in=5)
    with tenant_context(world.acme):
        report = usage_report(30, now=NOW)
    assert report.empty and report.totals == Amounts() and report.per_graph == []
    assert len(report.per_day) == 30 and all(d.amounts == Amounts() for d in report.per_day)
    with tenant_context(world.acme):
        assert usage_report(90, now=NOW).totals.tokens_in == 5


def test_the_months_spend_against_the_budget(world: World) -> None:
    run = graph_with_run(world, "spend")
    add_usage(run, datetime(2026, 3, 1, 0, 0, tzinfo=UTC), cost="3")
    add_usage(run, datetime(2026, 3, 9, tzinfo=UTC), cost="2")
    add_usage(run, datetime(2026, 2, 28, 23, 59, tzinfo=UTC), cost="40")  # last month
    with tenant_context(world.acme):
        unset = budget_status(now=NOW)
    assert unset.budget_usd is None and unset.spent_usd == Decimal(5) and unset.percent is None
    world.acme.monthly_budget_usd = Decimal(20)
    with tenant_context(world.acme):
        status = budget_status(now=NOW)
    assert status.month.isoformat() == "2026-03-01"
    assert status.percent == 25.0 and status.bar_percent == 25.0 and not status.over
    world.acme.monthly_budget_usd = Decimal(4)
    with tenant_context(world.acme):
        over = budget_status(now=NOW)
    assert over.over and over.percent == 125.0 and over.bar_percent == 100.0


@pytest.mark.parametrize(("raw", "days"), [(None, DEFAULT_DAYS), ("", 30), ("7", 7), ("90", 90)])
def test_period_parameter(raw: str | None, days: int) -> None:
    assert parse_days(raw) == days


@pytest.mark.parametrize("raw", ["0", "14", "-7", "abc", "7.0", "365", " 7"])
def test_a_bad_period_parameter_is_refused_naming_the_allowed_values(raw: str) -> None:
    with pytest.raises(BadPeriod) as caught:
        parse_days(raw)
    assert "7, 30, 90" in str(caught.value) and repr(raw) in str(caught.value)
