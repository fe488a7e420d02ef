"""Budgets: a run's `budget_usd` and its tenant's monthly budget, checked before a step
starts and metered while tokens are generated.

PostgreSQL's Usage rows are the record of what was spent. While tokens stream, spending
is also counted on live meters in Redis (integer nano-dollars, INCRBY), shared by every
worker, so a budget crossed by the sum of many concurrent generations is noticed at once
and all of them stop. A meter that is missing (first use, Redis restarted, expired) is
seeded from the Usage rows, so Redis is never the only copy of anything.
"""

import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from apps.runs.models import Usage
from sluice.redis_client import redis_client
from workers import control
from workers.operators.base import BudgetExceeded, NoBudget, SpendMeter

NANO = Decimal(1_000_000_000)
# Counted spend is sent to Redis every this many tokens, or at once when it might cross.
FLUSH_EVERY = 8
RUN_METER_TTL_S = 7 * 24 * 3600
TENANT_METER_TTL_S = 40 * 24 * 3600


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_usage(tenant_id: int, now: datetime) -> Any:
    """The tenant's usage rows its monthly budget counts: this calendar month's (UTC)."""
    return Usage.unscoped_all_tenants.filter(tenant_id=tenant_id, at__gte=month_start(now))


@dataclass
class Meter:
    key: str
    limit: Decimal
    label: str  # "run" or "tenant monthly", for the figure in the error
    scope: dict[str, Any]  # who to stop when crossed: runs=[...] or tenant=...
    seed_rows: Any  # the Usage queryset whose sum seeds the meter
    ttl_s: int
    known_nanos: int | None = None  # the meter's total as of this step's last flush

    def seed(self) -> None:
        spent = self.seed_rows.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
        redis_client().set(self.key, int(spent * NANO), nx=True, ex=self.ttl_s)

    def read_nanos(self) -> int:
        value = redis_client().get(self.key)
        if value is None:
            self.seed()
            value = redis_client().get(self.key)
        self.known_nanos = int(value or 0)
        return self.known_nanos

    def figure(self, nanos: int) -> str:
        spent = Decimal(nanos) / NANO
        return f"{self.label} budget ${self.limit.normalize():f} exceeded: ${spent:.6f} spent"


class Budget(SpendMeter):
    """One step attempt's view of the budgets that apply to it."""

    def __init__(self, meters: list[Meter]) -> None:
        self.meters = meters
        self.unflushed = Decimal(0)
        self.unflushed_adds = 0
        self.crossed: str | None = None

    def check_start(self, cost: Decimal) -> None:
        for meter in self.meters:
            nanos = meter.read_nanos()
            if nanos + int(cost * NANO) >= int(meter.limit * NANO):
                raise BudgetExceeded(meter.figure(nanos))

    def add(self, cost: Decimal) -> str | None:
        if self.crossed is not None:
            return self.crossed
        self.unflushed += cost
        self.unflushed_adds += 1
        if self.unflushed_adds >= FLUSH_EVERY or self._might_cross():
            self.flush()
        return self.crossed

    def _might_cross(self) -> bool:
        pending = int(self.unflushed * NANO)
        return any(
            m.known_nanos is None or m.known_nanos + pending >= int(m.limit * NANO)
            for m in self.meters
        )

    def flush(self) -> None:
        nanos = int(self.unflushed * NANO)
        self.unflushed, self.unflushed_adds = Decimal(0), 0
        if nanos == 0:
            return
        for meter in self.meters:
            if meter.known_nanos is None:
                meter.read_nanos()  # seeds it before the first increment
            meter.known_nanos = int(redis_client().incrby(meter.key, nanos))
            if meter.known_nanos >= int(meter.limit * NANO) and self.crossed is None:
                self.crossed = meter.figure(meter.known_nanos)
                # Every worker generating inside this scope stops now, not at its next flush.
                control.publish_stop("budget", at=time.time(), detail=self.crossed, **meter.scope)


def budget_for(run: Any, tenant: Any) -> SpendMeter:
    """The meters for a step of `run`: none at all (and no Redis traffic) without budgets."""
    meters = []
    if run.budget_usd is not None:
        meters.append(
            Meter(
                key=f"sluice:spend:run:{run.id}",
                limit=run.budget_usd,
                label="run",
                scope={"runs": [run.id]},
                seed_rows=Usage.unscoped_all_tenants.filter(run_id=run.id),
                ttl_s=RUN_METER_TTL_S,
            )
        )
    if tenant.monthly_budget_usd is not None:
        now = timezone.now()
        start = month_start(now)
        meters.append(
            Meter(
                key=f"sluice:spend:tenant:{tenant.id}:{start:%Y%m}",
                limit=tenant.monthly_budget_usd,
                label="tenant monthly",
                scope={"tenant": tenant.id},
                seed_rows=month_usage(tenant.id, now),
                ttl_s=TENANT_METER_TTL_S,
            )
        )
    return Budget(meters) if meters else NoBudget()
