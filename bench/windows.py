"""Event-time windows in a stream deployment against a loop that keeps them in dicts.

    python -m bench windows [--quick]

Keyed JSON records (1,000 keys, 5% out of order within the max delay, 1% late for both
windows) go through source.kafka -> window.tumbling (10 s, count) and window.session (5 s
gap, count), fired windows and late records each to a sink.kafka, run by a real Kafka
worker process on a real broker. Each record goes to the partition its key hashes to, so
bench/windows_workload.py, which makes the records, computes every window result and late
record the rules give for them on its own, record by record in each partition's offset
order. One closer record per partition, far ahead in event time, ends the stream so every
window closes.

The floor, in the same run and interleaved with ours, is bench/windows_floor.py: a
confluent-kafka consume -> windows in dicts -> produce loop with nothing durable. Both are
fed the same way (records sent as fast as the client goes once the consumer has its
partitions) and timed the same way: events_per_s is N over the time from the first record
sent to the moment all of them are taken (ours: committed offsets in PostgreSQL; the floor:
consumed, windowed and its outputs delivered). Every output is read back and compared with
the reference, copies counted as wrong.

Emit latency comes from a paced phase (PACED_RATE records/s, event time = send time): for
each window a record closed (the first record in its partition after which the watermark
reached the window's end plus the lateness), the output's broker timestamp minus that
record's send time.
"""

import json
import os
import select
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from bench.kafka import KafkaWorkers, broker
from bench.stack import services
from bench.windows_workload import (
    GAP_S,
    KEYS,
    LATENESS_S,
    MAX_DELAY_S,
    PARTITIONS,
    SIZE_S,
    Out,
    Rec,
    check,
    closers,
    diagnose,
    encode,
    partition_of,
    plan,
    reference,
    workload,
)
from sluice import kafka_broker

IDLE_TIMEOUT_S = 300  # no idle advance during a run: the closers end each stream
PACED_RATE = 400  # records/s sent in the latency phase (= the workload's event-time rate)


class Topics(NamedTuple):
    source: str
    tumble: str
    session: str
    late_tumble: str
    late_session: str


def new_topics(bootstrap: str, prefix: str) -> Topics:
    from tests.harness.streams import create_topics

    suffix = uuid.uuid4().hex[:8]
    topics = Topics(*(f"{prefix}.w-{suffix}-{n}" for n in ("in", "tu", "se", "lt", "ls")))
    create_topics(bootstrap, topics, PARTITIONS)
    return topics


def producer(bootstrap: str, linger_ms: int) -> Any:
    """Idempotent, so each partition's records land in the order they were sent; warmed up
    (its producer id fetched, which can take a second) before anything is timed."""
    from confluent_kafka import Producer

    from tests.harness.streams import create_topics

    out = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "queue.buffering.max.messages": 500_000,
        }
    )
    warmup = f"bench.w-warmup-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [warmup], 1)
    out.produce(warmup, value=b"{}")
    if out.flush(30):
        raise RuntimeError("the broker did not acknowledge the warm-up record")
    return out


def _produce(out: Any, topic: str, rec: Rec, value: bytes) -> None:
    while True:
        try:
            out.produce(topic, value=value, key=rec.key.encode(), partition=rec.partition)
            return
        except BufferError:
            out.poll(0.05)


def send_fast(bootstrap: str, topic: str, records: list[Rec]) -> tuple[float, float]:
    """Sends as fast as the client goes; returns (first send, last acknowledged) in epoch ms."""
    values = [encode(r) for r in records]
    out = producer(bootstrap, 5)
    first = time.time() * 1000
    for i, (rec, value) in enumerate(zip(records, values, strict=True)):
        _produce(out, topic, rec, value)
        if i % 1000 == 0:
            out.poll(0)
    if out.flush(60):
        raise RuntimeError("the broker did not acknowledge every input record")
    return first, time.time() * 1000


def send_paced(bootstrap: str, topic: str, count: int, seed: int) -> tuple[list[Rec], list[int]]:
    """PACED_RATE records a second with event time = send time (plus the planned offset),
    then the closers; returns the records and each one's send time (epoch ms)."""
    out = producer(bootstrap, 0)
    records: list[Rec] = []
    sent: list[int] = []
    began = time.monotonic()
    for i, (key, kind, offset) in enumerate(plan(count, seed)):
        wait = began + i / PACED_RATE - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = int(time.time() * 1000)
        rec = Rec(i, partition_of(key), key, now + offset, kind)
        _produce(out, topic, rec, encode(rec))
        out.poll(0)
        records.append(rec)
        sent.append(now)
    for rec in closers(records):
        sent.append(int(time.time() * 1000))
        _produce(out, topic, rec, encode(rec))
        records.append(rec)
    if out.flush(60):
        raise RuntimeError("the broker did not acknowledge every input record")
    return records, sent


def read_topic(bootstrap: str, topic: str) -> list[Out]:
    """Every record the topic holds now, copies included."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    ends = {}
    for p in range(PARTITIONS):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > low:
            ends[p] = high
    records: list[Out] = []
    if ends:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    deadline = time.monotonic() + 60
    while ends and time.monotonic() < deadline:
        positions = consumer.position([TopicPartition(topic, p) for p in ends])
        if all(tp.offset >= ends[tp.partition] for tp in positions):
            break
        for message in consumer.consume(num_messages=10_000, timeout=0.2):
            offset, partition = message.offset() or 0, message.partition() or 0
            if message.error() is None and offset < ends[partition]:
                key = message.key()
                value, stamp = message.value() or b"", message.timestamp()[1]
                records.append(Out(key.decode() if key else None, value, stamp))
    consumer.close()
    return records


def read_outputs(bootstrap: str, topics: Topics, expected: int) -> dict[str, list[Out]]:
    """The four output topics, read again until their contents stop growing (at least twice,
    so copies arriving after the expected count are seen too)."""
    names = topics[1:]
    last = -1
    deadline = time.monotonic() + 15  # ours acknowledges its outputs before it commits
    while True:
        outputs = {name: read_topic(bootstrap, name) for name in names}
        total = sum(len(records) for records in outputs.values())
        if (total >= expected and total == last) or time.monotonic() > deadline:
            return outputs
        last = total
        time.sleep(1.0)


def verify(
    bootstrap: str, topics: Topics, records: list[Rec], sent: list[int] | None
) -> dict[str, Any]:
    """Reads the outputs back and compares them with the reference; with send times, the
    emit latency of each window a record of the stream (not a closer) closed."""
    ref = reference(records)
    outputs = read_outputs(bootstrap, topics, len(ref.windows) + len(ref.late))
    result = check(
        ref, records, [outputs[topics.tumble], outputs[topics.session]],
        [outputs[topics.late_tumble], outputs[topics.late_session]],
    )  # fmt: skip
    first, missing = result.pop("first"), result.pop("missing")
    if sent is not None:
        latencies = sorted(
            first[r].timestamp_ms - sent[idx]
            for r, idx in ref.windows.items()
            if r in first and records[idx].kind != "closer"
        )
        result["emit_latency_ms_p50"] = _pct(latencies, 50)
        result["emit_latency_ms_p99"] = _pct(latencies, 99)
        result["emit_latency_samples"] = len(latencies)
    if missing:
        result["examples"] += diagnose(ref, records, missing[0][1])
    return result


def _pct(values: list[int], pct: int) -> float | None:
    if not values:
        return None
    return float(values[min(len(values) - 1, int(len(values) * pct / 100))])


class Floor:
    """bench/windows_floor.py in a process of its own, one per phase."""

    name = "floor"

    def __init__(self, root: Path, bootstrap: str) -> None:
        self.root, self.bootstrap = root, bootstrap
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, expect: int) -> Topics:
        topics = new_topics(self.bootstrap, "floor")
        argv = [
            sys.executable, "-m", "bench.windows_floor", "--bootstrap", self.bootstrap,
            "--group", f"floor-{uuid.uuid4().hex}", "--source", topics.source,
            "--outputs", *topics[1:], "--size-s", str(SIZE_S), "--gap-s", str(GAP_S),
            "--lateness-s", str(LATENESS_S), "--max-delay-s", str(MAX_DELAY_S),
            "--expect", str(expect),
        ]  # fmt: skip
        with open(self.root / "floor.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        if self._line(60) != "ready":
            raise RuntimeError(f"the floor did not start; see {self.root / 'floor.log'}")
        return topics

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    def wait_taken(self, timeout: float) -> float:
        line = self._line(timeout)
        if not line.startswith("done "):
            raise RuntimeError(f"the floor did not finish in {timeout} s: {line!r}")
        return float(line.split()[1])

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(30)
        return {}


class Ours:
    """A deployment per phase, run by the Kafka worker process the run started."""

    name = "sluice"

    def __init__(self, bootstrap: str, tenant: Any) -> None:
        self.bootstrap, self.tenant = bootstrap, tenant
        self.deployment: Any = None
        self.expect = 0

    def start(self, expect: int) -> Topics:
        from apps.graphs.services import create_graph
        from apps.streams.models import PartitionOffset
        from apps.streams.services import deploy
        from apps.tenants.context import tenant_context
        from tests.harness.streams import wait_for

        topics = new_topics(self.bootstrap, self.tenant.slug)
        slug = f"w-{topics.source.rsplit('-', 2)[1]}"
        with tenant_context(self.tenant):
            graph = create_graph(slug=slug, name="Windows", spec=spec(topics), actor="bench")
            self.deployment = deploy(graph=graph, version=graph.live_version(), actor="bench")
        offsets = PartitionOffset.unscoped_all_tenants.filter(deployment=self.deployment)
        wait_for(lambda: offsets.count() == PARTITIONS, 60, "the worker to take the partitions")
        self.expect = expect
        return topics

    def _offsets(self) -> list[Any]:
        from apps.streams.models import PartitionOffset

        return list(PartitionOffset.unscoped_all_tenants.filter(deployment=self.deployment))

    def wait_taken(self, timeout: float) -> float:
        """When PostgreSQL first holds every record taken (polled every 50 ms), epoch ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(o.records + o.dead_letters for o in self._offsets()) >= self.expect:
                return time.time() * 1000
            time.sleep(0.05)
        raise RuntimeError(f"the deployment did not take {self.expect} records in {timeout} s")

    def stop(self) -> dict[str, Any]:
        from apps.streams.services import pause
        from apps.tenants.context import tenant_context

        offsets = self._offsets()
        with tenant_context(self.tenant):
            pause(self.deployment, actor="bench")
        return {
            "dead_letters": sum(o.dead_letters for o in offsets),
            "late_counted": sum(o.late_total for o in offsets),
        }


def spec(topics: Topics) -> dict[str, Any]:
    source = {
        "topics": [topics.source], "event_time_field": "ts",
        "max_delay_s": MAX_DELAY_S, "idle_timeout_s": IDLE_TIMEOUT_S,
    }  # fmt: skip
    common = {"allowed_lateness_s": LATENESS_S, "aggregate": {"op": "count"}}
    sinks = zip(("emit_t", "emit_s", "late_t", "late_s"), topics[1:], strict=True)
    return {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": source},
            {"id": "tumble", "type": "window.tumbling", "config": {"size_s": SIZE_S, **common}},
            {"id": "sess", "type": "window.session", "config": {"gap_s": GAP_S, **common}},
            *({"id": i, "type": "sink.kafka", "config": {"topic": t}} for i, t in sinks),
        ],
        "edges": [
            ["in", "tumble"], ["in", "sess"], ["tumble", "emit_t"], ["sess", "emit_s"],
            ["tumble", "late_t", "late"], ["sess", "late_s", "late"],
        ],
    }  # fmt: skip


Side = Floor | Ours


def throughput_round(side: Side, count: int, seed: int) -> dict[str, Any]:
    records = workload(count, seed)
    topics = side.start(len(records))
    first, acked = send_fast(side.bootstrap, topics.source, records)
    done = side.wait_taken(600)
    result = side.stop()
    result["events_per_s"] = count / max((done - first) / 1000, 1e-3)
    result["offered_events_per_s"] = count / max((acked - first) / 1000, 1e-3)
    return {**result, **verify(side.bootstrap, topics, records, None)}


def latency_round(side: Side, count: int, seed: int) -> dict[str, Any]:
    topics = side.start(count + PARTITIONS)
    records, sent = send_paced(side.bootstrap, topics.source, count, seed)
    side.wait_taken(120)
    result = side.stop()
    return {**result, **verify(side.bootstrap, topics, records, sent)}


def _median(results: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(result[key] for result in results), 1)


def _sum(results: list[dict[str, Any]], key: str) -> int:
    return sum(result[key] for result in results)


def main(*, quick: bool) -> int:
    count, rounds, paced_s = (30_000, 2, 30) if quick else (200_000, 2, 60)
    if not kafka_broker.java_available():
        print("bench windows: needs Java and Maven for the broker (apt install default-jre maven)")
        return 1
    with services("windows") as root, broker(root) as bootstrap:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
        from apps.tenants.services import create_tenant

        tenant = create_tenant(slug="bench", name="Bench", actor="bench")
        workers = KafkaWorkers(root)
        workers.start()
        try:
            floor, ours = Floor(root, bootstrap), Ours(bootstrap, tenant)
            floors, oursr = [], []
            for seed in range(rounds):
                floors.append(throughput_round(floor, count, seed))
                oursr.append(throughput_round(ours, count, seed))
            paced = int(paced_s * PACED_RATE)
            floors.append(latency_round(floor, paced, 100))
            oursr.append(latency_round(ours, paced, 100))
        finally:
            workers.stop()
    return report(count, rounds, paced, floors, oursr)


def report(
    count: int, rounds: int, paced: int, floors: list[dict[str, Any]], ours: list[dict[str, Any]]
) -> int:
    ours_eps, floor_eps = _median(ours[:-1], "events_per_s"), _median(floors[:-1], "events_per_s")
    floor_offered = _median(floors[:-1], "offered_events_per_s")
    result = {
        "bench": "windows",
        "events": count,
        "rounds": rounds,
        "keys": KEYS,
        "partitions": PARTITIONS,
        "events_per_s": round(ours_eps),
        "floor_events_per_s": round(floor_eps),
        "ratio_vs_floor": round(ours_eps / floor_eps, 3),
        "offered_events_per_s": round(_median(ours[:-1], "offered_events_per_s")),
        "floor_offered_events_per_s": round(floor_offered),
        "floor_saturated": floor_eps < 0.9 * floor_offered,
        "events_per_s_rounds": [round(o["events_per_s"]) for o in ours[:-1]],
        "floor_events_per_s_rounds": [round(f["events_per_s"]) for f in floors[:-1]],
        "paced_events": paced,
        "paced_rate": PACED_RATE,
        "emit_latency_ms_p50": ours[-1]["emit_latency_ms_p50"],
        "emit_latency_ms_p99": ours[-1]["emit_latency_ms_p99"],
        "emit_latency_samples": ours[-1]["emit_latency_samples"],
        "floor_emit_latency_ms_p50": floors[-1]["emit_latency_ms_p50"],
        "floor_emit_latency_ms_p99": floors[-1]["emit_latency_ms_p99"],
    }
    for prefix, side in (("", ours), ("floor_", floors)):
        for name in ("expected", "correct", "missing", "duplicates", "unexpected"):
            result[f"{prefix}window_results_{name}"] = _sum(side, f"windows_{name}")
        for name in ("expected", "routed", "correct"):
            result[f"{prefix}late_{name}"] = _sum(side, f"late_{name}")
    result["dead_letters"] = _sum(ours, "dead_letters")
    result["late_counted"] = _sum(ours, "late_counted")
    _table(result)
    for label, side in (("sluice", ours), ("floor", floors)):
        for example in (e for phase in side for e in phase["examples"]):
            print(f"{label}: {example}")
    print("RESULT " + json.dumps(result))
    return 0 if all(_correct(result, prefix) for prefix in ("", "floor_")) else 1


def _correct(result: dict[str, Any], prefix: str) -> bool:
    return (
        result[f"{prefix}window_results_correct"] == result[f"{prefix}window_results_expected"]
        and result[f"{prefix}window_results_unexpected"] == 0
        and result[f"{prefix}window_results_duplicates"] == 0
        and result[f"{prefix}late_correct"] == result[f"{prefix}late_expected"]
        and result[f"{prefix}late_routed"] == result[f"{prefix}late_expected"]
    )


def _table(r: dict[str, Any]) -> None:
    print(f"{'':24}{'sluice':>18}{'floor':>18}")
    rows = [
        ("events/s", r["events_per_s"], r["floor_events_per_s"]),
        ("offered events/s", r["offered_events_per_s"], r["floor_offered_events_per_s"]),
        ("emit latency p50 ms", r["emit_latency_ms_p50"], r["floor_emit_latency_ms_p50"]),
        ("emit latency p99 ms", r["emit_latency_ms_p99"], r["floor_emit_latency_ms_p99"]),
        (
            "window results correct",
            f"{r['window_results_correct']}/{r['window_results_expected']}",
            f"{r['floor_window_results_correct']}/{r['floor_window_results_expected']}",
        ),
        (
            "late routed (correct)",
            f"{r['late_routed']} ({r['late_correct']})/{r['late_expected']}",
            f"{r['floor_late_routed']} ({r['floor_late_correct']})/{r['floor_late_expected']}",
        ),
        ("events/s each round", r["events_per_s_rounds"], r["floor_events_per_s_rounds"]),
    ]
    for label, ours, floor in rows:
        print(f"{label:24}{ours!s:>18}{floor!s:>18}")
    print(f"ratio vs floor {r['ratio_vs_floor']} (target >= 0.25)")
    if r["floor_saturated"]:
        print("the floor took fewer records a second than were offered: its figure is its own")
        print("capacity on this machine, and the ratio compares capacities")
    else:
        print("the floor kept up with the sender: its figure is the sender's rate, a lower bound")
        print("on its capacity, so the ratio is an upper bound at this size")
