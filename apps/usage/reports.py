"""Usage reports for the current tenant, aggregated in PostgreSQL (one query per view of the
data) from `apps.runs.models.Usage`. Pure reads returning dataclasses; days are UTC days."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from apps.runs.engine.budgets import month_start, month_usage
from apps.runs.models import Usage
from apps.tenants.context import current_tenant

PERIOD_DAYS = (7, 30, 90)
DEFAULT_DAYS = 30
FIELDS = ("tokens_in", "tokens_out", "wasted_tokens", "engine_seconds", "cost_usd")
# Prefixed: an annotation may not reuse a model field's name.
SUMS = {f"sum_{name}": Sum(name) for name in FIELDS}


class BadPeriod(ValueError):
    """The `days` parameter is not one of PERIOD_DAYS; the message says what was given."""


def parse_days(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_DAYS
    if raw.isdigit() and int(raw) in PERIOD_DAYS:
        return int(raw)
    allowed = ", ".join(str(d) for d in PERIOD_DAYS)
    raise BadPeriod(f"days must be one of {allowed}; got {raw[:20]!r}")


@dataclass(frozen=True)
class Amounts:
    tokens_in: int = 0
    tokens_out: int = 0
    wasted_tokens: int = 0
    engine_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> "Amounts":
        """From a row of SUMS (a sum over no rows is NULL: zero)."""
        return cls(
            tokens_in=row["sum_tokens_in"] or 0,
            tokens_out=row["sum_tokens_out"] or 0,
            wasted_tokens=row["sum_wasted_tokens"] or 0,
            engine_seconds=row["sum_engine_seconds"] or 0.0,
            cost_usd=row["sum_cost_usd"] or Decimal(0),
        )


@dataclass(frozen=True)
class Period:
    days: int
    first: date  # the oldest day shown; the last is today (UTC)

    @property
    def start(self) -> datetime:
        return datetime.combine(self.first, time.min, tzinfo=UTC)

    def each_day(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range(self.days)]


def period_ending(now: datetime, days: int) -> Period:
    today = now.astimezone(UTC).date()
    return Period(days, today - timedelta(days=days - 1))


@dataclass(frozen=True)
class DayUsage:
    day: date
    amounts: Amounts


@dataclass(frozen=True)
class GraphUsage:
    slug: str
    name: str
    amounts: Amounts


@dataclass(frozen=True)
class UsageReport:
    period: Period
    records: int  # Usage rows in the period
    totals: Amounts
    per_day: list[DayUsage]  # every day of the period, oldest first; zero where none
    per_graph: list[GraphUsage]  # graphs with usage, highest cost first

    @property
    def empty(self) -> bool:
        return self.records == 0


def usage_report(days: int, *, now: datetime | None = None) -> UsageReport:
    period = period_ending(now or timezone.now(), days)
    rows = Usage.objects.filter(at__gte=period.start)
    totals = rows.aggregate(records=Count("id"), **SUMS)
    by_day = {
        row["day"]: Amounts.of(row)
        for row in rows.annotate(day=TruncDate("at", tzinfo=UTC))
        .values("day")
        .annotate(**SUMS)
        .order_by("day")
    }
    by_graph = (
        rows.values(
            graph_slug=F("run__graph_version__graph__slug"),
            graph_name=F("run__graph_version__graph__name"),
        )
        .annotate(**SUMS)
        .order_by("-sum_cost_usd", "-sum_tokens_out", "graph_name")
    )
    return UsageReport(
        period=period,
        records=totals["records"],
        totals=Amounts.of(totals),
        per_day=[DayUsage(day, by_day.get(day, Amounts())) for day in period.each_day()],
        per_graph=[
            GraphUsage(row["graph_slug"], row["graph_name"], Amounts.of(row)) for row in by_graph
        ],
    )


@dataclass(frozen=True)
class BudgetStatus:
    budget_usd: Decimal | None  # the tenant's monthly budget; None when not set
    spent_usd: Decimal  # this calendar month (UTC)
    month: date  # its first day

    @property
    def percent(self) -> float | None:
        if self.budget_usd is None or self.budget_usd <= 0:
            return None
        return float(self.spent_usd / self.budget_usd * 100)

    @property
    def bar_percent(self) -> float:
        """The percent for a progress bar: 0 to 100."""
        return min(self.percent or 0.0, 100.0)

    @property
    def over(self) -> bool:
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd


def budget_status(*, now: datetime | None = None) -> BudgetStatus:
    """The current tenant's monthly budget and what it spent this month, as the workers'
    budget check counts it (apps.runs.engine.budgets)."""
    now = (now or timezone.now()).astimezone(UTC)
    tenant = current_tenant()
    spent = month_usage(tenant.pk, now).aggregate(total=Sum("cost_usd"))["total"]
    return BudgetStatus(tenant.monthly_budget_usd, spent or Decimal(0), month_start(now).date())
