"""Kafka clients for stream deployments and sinks (confluent-kafka, librdkafka underneath).

Where the broker is comes from KAFKA_BOOTSTRAP_SERVERS, read when a client is made (the test
harness sets it after start-up); empty means this installation has no Kafka. Topic names are
per tenant: a tenant's topics start with its slug and a dot, and a graph may name no other.
"""

import os
import re
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

# The effect key of a produced record travels in this header, so a consumer downstream can
# drop the copies a crash between the broker's ack and Sluice's commit sends again.
EFFECT_HEADER = "sluice-effect-key"
# Kafka's own rule for topic names.
TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
FLUSH_TIMEOUT_S = 30.0


class KafkaUnavailable(RuntimeError):
    """This installation has no Kafka, or the broker did not answer in time."""


def bootstrap_servers() -> str:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if not servers:
        raise KafkaUnavailable(
            "Kafka is off here: set KAFKA_BOOTSTRAP_SERVERS, or install Java and Maven so"
            " `make run` starts the embedded broker"
        )
    return servers


def topic_prefix(tenant_slug: str) -> str:
    return f"{tenant_slug}."


def topic_problem(topic: str, tenant_slug: str) -> str | None:
    """Why this tenant may not use this topic name, or None."""
    if not TOPIC_PATTERN.match(topic) or topic in {".", ".."}:
        return f"topic {topic!r} is not a valid Kafka topic name (letters, digits, '.', '_', '-')"
    prefix = topic_prefix(tenant_slug)
    if not topic.startswith(prefix) or topic == prefix:
        return (
            f"topic {topic!r} is outside this tenant's namespace: its topics start with"
            f" {prefix!r} (for example {prefix}{topic.rsplit('.', 1)[-1]!s})"
        )
    return None


def relay_topic(tenant_slug: str, deployment_hex: str) -> str:
    """The internal topic a deployment's step outputs come back into its segment through."""
    return f"{topic_prefix(tenant_slug)}sluice-relay-{deployment_hex}"


def ensure_topic(name: str, partitions: int, timeout_s: float = 30.0) -> None:
    """Creates the topic unless it exists, and returns once each of its partitions has a
    leader (a topic just made has none for a moment: reading its offsets fails then)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers()})
    future = admin.create_topics([NewTopic(name, num_partitions=partitions)])[name]
    try:
        future.result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=timeout_s).topics.get(name)
        if (
            topic is not None
            and topic.error is None
            and topic.partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise KafkaUnavailable(f"topic {name}: its partitions have no leader after {timeout_s} s")


def spec_topics(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(node id, config field, topic) for every Kafka topic a graph spec names."""
    named = []
    for node in spec.get("nodes", []):
        config = node.get("config", {})
        if node.get("type") == "source.kafka":
            named += [(node["id"], "topics", topic) for topic in config.get("topics", [])]
        elif node.get("type") == "sink.kafka" and "topic" in config:
            named.append((node["id"], "topic", config["topic"]))
    return named


def spec_topic_problems(spec: dict[str, Any], tenant_slug: str) -> list[tuple[str, str, str]]:
    """(node id, config field, why) for every topic the spec names that the tenant may not."""
    return [
        (node_id, field, problem)
        for node_id, field, topic in spec_topics(spec)
        if (problem := topic_problem(topic, tenant_slug)) is not None
    ]


def consumer(group_id: str, *, member: str | None = None, **overrides: Any) -> Consumer:
    """A consumer that never commits by itself: the offsets that count live in PostgreSQL,
    and Kafka is told afterwards, only so that lag tools see progress.

    `member` makes it a static member of the group (KIP-345): a process restarted under the
    same name gets its partitions back at once, instead of after the session timeout and a
    rebalance. Two live consumers must never share one."""
    static = {"group.instance.id": member} if member else {}
    config = {
        **static,
        "bootstrap.servers": bootstrap_servers(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # A dead worker's partitions move to the others within this many milliseconds.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 60000,
        "enable.partition.eof": False,
        **overrides,
    }
    return Consumer(config)


def producer_config(**overrides: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap_servers(),
        # Idempotent: a retried send after a lost ack is not written twice by the broker.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "queue.buffering.max.messages": 200_000,
        **overrides,
    }


_producer: Producer | None = None
_producer_lock = threading.Lock()


def shared_producer() -> Producer:
    """One idempotent producer per process: librdkafka batches every thread's records."""
    global _producer
    with _producer_lock:
        if _producer is None:
            _producer = Producer(producer_config())
        return _producer


class DeliveryFailed(KafkaException):
    pass


class Deliveries:
    """Records produced together and confirmed together: `wait` returns once the broker has
    acknowledged every one, or raises naming the first failure."""

    def __init__(self, producer: Producer | None) -> None:
        self.producer = producer  # None: nothing will be sent
        self.errors: list[str] = []
        self.acked: list[tuple[str, int, int]] = []
        self.sent = 0

    def _on_delivery(self, error: KafkaError | None, message: Any) -> None:
        if error is not None:
            self.errors.append(f"{message.topic()}: {error.str()}")
        else:
            self.acked.append((message.topic(), message.partition(), message.offset()))

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        if self.producer is None:
            raise ValueError("these deliveries were made with no producer")
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self.producer.poll(0.05)  # the local queue is full: let it drain
        self.sent += 1

    def wait(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        if self.sent == 0 or self.producer is None:
            return
        left = self.producer.flush(timeout_s)
        if self.errors:
            raise DeliveryFailed(self.errors[0])
        if left or len(self.acked) < self.sent:
            raise DeliveryFailed(f"{self.sent - len(self.acked)} records not acknowledged")
