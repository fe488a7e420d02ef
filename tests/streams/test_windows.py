"""Windows and keyed state on a real broker with real Kafka workers (and Celery for the step
before a window): known answers for out-of-order and late input, exactly once across
SIGKILLs and a rebalance, idle partitions, redeploys that keep or drop state, and a window
fed by an LLM step through the relay topic."""

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from apps.graphs.services import save_version
from apps.runs.models import Event, ResultRow, StreamRelay
from apps.streams import services
from apps.streams.models import Deployment, KeyedState, PartitionOffset
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.harness.streams import TopicReader, create_topics, send_to_partitions, wait_for
from workers.inference.simulated import tokens_for
from workers.queues import CPU_WORKER_QUEUES

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

SUMMARY_PROMPT = "Team {{ key }}: {% for e in events %}{{ e.body }}. {% endfor %}"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000  # a minute boundary, epoch ms


@pytest.fixture
def stream_platform(kafka_bootstrap: str, django_db_setup: None) -> Iterator[Platform]:
    platform = Platform("windows")
    try:
        yield platform
    finally:
        platform.stop()


def topic(name: str, partitions: int, bootstrap: str) -> str:
    full = f"acme.{name}-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [full], partitions=partitions)
    return full


def source(topic_name: str, **config: Any) -> dict[str, Any]:
    return {
        "id": "in",
        "type": "source.kafka",
        "config": {"topics": [topic_name], "event_time_field": "ts", **config},
    }


def table(node_id: str, name: str) -> dict[str, Any]:
    return {"id": node_id, "type": "sink.table", "config": {"table": name}}


def deploy(world: World, slug: str, spec: dict[str, Any]) -> Deployment:
    graph = world.graph(slug, spec)
    with tenant_context(world.acme):
        return services.deploy(graph=graph, version=graph.live_version(), actor=world.owner)


def rows(world: World, name: str) -> list[dict[str, Any]]:
    with tenant_context(world.acme):
        return list(ResultRow.objects.filter(table=name).values_list("data", flat=True))


def windows(found: list[dict[str, Any]], *fields: str) -> list[tuple[Any, ...]]:
    """(key, start s, end s, fields...) relative to T0, sorted."""

    def rel(iso: str) -> float:
        return (datetime.fromisoformat(iso).timestamp() * 1000 - T0) / 1000

    return sorted(
        (row["key"], rel(row["start"]), rel(row["end"]), *(row[f] for f in fields)) for row in found
    )


def at(seconds: float) -> int:
    return int(T0 + seconds * 1000)


def test_out_of_order_and_late_events_give_the_known_windows(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    readings = topic("readings", 1, kafka_bootstrap)
    out = topic("tumbled", 1, kafka_bootstrap)
    spec = {
        "nodes": [
            source(readings, max_delay_s=1, idle_timeout_s=600),
            {"id": "tumble", "type": "window.tumbling", "config": {
                "size_s": 10, "allowed_lateness_s": 2, "key": "{{ k }}",
                "aggregate": {"op": "sum", "field": "n"}}},
            {"id": "hop", "type": "window.hopping", "config": {
                "size_s": 10, "step_s": 5, "key": "{{ k }}"}},
            {"id": "sess", "type": "window.session", "config": {"gap_s": 5, "key": "{{ k }}"}},
            {"id": "hist", "type": "memory", "config": {
                "op": "append", "key": "{{ k }}", "field": "n"}},
            table("t_rows", "tumbling"), table("h_rows", "hopping"), table("s_rows", "sessions"),
            table("late_rows", "late"), table("m_rows", "memory"),
            {"id": "t_out", "type": "sink.kafka", "config": {"topic": out}},
        ],
        "edges": [
            ["in", "tumble"], ["in", "hop"], ["in", "sess"], ["in", "hist"],
            ["tumble", "t_rows"], ["hop", "h_rows"], ["sess", "s_rows"], ["hist", "m_rows"],
            ["tumble", "late_rows", "late"], ["tumble", "t_out"],
        ],
    }  # fmt: skip
    deployment = deploy(world, "readings", spec)
    # (key, event time s, n) in offset order; the watermark trails the largest time by 1 s.
    readings_in = [
        ("a", 1, 1), ("b", 3, 10), ("a", 9.5, 2),
        ("a", 4, 4),  # out of order within max_delay
        ("a", 12, 8),
        ("a", 8, 16),  # after its window's end, within the allowed lateness: counted
        ("a", 14, 32),
        ("a", 7, 64),  # beyond the lateness: late
        ("b", 25, 1),
        ("z", 100, 0),  # moves the watermark past every window but its own
    ]  # fmt: skip
    send_to_partitions(
        kafka_bootstrap,
        readings,
        [(0, k, {"k": k, "ts": at(s), "n": n}) for k, s, n in readings_in],
    )
    stream_platform.start_kafka_worker("kafka-w")
    wait_for(lambda: len(rows(world, "sessions")) >= 5, 60, "the sessions")

    assert windows(rows(world, "tumbling"), "count", "sum") == [
        ("a", 0, 10, 4, 23), ("a", 10, 20, 2, 40), ("b", 0, 10, 1, 10), ("b", 20, 30, 1, 1),
    ]  # fmt: skip
    assert [row["n"] for row in rows(world, "late")] == [64]
    # The same results on a Kafka topic, keyed by the window's key, each once.
    reader = TopicReader(kafka_bootstrap, out)
    reader.read_until(4, 30)
    produced = [json.loads(r.value) for r in reader.distinct().values()]
    assert windows(produced, "count", "sum") == windows(rows(world, "tumbling"), "count", "sum")
    assert sorted(r.key or "" for r in reader.distinct().values()) == ["a", "a", "b", "b"]
    reader.close()
    assert windows(rows(world, "hopping"), "count") == [
        ("a", -5, 5, 1), ("a", 0, 10, 3), ("a", 5, 15, 5), ("a", 10, 20, 2),
        ("b", -5, 5, 1), ("b", 0, 10, 1), ("b", 20, 30, 1), ("b", 25, 35, 1),
    ]  # fmt: skip
    # a's event at 4 s came after its session [1,6) had closed: a session of its own.
    assert windows(rows(world, "sessions"), "count") == [
        ("a", 1, 6, 1), ("a", 4, 9, 1), ("a", 8, 19, 4), ("b", 3, 8, 1), ("b", 25, 30, 1),
    ]  # fmt: skip
    assert all(row["early"] is False for row in rows(world, "tumbling"))
    history = [row["memory"] for row in rows(world, "memory") if row["k"] == "a"]
    assert max(history, key=len) == [1, 2, 4, 8, 16, 32, 64]
    with tenant_context(world.acme):
        offset = PartitionOffset.objects.get(deployment=deployment)
        # The closer's windows are still open, held in PostgreSQL with the offset.
        open_windows = KeyedState.objects.filter(deployment=deployment).exclude(owner="hist")
        assert {(s.owner, s.key) for s in open_windows} == {
            ("tumble", "z"),
            ("hop", "z"),
            ("sess", "z"),
        }
    assert offset.watermark_ms == at(99)
    assert offset.late == {"tumble": 1, "sess": 1}


def _chaos_records(count: int, keys: int, partitions: int) -> list[tuple[int, str, dict]]:
    """In order per key, 20 ms apart in event time, shuffled by up to 0.5 s (less than the
    max delay: none is late, so the answer does not depend on where batches end)."""
    rng = random.Random(7)
    records = []
    for i in range(count):
        key = f"k{i % keys}"
        ts = at(i * 0.02 + rng.uniform(-0.5, 0))
        records.append((i % keys % partitions, key, {"k": key, "ts": ts, "i": i}))
    return records


def test_windows_and_memory_fire_once_across_kills_and_a_rebalance(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    partitions, keys, count, waves = 2, 20, 6000, 5
    events = topic("events", partitions, kafka_bootstrap)
    spec = {
        "nodes": [
            source(events, max_delay_s=1, idle_timeout_s=600),
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 2}},
            {"id": "seen", "type": "memory", "config": {
                "op": "append", "field": "i", "max_items": 1000}},
            table("w_rows", "counts"),
        ],
        "edges": [["in", "w"], ["in", "seen"], ["w", "w_rows"]],
    }  # fmt: skip
    deployment = deploy(world, "chaos", spec)
    records = _chaos_records(count, keys, partitions)
    expected = Counter((r["k"], (r["ts"] // 2000) * 2000) for _p, _k, r in records)
    worker = stream_platform.start_kafka_worker("kafka-c", member="kafka-c@windows")
    per_wave = count // waves
    for wave in range(waves):
        send_to_partitions(
            kafka_bootstrap, events, records[wave * per_wave : (wave + 1) * per_wave]
        )
        time.sleep(random.uniform(0.3, 1.5))
        stream_platform.kill(worker)  # SIGKILL, mid-window: every window spans the waves
        worker = stream_platform.start_kafka_worker(f"kafka-c{wave}", member="kafka-c@windows")
    # A second worker joins: the group's partitions are split between the two mid-window.
    stream_platform.start_kafka_worker("kafka-d")
    closers = [
        (p, f"closer{p}", {"k": f"closer{p}", "ts": at(10_000), "i": -1}) for p in range(partitions)
    ]
    send_to_partitions(kafka_bootstrap, events, closers)
    wait_for(lambda: len(rows(world, "counts")) >= len(expected), 120, "every window")
    time.sleep(1)  # a window fired twice would show up by now

    found: Counter[tuple[str, int]] = Counter()
    for row in rows(world, "counts"):
        start = int(datetime.fromisoformat(row["start"]).timestamp() * 1000)
        found[(row["key"], start)] += row["count"]
    assert len(rows(world, "counts")) == len(expected)  # each window once
    assert found == expected  # with every event counted once
    with tenant_context(world.acme):
        memory = {
            s.key: s.value["items"]
            for s in KeyedState.objects.filter(deployment=deployment, owner="seen")
        }
        # The records went only into state: no event of theirs is stored; each window's is.
        stored = Event.objects.filter(run=deployment.run)
        assert not stored.filter(node_id="in").exists()
        assert stored.filter(node_id="w").count() == len(expected)
    for key_index in range(keys):
        key = f"k{key_index}"
        assert memory[key] == [r["i"] for _p, k, r in records if k == key]


def test_an_idle_partition_fires_its_windows_by_the_wall_clock(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    quiet = topic("quiet", 2, kafka_bootstrap)
    spec = {
        "nodes": [
            source(quiet, max_delay_s=0.5, idle_timeout_s=1),
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 2}},
            table("w_rows", "idle"),
        ],
        "edges": [["in", "w"], ["w", "w_rows"]],
    }
    deployment = deploy(world, "quiet", spec)
    stream_platform.start_kafka_worker("kafka-i")
    now = int(time.time() * 1000)
    send_to_partitions(kafka_bootstrap, quiet, [(0, "a", {"ts": now}), (0, "a", {"ts": now + 100})])
    # Nothing else arrives on partition 0, and partition 1 never sees a record.
    wait_for(lambda: len(rows(world, "idle")) == 1, 30, "the idle partition's window")
    assert rows(world, "idle")[0]["count"] == 2
    with tenant_context(world.acme):
        marks = {
            o.partition: o.watermark_ms
            for o in PartitionOffset.objects.filter(deployment=deployment)
        }
    assert marks[0] is not None and marks[0] >= now + 100 and marks.get(1) is None


def test_redeploy_keeps_unchanged_windows_and_drops_changed_ones(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    clicks = topic("clicks", 1, kafka_bootstrap)

    def spec(size_s: int, table_name: str) -> dict[str, Any]:
        return {
            "nodes": [
                source(clicks, idle_timeout_s=600),
                {"id": "w", "type": "window.tumbling", "config": {"size_s": size_s}},
                table("w_rows", table_name),
            ],
            "edges": [["in", "w"], ["w", "w_rows"]],
        }

    def click(i: int, seconds: float) -> tuple[int, str, dict[str, Any]]:
        return (0, "u", {"ts": at(seconds), "i": i})

    deployment = deploy(world, "clicks", spec(10, "v1"))
    graph = deployment.graph
    stream_platform.start_kafka_worker("kafka-r")

    def taken(n: int) -> bool:
        with tenant_context(world.acme):
            return (
                sum(o.records for o in PartitionOffset.objects.filter(deployment=graph.deployment))
                >= n
            )

    send_to_partitions(kafka_bootstrap, clicks, [click(0, 1), click(1, 2)])
    wait_for(lambda: taken(2), 60, "the first clicks")
    with tenant_context(world.acme):
        # Another table, the same window: its open window (2 clicks) carries over.
        v2 = save_version(graph=graph, spec=spec(10, "v2"), actor=world.owner, note="", based_on=1)
        assert services.state_to_drop(graph.deployment, v2) == []
        services.deploy(graph=graph, version=v2, actor=world.owner)
    send_to_partitions(kafka_bootstrap, clicks, [click(2, 3), click(3, 25)])
    wait_for(lambda: len(rows(world, "v2")) == 1, 60, "the window spanning the redeploy")
    assert rows(world, "v2")[0]["count"] == 3
    with tenant_context(world.acme):
        # Now the window's size changes: its state (the window at 20 s) is dropped.
        v3 = save_version(graph=graph, spec=spec(5, "v3"), actor=world.owner, note="", based_on=2)
        dropped = services.state_to_drop(graph.deployment, v3)
        assert dropped == [{"owner": "w", "nodes": ["w"], "entries": 1, "reason": "config changed"}]
        services.deploy(graph=graph, version=v3, actor=world.owner)
    send_to_partitions(kafka_bootstrap, clicks, [click(4, 26), click(5, 60)])
    wait_for(lambda: len(rows(world, "v3")) == 1, 60, "the new version's window")
    assert windows(rows(world, "v3"), "count") == [("u", 25, 30, 1)]
    assert rows(world, "v2") and len(rows(world, "v2")) == 1


def test_a_window_after_an_llm_step_counts_each_output_once(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    tickets = topic("tickets", 2, kafka_bootstrap)
    spec = {
        "nodes": [
            source(tickets, max_delay_s=0, idle_timeout_s=1),
            {"id": "classify", "type": "llm.generate", "config": {
                "model": "default", "prompt": "Classify: {{ body }}", "max_tokens": 4}},
            {"id": "per_team", "type": "window.tumbling", "config": {
                "size_s": 12, "key": "{{ team }}", "aggregate": {"op": "collect"}}},
            table("counts", "per_team"),
            # When a team's window closes, a model summarizes its tickets.
            {"id": "summarize", "type": "llm.generate", "config": {
                "model": "default", "prompt": SUMMARY_PROMPT, "max_tokens": 6,
                "output": "summary"}},
            table("summaries", "summaries"),
        ],
        "edges": [
            ["in", "classify"], ["classify", "per_team"], ["per_team", "counts"],
            ["per_team", "summarize"], ["summarize", "summaries"],
        ],
    }  # fmt: skip
    deployment = deploy(world, "tickets", spec)
    stream_platform.start_worker("cpu", CPU_WORKER_QUEUES, pool="prefork", concurrency=2)
    stream_platform.start_worker("gpu", ["gpu"], concurrency=4)
    stream_platform.start_kafka_worker("kafka-t")
    sent = [
        (i % 2, f"t{i}", {"ts": at(i), "body": f"ticket {i}", "team": "red" if i % 3 else "blue"})
        for i in range(12)
    ]
    send_to_partitions(kafka_bootstrap, tickets, sent)
    wait_for(lambda: len(rows(world, "per_team")) == 2, 120, "one window per team")
    # Windowed by the tickets' own event time (12 s from T0), not by when the model
    # answered; each classified ticket once, with the model's output beside its fields.
    assert windows(rows(world, "per_team"), "count") == [("blue", 0, 12, 4), ("red", 0, 12, 8)]
    by_team = {row["key"]: row for row in rows(world, "per_team")}
    red = sorted(event["body"] for event in by_team["red"]["events"])
    assert red == sorted(f"ticket {i}" for i in range(12) if i % 3)
    assert all(event["text"] for event in by_team["red"]["events"])
    # The window's events reached the summary's prompt, in event-time order.
    wait_for(lambda: len(rows(world, "summaries")) == 2, 60, "one summary per team")
    for row in rows(world, "summaries"):
        bodies = [f"ticket {i}" for i in range(12) if (i % 3 != 0) == (row["key"] == "red")]
        prompt = f"Team {row['key']}: " + "".join(f"{body}. " for body in bodies)
        assert row["summary"] == "".join(tokens_for(prompt, 6))
    with tenant_context(world.acme):
        assert not StreamRelay.objects.filter(run=deployment.run).exists()


def test_a_drain_fires_the_open_windows_before_it_stops(
    world: World, stream_platform: Platform, kafka_bootstrap: str
) -> None:
    sales = topic("sales", 2, kafka_bootstrap)
    spec = {
        "nodes": [
            source(sales, idle_timeout_s=600),
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 60}},
            table("w_rows", "drained"),
        ],
        "edges": [["in", "w"], ["w", "w_rows"]],
    }
    deployment = deploy(world, "sales", spec)
    stream_platform.start_kafka_worker("kafka-d")
    sent = [(i % 2, f"s{i % 2}", {"ts": at(i)}) for i in range(5)]
    send_to_partitions(kafka_bootstrap, sales, sent)

    def taken() -> bool:
        with tenant_context(world.acme):
            return (
                sum(o.records for o in PartitionOffset.objects.filter(deployment=deployment)) == 5
            )

    wait_for(taken, 60, "the sales")
    assert rows(world, "drained") == []  # the watermark is far from the windows' end
    with tenant_context(world.acme):
        services.drain(deployment, actor=world.owner)

    def stopped() -> bool:
        with tenant_context(world.acme):
            return Deployment.objects.get(pk=deployment.pk).status == "stopped"

    wait_for(stopped, 60, "the drain to finish")
    assert windows(rows(world, "drained"), "count", "drained") == [
        ("s0", 0, 60, 3, True),
        ("s1", 0, 60, 2, True),
    ]
