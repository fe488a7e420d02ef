"""Operating Kafka deployments with real workers: a second worker joining and leaving
(rebalance), a redeploy mid-stream with handover at an offset boundary, pause and resume,
drain, one tenant's backlog beside another's deployment, and topics of another tenant."""

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from apps.audit.models import AuditEntry
from apps.graphs.services import add_version
from apps.graphs.validation import SpecInvalid
from apps.runs.models import Event, ResultRow, Run, RunStatus
from apps.streams import services
from apps.streams.consumer import DeploymentConsumer, active_kafka_deployments, deployed
from apps.streams.models import DeadLetter, Deployment, DeploymentStatus, PartitionOffset
from apps.tenants.context import tenant_context
from sluice import processes
from tests.conftest import World
from tests.harness.platform import Platform
from tests.harness.streams import create_topics, send, wait_for
from tests.streams.test_kafka_ingest import Topics

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]


def tagged_spec(source: str, tag: str) -> dict[str, Any]:
    """kafka -> tag (a template writing the version's tag) -> rows."""
    return {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": {"topics": [source]}},
            {
                "id": "tag",
                "type": "transform.template",
                "config": {"template": tag, "output": "tag"},
            },
            {"id": "rows", "type": "sink.table", "config": {"table": "tagged"}},
        ],
        "edges": [["in", "tag"], ["tag", "rows"]],
    }


@pytest.fixture
def kafka_platform(kafka_bootstrap: str, django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("streams-ops")
    try:
        yield platform
    finally:
        platform.stop()


def records(start: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    return [(f"k{i % 50}", {"n": i}) for i in range(start, start + count)]


def taken(deployment: Deployment) -> int:
    """Records the deployment has taken, as its checkpoints count them."""
    offsets = PartitionOffset.unscoped_all_tenants.filter(deployment=deployment)
    return sum(offsets.values_list("records", flat=True))


def origin_of(effect_key: str) -> tuple[str, int, int]:
    """(topic, partition, offset) from a segment row's effect key."""
    _scope, topic, partition, offset, _node, _visit = effect_key.rsplit(":", 5)
    return topic, int(partition), int(offset)


def test_rebalance_redeploy_pause_and_drain_take_every_record_once(
    world: World, kafka_platform: Platform, kafka_bootstrap: str
) -> None:
    topics = Topics()
    create_topics(kafka_bootstrap, [topics.orders])
    graph = world.graph("tagged", tagged_spec(topics.orders, "v1"))
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
    first_run = deployment.run
    kafka_platform.start_kafka_worker("kafka-a")
    send(kafka_bootstrap, topics.orders, records(0, 3000))

    # A second worker joins mid-stream (the group rebalances), then leaves.
    kafka_b = kafka_platform.start_kafka_worker("kafka-b")
    send(kafka_bootstrap, topics.orders, records(3000, 3000))
    wait_for(lambda: taken(deployment) >= 4000, 60, "records taken by two workers")
    kafka_platform.procs.remove(kafka_b)
    processes.stop_all([kafka_b])  # SIGTERM: it leaves the group, its partitions move

    # Redeploy mid-stream: records keep coming while version 2 takes over.
    with tenant_context(world.acme):
        version_2 = add_version(
            graph=graph, spec=tagged_spec(topics.orders, "v2"), actor=world.owner
        )
    send(kafka_bootstrap, topics.orders, records(6000, 2000))
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=version_2, actor=world.owner)
    send(kafka_bootstrap, topics.orders, records(8000, 2000))
    wait_for(lambda: taken(deployment) >= 10_000, 90, "every record before the pause")

    # Paused: records wait in the topic; resumed: they are taken.
    with tenant_context(world.acme):
        services.pause(deployment, actor=world.operator)
    time.sleep(2.5)  # every worker has seen the pause (reconciled each second)
    send(kafka_bootstrap, topics.orders, records(10_000, 500))
    time.sleep(3)
    assert taken(deployment) == 10_000
    with tenant_context(world.acme):
        services.resume(deployment, actor=world.operator)
    wait_for(lambda: taken(deployment) == 10_500, 60, "records sent while paused")

    # Drained: everything in the topic taken, then stopped; the stream run finishes.
    send(kafka_bootstrap, topics.orders, records(10_500, 500))
    with tenant_context(world.acme):
        services.drain(deployment, actor=world.owner)

    def stopped() -> bool:
        deployment.refresh_from_db()
        return deployment.status == DeploymentStatus.STOPPED

    wait_for(stopped, 60, "the drain to end")
    assert taken(deployment) == 11_000
    wait_for(
        lambda: Run.unscoped_all_tenants.get(pk=deployment.run_id).status == RunStatus.SUCCEEDED,
        30,
        "the stream run to finish",
    )
    assert Run.unscoped_all_tenants.get(pk=first_run.pk).status == RunStatus.SUCCEEDED

    with tenant_context(world.acme):
        rows = list(ResultRow.objects.filter(table="tagged").values_list("effect_key", "data"))
        sources = Event.objects.filter(run__in=[first_run.pk, deployment.run_id], node_id="in")
        assert sources.count() == 11_000
        entries = AuditEntry.objects.filter(target_id=str(deployment.id)).order_by("pk")
        actions = list(entries.values_list("action", flat=True))
    # Every record once, by exactly one version, and per partition every record of version 1
    # comes before every record of version 2: the handover is an offset boundary.
    assert len(rows) == 11_000
    assert sorted(row["n"] for _key, row in rows) == list(range(11_000))
    by_partition: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for effect_key, row in rows:
        _topic, partition, offset = origin_of(effect_key)
        by_partition[partition][row["tag"]].append(offset)
    for partition, tags in by_partition.items():
        if tags.get("v1") and tags.get("v2"):
            assert max(tags["v1"]) < min(tags["v2"]), f"partition {partition} interleaves"
    assert {"v1", "v2"} == {tag for tags in by_partition.values() for tag in tags}
    assert actions == [
        "deployment.create",
        "deployment.redeploy",
        "deployment.paused",
        "deployment.running",
        "deployment.draining",
        "deployment.drained",
    ]


def test_a_tenants_backlog_does_not_hold_up_another_tenants_deployment(
    world: World, kafka_platform: Platform, kafka_bootstrap: str
) -> None:
    busy, quiet = Topics("globex"), Topics("acme")
    create_topics(kafka_bootstrap, [busy.orders, quiet.orders])
    busy_graph = world.graph("busy", tagged_spec(busy.orders, "busy"), tenant=world.globex)
    quiet_graph = world.graph("quiet", tagged_spec(quiet.orders, "quiet"))
    with tenant_context(world.globex):
        backlogged = services.deploy(
            graph=busy_graph, version=busy_graph.live_version(), actor=world.outsider
        )
    with tenant_context(world.acme):
        quiet_deployment = services.deploy(
            graph=quiet_graph, version=quiet_graph.live_version(), actor=world.owner
        )
    send(kafka_bootstrap, busy.orders, records(0, 30_000))
    kafka_platform.start_kafka_worker("kafka-shared")
    wait_for(lambda: taken(backlogged) > 0, 60, "the backlog to start")
    send(kafka_bootstrap, quiet.orders, records(0, 10))
    wait_for(lambda: taken(quiet_deployment) == 10, 30, "the quiet tenant's records")
    # The quiet tenant was served while the other's backlog was still there.
    assert taken(backlogged) < 30_000
    with tenant_context(world.acme):
        assert ResultRow.objects.filter(table="tagged").count() == 10
    with tenant_context(world.globex):
        assert not ResultRow.objects.filter(data__tag="quiet").exists()


def test_a_graph_cannot_name_another_tenants_topics(world: World) -> None:
    spec = tagged_spec("globex.orders", "x")
    with pytest.raises(SpecInvalid, match="outside this tenant's namespace"):
        world.graph("theirs", spec)
    sink_spec = tagged_spec("acme.orders", "x")
    sink_spec["nodes"].append(
        {"id": "out", "type": "sink.kafka", "config": {"topic": "globex.payments"}}
    )
    sink_spec["edges"].append(["tag", "out"])
    with pytest.raises(SpecInvalid, match=r"globex\.payments"):
        world.graph("theirs-out", sink_spec)
    assert services.topic_problems(spec, "acme") == [
        "node 'in': topic 'globex.orders' is outside this tenant's namespace: its topics start"
        " with 'acme.' (for example acme.orders)"
    ]


def test_a_dead_letter_replays_through_the_deployed_version_once(
    world: World, kafka_bootstrap: str
) -> None:
    graph = world.graph("replayed", tagged_spec("acme.replayed", "v1"))
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
        fixable = DeadLetter.objects.create(
            tenant=world.acme, deployment=deployment, topic="acme.replayed", partition=0,
            offset=7, error="node 'tag': boom", payload='{"n": 7}',
        )  # fmt: skip
        hopeless = DeadLetter.objects.create(
            tenant=world.acme, deployment=deployment, topic="acme.replayed", partition=0,
            offset=8, error="the value is not JSON", payload="{not json",
        )  # fmt: skip
        services.replay_dead_letter(fixable, actor=world.operator)
        services.replay_dead_letter(hopeless, actor=world.operator)
        with pytest.raises(services.DeploymentRefused, match="already replayed"):
            services.replay_dead_letter(fixable, actor=world.operator)
        rows = list(ResultRow.objects.filter(run=deployment.run).values_list("data", flat=True))
        hopeless.refresh_from_db()
        fixable.refresh_from_db()
    assert rows == [{"n": 7, "tag": "v1"}]
    assert fixable.replayed_at is not None
    assert hopeless.replayed_at is None and hopeless.error.startswith("replay failed: the value")


def test_a_record_postgresql_refuses_is_a_dead_letter_and_the_rest_are_taken(
    world: World, kafka_platform: Platform, kafka_bootstrap: str
) -> None:
    """A template can make a value jsonb refuses (a NUL): the batch is refused, then taken
    record by record, and only that record is a dead letter."""
    topics = Topics()
    create_topics(kafka_bootstrap, [topics.orders], partitions=1)
    spec = tagged_spec(topics.orders, "{{ 'bad\\x00' if n == 13 else 'ok' }}")
    graph = world.graph("refused", spec)
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
    send(kafka_bootstrap, topics.orders, records(0, 100))
    kafka_platform.start_kafka_worker("kafka-refused")
    wait_for(lambda: taken(deployment) == 99, 60, "every other record")
    with tenant_context(world.acme):
        rows = ResultRow.objects.filter(run=deployment.run)
        letters = list(DeadLetter.objects.filter(deployment=deployment))
        assert sorted(rows.values_list("data__n", flat=True)) == [n for n in range(100) if n != 13]
    assert [(letter.offset, letter.payload) for letter in letters] == [(13, '{"n": 13}')]
    assert letters[0].error.startswith("PostgreSQL refused the record:")


@pytest.mark.parametrize("start_from", ["earliest", "latest", "timestamp"])
def test_a_new_deployment_starts_where_its_source_says(
    world: World, kafka_bootstrap: str, start_from: str
) -> None:
    """Run in this process: the worker's consumer for one deployment, polled by hand."""
    topics = Topics()
    create_topics(kafka_bootstrap, [topics.orders], partitions=1)
    send(kafka_bootstrap, topics.orders, records(0, 10))
    time.sleep(1.1)  # the records after this moment are newer than the start timestamp
    start_at = timezone.now()
    spec = tagged_spec(topics.orders, "t")
    spec["nodes"][0]["config"] |= {"start_from": start_from}
    if start_from == "timestamp":
        spec["nodes"][0]["config"]["start_timestamp"] = start_at.isoformat()
        send(kafka_bootstrap, topics.orders, records(10, 5))
    graph = world.graph(f"start-{start_from}", spec)
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
    assert active_kafka_deployments()[deployment.id] == (deployment.version_id, "running")
    (started,) = deployed([deployment.id])
    consumer = DeploymentConsumer(started, "test")
    try:
        with tenant_context(world.acme):
            wait_for(lambda: consumer.poll(0.5) >= 0 and bool(consumer.positions), 30, "assign")
            if start_from == "latest":
                send(kafka_bootstrap, topics.orders, records(20, 5))
            wait_for(lambda: consumer.poll(0.5) >= 0 and taken(deployment) >= 5, 30, "records")
            consumer.poll(1.0)
            numbers = sorted(
                ResultRow.objects.filter(run=deployment.run).values_list("data__n", flat=True)
            )
    finally:
        consumer.close()
    expected = {
        "earliest": list(range(10)),
        "latest": list(range(20, 25)),
        "timestamp": list(range(10, 15)),
    }[start_from]
    assert numbers == expected
