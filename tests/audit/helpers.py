"""Building admin fixtures through the services the web and the workers use, and reading
the admin's rendered rows back."""

import html
import re
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.test import Client

from apps.graphs.models import StreamGraph
from apps.runs.engine.outputs import record_usage, write_table_row
from apps.runs.models import Run, Step
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from tests.conftest import World
from workers.operators.base import UsageRecord

SPEC = {
    "nodes": [
        {"id": "in", "type": "source.manual"},
        {"id": "store", "type": "sink.table", "config": {"table": "kept"}},
    ],
    "edges": [["in", "store"]],
}


def staff_client() -> Client:
    """Platform staff without superuser rights or any model permission."""
    user = get_user_model().objects.create_user("staff", password="pw-staff", is_staff=True)
    client = Client()
    client.force_login(user)
    return client


def make_run(world: World, tenant: Tenant, payload: object) -> tuple[Run, Step]:
    """A run started through the service (its messages never leave: the test's transaction
    never commits), and its source step."""
    slug = f"admin-{tenant.slug}"
    with tenant_context(tenant):
        graph = StreamGraph.objects.filter(slug=slug).first() or world.graph(slug, SPEC, tenant)
        actor = world.owner if tenant == world.acme else world.outsider
        run = start_run(version=graph.live_version(), payload=payload, actor=actor)
        return run, Step.objects.get(run=run)


def add_usage(
    run: Run,
    step: Step,
    *,
    model: str = "default",
    engine: str = "simulated",
    tokens: tuple[int, int, int] = (10, 20, 0),
    seconds: float = 0.5,
    cost: str = "0.000100",
) -> None:
    tokens_in, tokens_out, wasted = tokens
    usage = UsageRecord(model, engine, tokens_in, tokens_out, seconds, Decimal(cost), wasted)
    with tenant_context(run.tenant):
        record_usage(step.id, run, usage, on_step=False)


def add_row(run: Run, step: Step, row: dict[str, object]) -> None:
    with tenant_context(run.tenant):
        write_table_row(step, run, "kept", row)


def cells(page: str, field: str) -> list[str]:
    """The text of one list_display column, row by row, as the changelist rendered it."""
    found = re.findall(rf'<t[dh] class="field-{field}[^"]*">(.*?)</t[dh]>', page, re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in found]
