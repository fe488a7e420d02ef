"""Kafka helpers for stream tests and `python -m bench kafka`: make topics, send records,
read a topic back (deduplicating by the effect key header, as a downstream consumer
would), and wait for a condition."""

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from workers.kafka import EFFECT_HEADER


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for future in futures.values():
        future.result(timeout=30)


def send(bootstrap: str, topic: str, records: Iterable[tuple[str | None, Any]]) -> int:
    """(key, value) pairs; a dict value goes as JSON, bytes as they are. Returns the count
    acknowledged."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    sent = 0
    for key, value in records:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        while True:
            try:
                producer.produce(topic, value=raw, key=key.encode() if key else None)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if sent % 1000 == 0:
            producer.poll(0)
    left = producer.flush(30)
    assert left == 0, f"{left} records not acknowledged"
    return sent


def send_to_partitions(bootstrap: str, topic: str, records: Iterable[tuple[int, str, Any]]) -> int:
    """(partition, key, value) triples, each to the partition named (windows' watermarks are
    per partition, so a test that knows the answer must know where each record went)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    sent = 0
    for partition, key, value in records:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        while True:
            try:
                producer.produce(topic, value=raw, key=key.encode(), partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
    left = producer.flush(30)
    assert left == 0, f"{left} records not acknowledged"
    return sent


@dataclass(frozen=True)
class OutRecord:
    key: str | None
    value: bytes
    effect_key: str
    timestamp_ms: int


class TopicReader:
    """Reads a topic from the start, keeping every record (copies included)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.records: list[OutRecord] = []

    def read(self, timeout: float = 0.5) -> None:
        for message in self.consumer.consume(num_messages=10_000, timeout=timeout):
            if message.error() is not None:
                continue
            headers = dict(message.headers() or [])
            effect = headers.get(EFFECT_HEADER, b"")
            key = message.key()
            self.records.append(
                OutRecord(
                    key=key.decode() if key else None,
                    value=message.value() or b"",
                    effect_key=effect.decode() if isinstance(effect, bytes) else str(effect),
                    timestamp_ms=message.timestamp()[1],
                )
            )

    def distinct(self) -> dict[str, OutRecord]:
        """What a consumer deduplicating by the effect key header sees: the first copy."""
        seen: dict[str, OutRecord] = {}
        for record in self.records:
            seen.setdefault(record.effect_key, record)
        return seen

    def read_until(self, distinct: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.distinct()) < distinct and time.monotonic() < deadline:
            self.read()

    def close(self) -> None:
        self.consumer.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
