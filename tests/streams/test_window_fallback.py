"""The last resort with windows: PostgreSQL refuses a value the checks let through, so the
batch is committed record by record from the partition's committed state. The refused record
becomes a dead letter and leaves no trace in the window; the others are taken once."""

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from django.db import DataError

from apps.runs.models import ResultRow
from apps.streams import services
from apps.streams.checkpoint import PartitionBatch, commit_batch, start_offsets
from apps.streams.consumer import DeploymentConsumer, deployed
from apps.streams.models import DeadLetter, KeyedState, PartitionOffset
from apps.streams.segment import Record
from apps.tenants.context import tenant_context
from tests.conftest import World

pytestmark = [pytest.mark.django_db(transaction=True)]

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000


def test_a_refused_record_is_a_dead_letter_and_the_window_counts_the_rest(
    world: World, kafka_bootstrap: str
) -> None:
    topic = f"acme.fallback-{uuid.uuid4().hex[:8]}"
    spec: dict[str, Any] = {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": {"topics": [topic]}},
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 60}},
            {"id": "raw", "type": "sink.table", "config": {"table": "raw"}},
        ],
        "edges": [["in", "w"], ["in", "raw"]],
    }
    graph = world.graph("fallback", spec)
    with tenant_context(world.acme):
        deployment = services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)
        (started,) = deployed([deployment.id])
        consumer = DeploymentConsumer(started, "fallback-test")
        try:
            start_offsets(consumer.binding, [(topic, 0, 0)])
            consumer.positions[(topic, 0)] = 0
            consumer._load_states([(topic, 0)])
            state = consumer.states[(topic, 0)]
            batch = PartitionBatch(topic, 0, read_at=0, next_offset=3, high_watermark=3)
            batch.state = state
            for offset, text in enumerate(["one", "t\u0000wo", "three"]):
                # Made by hand: the Kafka source refuses a NUL before it gets this far.
                when = datetime.fromtimestamp((T0 + offset * 1000) / 1000, tz=UTC)
                record = Record(f"{topic}:0:{offset}", {"text": text}, "k", when)
                batch.outcomes.append(consumer.segment.run(record, state))
                batch.offsets.append(offset)
            with pytest.raises((DataError, psycopg.DataError)):
                commit_batch(consumer.binding, consumer.segment, [batch])
            consumer._commit_one_by_one([batch])
        finally:
            consumer.close()

        rows = sorted(r.data["text"] for r in ResultRow.objects.filter(table="raw"))
        (letter,) = DeadLetter.objects.filter(deployment=deployment)
        (window,) = KeyedState.objects.filter(deployment=deployment, owner="w")
        offset = PartitionOffset.objects.get(deployment=deployment)
    assert rows == ["one", "three"]
    assert letter.offset == 1 and "PostgreSQL refused" in letter.error
    assert window.value["count"] == 2  # the refused record's count was undone
    assert offset.next_offset == 3 and offset.state_version == 3
