"""Budgets against real PostgreSQL and Redis: the live meters are seeded from the run's (or
the tenant's month of) Usage rows, shared by every step that spends inside the same scope,
refuse a step that would cross before it starts, and on crossing publish a "budget" stop on
the control channel. Also the control channel's handling of malformed messages."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings

from apps.graphs.services import create_graph
from apps.runs.engine.budgets import NANO, Budget, budget_for, month_start
from apps.runs.engine.outputs import record_usage
from apps.runs.models import Run, Step, Usage
from apps.runs.services import start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from apps.tenants.services import create_tenant
from workers import control
from workers.inference.host import EngineHost
from workers.operators.base import BudgetExceeded, NoBudget, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def graph_spec(**policies: Any) -> dict[str, Any]:
    return {"nodes": [{"id": "in", "type": "source.manual"}], "edges": [], "policies": policies}


@dataclass
class Tenants:
    """Acme and Globex (the outsider), as in tests/conftest.py's `world`, without its users:
    hashing five passwords per test would be most of this file's time, and no test here
    acts as a user."""

    acme: Tenant
    globex: Tenant


@pytest.fixture
def tenants(db: None) -> Tenants:
    return Tenants(
        acme=create_tenant(slug="acme", name="Acme", actor="test"),
        globex=create_tenant(slug="globex", name="Globex", actor="test"),
    )


def new_run(tenants: Tenants, slug: str, *, tenant: Tenant | None = None, **policies: Any) -> Run:
    tenant = tenant or tenants.acme
    with tenant_context(tenant):
        graph = create_graph(slug=slug, name=slug, spec=graph_spec(**policies), actor="test")
        return start_run(version=graph.live_version(), payload={}, actor="test")


def spend(run: Run, cost: str) -> Usage:
    """One attempt's Usage row for the run's step, written as a step's commit writes it."""
    with tenant_context(run.tenant):
        step = Step.objects.filter(run=run).first()
        assert step is not None
        usage = UsageRecord(
            model="default",
            engine="simulated",
            tokens_in=10,
            tokens_out=20,
            engine_seconds=0.1,
            cost_usd=Decimal(cost),
        )
        record_usage(step.id, run, usage, on_step=False)
        return Usage.objects.filter(run=run).latest("at")


def set_monthly_budget(tenant: Tenant, usd: str | None) -> None:
    # No service sets a tenant's monthly budget yet (tests/runs/test_inference.py does this).
    tenant.monthly_budget_usd = None if usd is None else Decimal(usd)
    tenant.save(update_fields=["monthly_budget_usd"])


def nanos(usd: str) -> int:
    return int(Decimal(usd) * NANO)


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def fresh_meters(r: redis.Redis) -> Iterator[None]:
    """Table ids repeat across transactional tests; meters of an earlier test must not."""
    for key in r.scan_iter("sluice:spend:*"):
        r.delete(key)
    yield


@pytest.fixture
def channel(r: redis.Redis) -> Iterator[Any]:
    """A subscriber to the control channel, subscribed before the test publishes."""
    pubsub = r.pubsub()
    pubsub.subscribe(control.CHANNEL)
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    yield pubsub
    pubsub.close()


def published(pubsub: Any) -> list[dict[str, Any]]:
    """Every control message published so far (waits for the first one; the
    rest were published before it, as PUBLISH is synchronous)."""
    messages = []
    message = pubsub.get_message(timeout=5)
    while message is not None:
        messages.append(json.loads(message["data"]))
        message = pubsub.get_message(timeout=0.05)
    return messages


# --- no budget ---------------------------------------------------------------------------


def test_without_any_budget_the_meter_is_a_no_op(tenants: Tenants, r: redis.Redis) -> None:
    run = new_run(tenants, "free")
    spend(run, "5")
    meter = budget_for(run, tenants.acme)
    assert isinstance(meter, NoBudget)
    meter.check_start(Decimal("1000000"))
    assert meter.add(Decimal("1000000")) is None
    assert list(r.scan_iter("sluice:spend:*")) == []  # no Redis traffic at all


# --- the run budget ----------------------------------------------------------------------


def test_a_run_budget_refuses_a_step_that_would_cross_it(tenants: Tenants, r: redis.Redis) -> None:
    run = new_run(tenants, "capped", budget_usd=0.001)
    spend(run, "0.0004")
    spend(run, "0.0003")
    other = new_run(tenants, "other")  # same tenant, another run: not this run's spend
    spend(other, "0.0009")

    meter = budget_for(run, tenants.acme)
    assert isinstance(meter, Budget)
    meter.check_start(Decimal("0.000299"))  # 0.000999 < 0.001: may start
    assert int(r.get(f"sluice:spend:run:{run.id}") or 0) == nanos("0.0007")  # seeded from rows
    with pytest.raises(BudgetExceeded) as caught:
        meter.check_start(Decimal("0.0003"))  # reaching the limit exactly is crossing it
    assert str(caught.value) == "run budget $0.001 exceeded: $0.000700 spent"


def test_the_meter_is_seeded_once_then_counts_live(tenants: Tenants, r: redis.Redis) -> None:
    run = new_run(tenants, "seeded", budget_usd=1)
    spend(run, "0.25")
    first = budget_for(run, tenants.acme)
    first.check_start(Decimal(0))
    spend(run, "0.5")  # written after seeding: counted live by add(), not re-seeded
    budget_for(run, tenants.acme).check_start(Decimal(0))
    assert int(r.get(f"sluice:spend:run:{run.id}") or 0) == nanos("0.25")

    r.delete(f"sluice:spend:run:{run.id}")  # Redis lost it: the rows are the record
    with pytest.raises(BudgetExceeded, match=r"\$0\.750000 spent"):
        budget_for(run, tenants.acme).check_start(Decimal("0.25"))


def test_add_reports_the_crossing_and_publishes_a_budget_stop(
    tenants: Tenants, r: redis.Redis, channel: Any
) -> None:
    run = new_run(tenants, "crossing", budget_usd=0.001)
    spend(run, "0.0007")
    meter = budget_for(run, tenants.acme)
    token = Decimal("0.0001")

    assert meter.add(token) is None  # 0.0008
    assert meter.add(token) is None  # 0.0009
    crossed = meter.add(token)  # 0.0010: the limit
    assert crossed == "run budget $0.001 exceeded: $0.001000 spent"
    assert meter.add(token) == crossed  # stays crossed, counts no more
    assert int(r.get(f"sluice:spend:run:{run.id}") or 0) == nanos("0.001")

    [message] = published(channel)
    assert message["kind"] == "budget"
    assert message["runs"] == [str(run.id)] and message["steps"] == []
    assert message["tenant"] is None and message["detail"] == crossed


def test_a_prompt_cost_alone_can_cross_at_the_first_add(tenants: Tenants, channel: Any) -> None:
    run = new_run(tenants, "prompt", budget_usd=0.001)
    meter = budget_for(run, tenants.acme)
    meter.check_start(Decimal("0.0009"))
    assert meter.add(Decimal("0.002")) == "run budget $0.001 exceeded: $0.002000 spent"
    assert [m["kind"] for m in published(channel)] == ["budget"]


def test_concurrent_steps_of_a_run_share_its_meter(tenants: Tenants, channel: Any) -> None:
    run = new_run(tenants, "shared", budget_usd=0.001)
    first, second = budget_for(run, tenants.acme), budget_for(run, tenants.acme)
    # The first step's spend is visible to the second before it starts.
    assert first.add(Decimal("0.0006")) is None
    with pytest.raises(BudgetExceeded, match=r"\$0\.000600 spent"):
        second.check_start(Decimal("0.0005"))
    assert second.add(Decimal("0.0005")) == "run budget $0.001 exceeded: $0.001100 spent"


def test_two_streams_cross_together_what_neither_crosses_alone(
    tenants: Tenants, r: redis.Redis, channel: Any
) -> None:
    run = new_run(tenants, "streams", budget_usd=0.001)
    steps = [budget_for(run, tenants.acme), budget_for(run, tenants.acme)]
    token = Decimal("0.00005")
    spent = [Decimal(0), Decimal(0)]
    crossed: list[str | None] = [None, None]
    # Each stream spends at most 0.0009 alone, under the limit; together they cross it.
    for _ in range(18):
        for i, meter in enumerate(steps):
            if crossed[i] is None:
                spent[i] += token
                crossed[i] = meter.add(token)
    assert all(s < Decimal("0.001") for s in spent)
    assert crossed[0] is not None and crossed[1] is not None
    assert crossed[0].startswith("run budget $0.001 exceeded")
    # Overshoot is bounded by the flush interval of each stream.
    total = int(r.get(f"sluice:spend:run:{run.id}") or 0)
    assert nanos("0.001") <= total <= nanos("0.001") + 2 * 8 * nanos("0.00005")
    kinds = {(m["kind"], tuple(m["runs"])) for m in published(channel)}
    assert kinds == {("budget", (str(run.id),))}


# --- the tenant's monthly budget ---------------------------------------------------------


def test_the_monthly_meter_counts_this_months_usage_of_this_tenant_only(
    tenants: Tenants, r: redis.Redis
) -> None:
    set_monthly_budget(tenants.acme, "0.01")
    set_monthly_budget(tenants.globex, "0.01")
    ours = new_run(tenants, "ours")
    spend(ours, "0.002")
    last_month = spend(new_run(tenants, "old"), "0.003")
    Usage.unscoped_all_tenants.filter(pk=last_month.pk).update(
        at=month_start(last_month.at) - timedelta(days=1)
    )
    spend(new_run(tenants, "theirs", tenant=tenants.globex), "0.004")

    meter = budget_for(ours, tenants.acme)
    meter.check_start(Decimal("0.0079"))  # 0.0099 < 0.01: last month and globex not counted
    with pytest.raises(BudgetExceeded) as caught:
        meter.check_start(Decimal("0.008"))
    assert str(caught.value) == "tenant monthly budget $0.01 exceeded: $0.002000 spent"
    key = f"sluice:spend:tenant:{tenants.acme.id}:{month_start(last_month.at):%Y%m}"
    assert int(r.get(key) or 0) == nanos("0.002")
    # Globex's meter is its own.
    with pytest.raises(BudgetExceeded, match=r"\$0\.004000 spent"):
        budget_for(new_run(tenants, "g2", tenant=tenants.globex), tenants.globex).check_start(
            Decimal("0.006")
        )


def test_a_crossed_monthly_budget_stops_the_whole_tenant(tenants: Tenants, channel: Any) -> None:
    set_monthly_budget(tenants.acme, "0.001")
    run = new_run(tenants, "month", budget_usd=5)  # both meters apply; the tenant's is lower
    spend(run, "0.0009")
    meter = budget_for(run, tenants.acme)
    assert isinstance(meter, Budget) and len(meter.meters) == 2
    crossed = meter.add(Decimal("0.0002"))
    assert crossed == "tenant monthly budget $0.001 exceeded: $0.001100 spent"
    [message] = published(channel)
    assert message["kind"] == "budget" and message["tenant"] == tenants.acme.id
    assert message["runs"] == []


# --- the control channel's messages ------------------------------------------------------


MALFORMED: list[bytes | str] = [
    b"not json",
    b"",
    b"\xff\xfe",
    "[1, 2]",
    "null",
    json.dumps({"at": 1.0}),
    json.dumps({"kind": "cancelled"}),
    json.dumps({"kind": "cancelled", "at": "soon"}),
    json.dumps({"kind": "cancelled", "at": None}),
]


def test_a_malformed_control_message_is_ignored() -> None:
    host = EngineHost()
    for raw in MALFORMED:
        assert control.handle(host, raw) == 0, raw
    assert host.running() == []


def test_a_control_message_with_a_malformed_scope_is_ignored() -> None:
    host = EngineHost()
    assert control.handle(host, json.dumps({"kind": "cancelled", "at": 1.0, "runs": 5})) == 0
    assert control.handle(host, json.dumps({"kind": "x", "at": 1.0, "steps": [["a"]]})) == 0
