"""The harness's Kafka broker is a real one: a topic made through the admin API carries
records from an idempotent producer to a consumer, every key's records in order."""

import secrets
import time
from collections import defaultdict

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

KEYS = ["a", "b", "c", "d", "e"]
MESSAGES = 100
PARTITIONS = 3
CONSUME_TIMEOUT_S = 60


def _create_topic(bootstrap: str) -> str:
    topic = f"test-broker-{secrets.token_hex(4)}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS)])
    futures[topic].result(timeout=30)
    return topic


def _produce(bootstrap: str, topic: str) -> list[tuple[str, str]]:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    sent = [(KEYS[i % len(KEYS)], f"message-{i}") for i in range(MESSAGES)]
    failures: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err)

    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0, "records still waiting for delivery"
    assert failures == []
    return sent


def _consume(bootstrap: str, topic: str, count: int) -> list[tuple[str, str]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[str, str]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while len(received) < count and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            key, value = msg.key(), msg.value()
            assert key is not None and value is not None
            received.append((key.decode(), value.decode()))
    finally:
        consumer.close()
    return received


def _by_key(records: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for key, value in records:
        grouped[key].append(value)
    return dict(grouped)


def test_records_go_through_the_broker_in_order_per_key(kafka_bootstrap: str) -> None:
    topic = _create_topic(kafka_bootstrap)
    sent = _produce(kafka_bootstrap, topic)

    received = _consume(kafka_bootstrap, topic, len(sent))

    assert len(received) == MESSAGES
    assert _by_key(received) == _by_key(sent)
