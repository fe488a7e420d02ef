"""Kafka deployments end to end: a real broker, real Kafka worker and Celery processes.

Records flow kafka -> template -> switch -> sink.table / sink.kafka inside the Kafka worker's
segment, and one branch leaves the segment for a durable step on Celery (a template marked
`chain: false`, then a Kafka sink as a step). Kafka workers and a Celery worker are SIGKILLed
while records flow; every record's outputs must exist exactly once in PostgreSQL, and on
the output topics each effect key at least once (exactly once after deduplication).
"""

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from apps.graphs.models import StreamGraph
from apps.runs.models import Event, ResultRow, Step, StepStatus
from apps.streams import services
from apps.streams.models import DeadLetter, Deployment, PartitionOffset
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.harness.streams import TopicReader, create_topics, send, wait_for
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]


class Topics:
    """Topic names of one test: in the tenant's namespace, new for each test (the broker
    lives for the whole session)."""

    def __init__(self, tenant_slug: str = "acme") -> None:
        suffix = uuid.uuid4().hex[:8]
        self.orders = f"{tenant_slug}.orders-{suffix}"
        self.big = f"{tenant_slug}.big-{suffix}"
        self.small = f"{tenant_slug}.small-{suffix}"

    def all(self) -> list[str]:
        return [self.orders, self.big, self.small]


def stream_spec(topics: Topics, *, step_branch: bool = True) -> dict[str, Any]:
    """kafka -> shape -> route: big -> store (table) and out (topic); small -> slow
    (a step on Celery) -> out_step (a Kafka sink run as a step)."""
    nodes: list[dict[str, Any]] = [
        {
            "id": "orders",
            "type": "source.kafka",
            "config": {
                "topics": [topics.orders],
                "key_field": "id",
                "input_schema": {"type": "object", "required": ["id", "amount"]},
            },
        },
        {
            "id": "shape",
            "type": "transform.template",
            "config": {
                "template": "{{ 'big' if amount >= 50 else 'small' }}",
                "output": "size",
            },
        },
        {
            "id": "route",
            "type": "route.switch",
            "config": {"field": "size", "cases": {"big": "big", "small": "small"}},
        },
        {"id": "store", "type": "sink.table", "config": {"table": "big_orders"}},
        {
            "id": "out",
            "type": "sink.kafka",
            "config": {"topic": topics.big, "key": "{{ id }}"},
        },
    ]
    edges = [
        ["orders", "shape"],
        ["shape", "route"],
        ["route", "store", "big"],
        ["route", "out", "big"],
    ]
    if step_branch:
        nodes += [
            {
                "id": "slow",
                "type": "transform.template",
                "chain": False,
                "config": {"template": "small order {{ id }}", "output": "note"},
            },
            {
                "id": "out_step",
                "type": "sink.kafka",
                "config": {"topic": topics.small, "key": "{{ id }}"},
            },
        ]
        edges += [["route", "slow", "small"], ["slow", "out_step"]]
    return {"nodes": nodes, "edges": edges}


def deploy(world: World, graph: StreamGraph) -> Deployment:
    with tenant_context(world.acme):
        return services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)


def orders(count: int, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    return [(f"o{i}", {"id": f"o{i}", "amount": i % 100}) for i in range(start, start + count)]


@pytest.fixture
def stream_platform(kafka_bootstrap: str, django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("streams")
    try:
        platform.start_beat()
        yield platform
    finally:
        platform.stop()


def count_rows(world: World) -> int:
    with tenant_context(world.acme):
        return ResultRow.objects.filter(table="big_orders").count()


def test_records_flow_through_the_segment_and_steps_exactly_once(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    records = 10_000
    topics = Topics()
    create_topics(kafka_bootstrap, topics.all())
    graph = world.graph("orders", stream_spec(topics))
    deployment = deploy(world, graph)
    send(kafka_bootstrap, topics.orders, orders(records))
    poison = [
        ("bad", b"not json"),
        ("x", {"id": "x"}),  # fails the input schema
        ("nul", b'{"id": "n\\u0000", "amount": 1}'),  # jsonb cannot store it
    ]
    send(kafka_bootstrap, topics.orders, poison)
    cpu = stream_platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
    kafka_a = stream_platform.start_kafka_worker("kafka-a")
    big = sum(1 for _, order in orders(records) if order["amount"] >= 50)
    small = records - big

    # SIGKILL the Kafka worker at random points while records flow (mid-batch, between the
    # checkpoint and the offsets told to Kafka, while producing), replacing it each time;
    # and once the Celery worker running the steps after the segment.
    for kill in range(5):
        time.sleep(random.uniform(0.2, 1.2))
        stream_platform.kill(kafka_a)
        # Restarted under its name, as a supervisor would: it takes its partitions back.
        kafka_a = stream_platform.start_kafka_worker(f"kafka-a{kill}", member="kafka-a@streams")
        if kill == 1:
            stream_platform.kill(cpu)
            cpu = stream_platform.start_worker(
                "cpu2", CPU_WORKER_QUEUES, pool="prefork", concurrency=2
            )
    wait_for(lambda: count_rows(world) >= big, 180, "the big orders' rows")

    big_out = TopicReader(kafka_bootstrap, topics.big)
    small_out = TopicReader(kafka_bootstrap, topics.small)
    big_out.read_until(big, 60)
    small_out.read_until(small, 180)
    with tenant_context(world.acme):
        rows = list(ResultRow.objects.filter(table="big_orders").values_list("data", flat=True))
        sources = Event.objects.filter(run=deployment.run, node_id="orders")
        dead = list(DeadLetter.objects.filter(deployment=deployment).order_by("offset"))
        offsets = list(PartitionOffset.objects.filter(deployment=deployment))
        done_steps = Step.objects.filter(run=deployment.run, node_id="out_step", status="done")
        assert sources.count() == records
        assert len({origin for origin in sources.values_list("origin", flat=True)}) == records
        assert done_steps.count() == small
        assert not Step.objects.filter(run=deployment.run).exclude(status=StepStatus.DONE)
    assert len(rows) == big and len({row["id"] for row in rows}) == big
    # The poison records are dead letters with their coordinates; none blocked its partition
    # (every offset after them was taken).
    errors = sorted(letter.error for letter in dead)
    assert errors[0] == "input schema: the payload: 'amount' is a required property"
    assert errors[1].startswith("the value contains a NUL character")
    assert errors[2].startswith("the value is not JSON")
    assert all(letter.topic == topics.orders and letter.offset is not None for letter in dead)
    assert sum(o.next_offset for o in offsets) == records + len(poison)
    # On the topics: every effect key at least once; deduplicated, each record once.
    assert len(big_out.distinct()) == big
    assert {json.loads(r.value)["id"] for r in big_out.distinct().values()} == {
        order["id"] for _, order in orders(records) if order["amount"] >= 50
    }
    assert len(small_out.distinct()) == small
    big_out.close()
    small_out.close()
