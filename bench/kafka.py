"""Stream deployments from Kafka: exactly-once ingest against a loop with no durability.

    python -m bench kafka [--quick]

N keyed JSON records go through kafka -> template -> switch -> sink.kafka, run by a real
Kafka worker process (`manage.py kafka_worker`) on a real broker: each micro-batch's
records are produced, acknowledged, then committed with their events and offsets in one
PostgreSQL transaction. The floor, in the same run and interleaved with ours, is
bench/kafka_floor.py: confluent-kafka consume -> the same template and switch -> produce,
with nothing durable. Both are fed the same way (records produced once the consumer has
its partitions) and timed the same way: from the first record sent to the last output
record's broker timestamp; latency is each output's timestamp minus its input's send time.

Then the same run with 3 SIGKILLs of the Kafka worker at random points (a fresh worker
started at once): lost (outputs missing), duplicates (records ingested twice in PostgreSQL,
or seen twice by a consumer deduplicating on the effect key header), redelivered (raw
copies on the topic, which that header deduplicates) and recovery_s (a kill to the next
output record).
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.stack import services
from sluice import embedded, kafka_broker, processes

TEMPLATE = "{{ 'big' if amount >= 50 else 'small' }}"
PARTITIONS = 4


def spec(source: str, sink: str) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": {"topics": [source]}},
            {
                "id": "shape",
                "type": "transform.template",
                "config": {"template": TEMPLATE, "output": "size"},
            },
            {
                "id": "route",
                "type": "route.switch",
                "config": {"field": "size", "cases": {"big": "out", "small": "out"}},
            },
            {"id": "emit", "type": "sink.kafka", "config": {"topic": sink, "key": "k{{ id }}"}},
        ],
        "edges": [["in", "shape"], ["shape", "route"], ["route", "emit", "out"]],
    }


@contextmanager
def broker(root: Path) -> Iterator[str]:
    libs = kafka_broker.ensure_jars(kafka_broker.default_libs_dir())
    port, controller = embedded.free_port(), embedded.free_port()
    proc = kafka_broker.start_broker(root / "kafka", port, controller, libs)
    try:
        yield kafka_broker.bootstrap_for(port)
    finally:
        kafka_broker.stop_broker(proc)


class KafkaWorkers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A replacement keeps the name, as a supervisor restarting it would: it takes the
        # partitions back at once (static membership).
        self.count += 1
        name = "kafka-bench"
        log = self.root / f"kafka-{self.count}.log"
        argv = processes.kafka_worker_argv(name)
        self.proc = processes.spawn(argv, env=dict(os.environ), log_path=log)
        deadline = time.monotonic() + 60
        while f"kafka worker {name}: started" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"kafka worker did not start; see {log}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, 9)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop_all([self.proc])


def send_records(bootstrap: str, topic: str, count: int) -> dict[str, float]:
    """Sends `count` records as fast as the client goes; returns each key's send time (ms)."""
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 200_000}
    )
    sent: dict[str, float] = {}
    for i in range(count):
        key = f"k{i}"
        value = json.dumps({"id": i, "amount": i % 100, "note": "x" * 40}).encode()
        sent[key] = time.time() * 1000
        while True:
            try:
                producer.produce(topic, value=value, key=key.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    return sent


def measure(
    bootstrap: str,
    source: str,
    sink: str,
    count: int,
    *,
    dedupe_by: Callable[[Any], str],
    during: Callable[[int], None] = lambda distinct: None,
    timeout_s: float = 300,
) -> dict[str, Any]:
    """Sends the records, reads the sink until every one has an output (or time runs out)."""
    from tests.harness.streams import TopicReader

    reader = TopicReader(bootstrap, sink)
    reader.read(timeout=1.0)  # joined and assigned before the first record goes out
    sent = send_records(bootstrap, source, count)
    started_ms = min(sent.values())
    deadline = time.monotonic() + timeout_s
    seen: dict[str, Any] = {}
    looked_at = 0
    while len(seen) < count and time.monotonic() < deadline:
        reader.read(timeout=0.2)
        for record in reader.records[looked_at:]:
            seen.setdefault(dedupe_by(record), record)
        looked_at = len(reader.records)
        during(len(seen))
    reader.close()
    outputs = list(seen.values())
    last_ms = max((r.timestamp_ms for r in outputs), default=started_ms)
    latencies = sorted(r.timestamp_ms - sent[r.key] for r in outputs if r.key in sent)
    return {
        "outputs": len(outputs),
        "raw": len(reader.records),
        "seconds": (last_ms - started_ms) / 1000,
        "events_per_s": len(outputs) / max((last_ms - started_ms) / 1000, 1e-3),
        "latency_ms_p50": _pct(latencies, 50),
        "latency_ms_p99": _pct(latencies, 99),
        "timestamps": sorted(r.timestamp_ms for r in reader.records),
    }


def _pct(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * pct / 100))], 1)


def run_floor(root: Path, bootstrap: str, count: int) -> dict[str, Any]:
    from tests.harness.streams import create_topics

    source, sink = f"floor.in-{uuid.uuid4().hex[:8]}", f"floor.out-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [source, sink], PARTITIONS)
    argv = [
        sys.executable, "-m", "bench.kafka_floor", "--bootstrap", bootstrap,
        "--group", f"floor-{uuid.uuid4().hex}", "--source", source, "--sink", sink,
        "--template", TEMPLATE,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        result = measure(bootstrap, source, sink, count, dedupe_by=lambda r: r.key)
    finally:
        proc.terminate()
        proc.wait(30)
    result["duplicates"] = result["raw"] - result["outputs"]
    return result


def run_ours(
    tenant: Any, bootstrap: str, count: int, workers: KafkaWorkers, *, kills: int = 0
) -> dict[str, Any]:
    from django.db import connection

    from apps.graphs.services import create_graph
    from apps.streams.models import PartitionOffset
    from apps.streams.services import deploy
    from apps.tenants.context import tenant_context
    from tests.harness.streams import create_topics, wait_for

    suffix = uuid.uuid4().hex[:8]
    source, sink = f"{tenant.slug}.in-{suffix}", f"{tenant.slug}.out-{suffix}"
    create_topics(bootstrap, [source, sink], PARTITIONS)
    with tenant_context(tenant):
        graph = create_graph(slug=f"k-{suffix}", name="Kafka", spec=spec(source, sink), actor="b")
        deployment = deploy(graph=graph, version=graph.live_version(), actor="bench")
    assigned = PartitionOffset.unscoped_all_tenants.filter(deployment=deployment)
    wait_for(lambda: assigned.count() == PARTITIONS, 60, "the worker to take the partitions")
    kill_points = sorted(random.uniform(0.15, 0.75) * count for _ in range(kills))
    kill_times: list[float] = []

    def chaos(distinct: int) -> None:
        if kill_points and kill_points[0] <= distinct < count:
            kill_points.pop(0)
            kill_times.append(time.time() * 1000)
            workers.kill()
            workers.start()

    result = measure(bootstrap, source, sink, count, dedupe_by=lambda r: r.effect_key, during=chaos)
    # The outputs are acknowledged before their batch commits: let the last commit land.
    offsets = PartitionOffset.unscoped_all_tenants.filter(deployment=deployment)
    wait_for(lambda: sum(offsets.values_list("records", flat=True)) >= count, 60, "commits")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(DISTINCT origin) FROM runs_event"
            " WHERE run_id = %s AND node_id = 'in'",
            [deployment.run_id],
        )
        ingested, origins = cursor.fetchone()
    result["ingested"] = ingested
    result["duplicates"] = ingested - origins
    result["redelivered"] = result["raw"] - result["outputs"]
    result["kills"] = len(kill_times)
    stamps = result["timestamps"]
    result["recovery_s"] = [
        round((next((t for t in stamps if t > kill), kill) - kill) / 1000, 2) for kill in kill_times
    ]
    return result


def _median(results: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(result[key] or 0 for result in results), 1)


def main(*, quick: bool) -> int:
    count, rounds = (5000, 1) if quick else (30000, 2)
    if not kafka_broker.java_available():
        print("bench kafka: needs Java and Maven for the broker (apt install default-jre maven)")
        return 1
    with services("kafka") as root, broker(root) as bootstrap:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
        from apps.tenants.services import create_tenant

        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        workers = KafkaWorkers(root)
        workers.start()
        try:
            floors, ours = [], []
            for _ in range(rounds):
                floors.append(run_floor(root, bootstrap, count))
                ours.append(run_ours(tenant, bootstrap, count, workers))
            chaos = run_ours(tenant, bootstrap, count, workers, kills=3)
        finally:
            workers.stop()
    floor_eps = statistics.median(f["events_per_s"] for f in floors)
    ours_eps = statistics.median(o["events_per_s"] for o in ours)
    result = {
        "bench": "kafka",
        "records": count,
        "rounds": rounds,
        "events_per_s": round(ours_eps),
        "floor_events_per_s": round(floor_eps),
        "ratio_vs_floor": round(ours_eps / floor_eps, 3),
        "latency_ms_p50": _median(ours, "latency_ms_p50"),
        "latency_ms_p99": _median(ours, "latency_ms_p99"),
        "floor_latency_ms_p50": _median(floors, "latency_ms_p50"),
        "floor_latency_ms_p99": _median(floors, "latency_ms_p99"),
        "lost": sum(count - o["outputs"] for o in ours),
        "duplicates": sum(o["duplicates"] for o in ours),
        "floor_lost": sum(count - f["outputs"] for f in floors),
        "chaos_kills": chaos["kills"],
        "chaos_events_per_s": round(chaos["events_per_s"]),
        "chaos_lost": count - chaos["outputs"],
        "chaos_duplicates": chaos["duplicates"],
        "chaos_redelivered": chaos["redelivered"],
        "recovery_s_max": max(chaos["recovery_s"], default=None),
    }
    print(f"{'':24}{'sluice':>12}{'floor':>12}")
    for label, ours_key, floor_key in (
        ("events/s", "events_per_s", "floor_events_per_s"),
        ("latency p50 ms", "latency_ms_p50", "floor_latency_ms_p50"),
        ("latency p99 ms", "latency_ms_p99", "floor_latency_ms_p99"),
    ):
        print(f"{label:24}{result[ours_key]!s:>12}{result[floor_key]!s:>12}")
    print(
        f"with {chaos['kills']} SIGKILLs: lost {result['chaos_lost']}, duplicates"
        f" {result['chaos_duplicates']}, redelivered {result['chaos_redelivered']},"
        f" recovery {chaos['recovery_s']} s"
    )
    print("RESULT " + json.dumps(result))
    return 0
