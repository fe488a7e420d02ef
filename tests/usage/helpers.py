from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from apps.graphs.models import StreamGraph
from apps.runs.models import Run, Usage
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World

SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "s", "type": "sink.table", "config": {"table": "out"}},
    ],
    "edges": [["in", "s"]],
}


def graph_with_run(world: World, slug: str, tenant: Tenant | None = None) -> Run:
    return another_run(world, world.graph(slug, SPEC, tenant=tenant or world.acme))


def another_run(world: World, graph: StreamGraph) -> Run:
    actor = world.owner if graph.tenant_id == world.acme.pk else world.outsider
    with tenant_context(graph.tenant):
        return start_run(version=graph.live_version(), payload={}, actor=actor)


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), tzinfo=UTC)


def add_usage(
    run: Run,
    at: datetime,
    *,
    tokens_in: int = 0,
    tokens_out: int = 0,
    wasted: int = 0,
    seconds: float = 0.0,
    cost: str = "0",
) -> Usage:
    """A Usage row as the executor writes one (there is no service: usage is only read)."""
    with tenant_context(run.tenant):
        usage = Usage.objects.create(
            run=run,
            model="sim",
            engine="simulated",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            wasted_tokens=wasted,
            engine_seconds=seconds,
            cost_usd=Decimal(cost),
        )
        Usage.objects.filter(pk=usage.pk).update(at=at)  # `at` is set on insert
    return usage
