"""Windows and memory in a stream segment, without Kafka: records of one partition in
offset order, with their state, give known results (tests/streams/test_windows runs the same
through a real broker and worker)."""

from datetime import UTC, datetime

import pytest

from apps.graphs.validation import SpecInvalid, check_spec
from apps.streams.segment import Record, Segment, SegmentError
from apps.streams.state import PartitionState

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000  # a minute boundary, in ms


def spec(window: dict, *, max_delay_s: float = 0, after: list | None = None) -> dict:
    nodes = [
        {
            "id": "in",
            "type": "source.kafka",
            "config": {"topics": ["t.in"], "max_delay_s": max_delay_s},
        },
        window,
        {"id": "late_rows", "type": "sink.table", "config": {"table": "late"}},
        *(after or []),
    ]
    edges = [["in", window["id"]], [window["id"], "late_rows", "late"]]
    if after:
        edges.append([window["id"], after[0]["id"]])
    return {"nodes": nodes, "edges": edges}


def record(offset: int, key: str, at_s: float, **fields: object) -> Record:
    when = datetime.fromtimestamp((T0 + at_s * 1000) / 1000, tz=UTC)
    return Record(f"t.in:0:{offset}", {"k": key, **fields}, key, when)


def feed(segment: Segment, records: list[Record]) -> tuple[list[dict], list[dict], PartitionState]:
    """Runs the records in order, firing after each (as a batch of one would): (fired results,
    late payloads, state)."""
    state = PartitionState("t.in:0", None, {}, {})
    fired, late = [], []
    for rec in records:
        outcome = segment.run(rec, state)
        late += [row for _table, row, _key in outcome.rows]
        outcomes, failed = segment.fire(state, 0)
        assert not failed
        fired += [o.record.payload for o in outcomes]
    return fired, late, state


def results(fired: list[dict], *fields: str) -> list[tuple]:
    return sorted(
        (f["key"], _s(f["start"]), _s(f["end"]), *(f[name] for name in fields)) for f in fired
    )


def _s(iso: str) -> float:
    return (datetime.fromisoformat(iso).timestamp() * 1000 - T0) / 1000


def test_tumbling_counts_out_of_order_events_and_routes_late_ones() -> None:
    window = {
        "id": "w", "type": "window.tumbling",
        "config": {"size_s": 10, "allowed_lateness_s": 2, "aggregate": {"op": "sum", "field": "n"}},
    }  # fmt: skip
    segment = Segment(spec(window, max_delay_s=1), scope="s")
    records = [
        record(0, "a", 1, n=1),
        record(1, "b", 3, n=10),
        record(2, "a", 9.5, n=2),
        record(3, "a", 4, n=4),  # out of order, within max_delay: same window
        record(4, "a", 12, n=8),  # wm 11: window [0,10) closes at 12, not yet
        record(5, "a", 8, n=16),  # late but within lateness: updates [0,10)
        record(6, "a", 14, n=32),  # wm 13 >= 10 + 2: [0,10) fires for a and b
        record(7, "a", 7, n=64),  # beyond lateness: late
        record(8, "b", 25, n=1),  # wm 24: [10,20) for a fires
    ]
    fired, late, state = feed(segment, records)
    assert results(fired, "count", "sum") == [
        ("a", 0, 10, 4, 23),
        ("a", 10, 20, 2, 40),
        ("b", 0, 10, 1, 10),
    ]
    assert [row["n"] for row in late] == [64]
    assert state.late == {"w": 1}
    assert all(f["early"] is False for f in fired)
    open_windows = {(key, slot) for key, slots in state.entries["w"].items() for slot in slots}
    assert open_windows == {("b", str(T0 + 20_000))}  # b's [20,30)


def test_hopping_windows_overlap() -> None:
    window = {"id": "w", "type": "window.hopping", "config": {"size_s": 10, "step_s": 5}}
    segment = Segment(spec(window), scope="s")
    fired, _late, _state = feed(
        segment, [record(0, "a", 6), record(1, "a", 11), record(2, "a", 40)]
    )
    # 40 leaves [35,45) and [40,50) open.
    assert results(fired, "count") == [("a", 0, 10, 1), ("a", 5, 15, 2), ("a", 10, 20, 1)]


def test_sessions_merge_when_an_event_bridges_them() -> None:
    window = {
        "id": "w", "type": "window.session",
        "config": {"gap_s": 5, "aggregate": {"op": "collect", "limit": 3}},
    }  # fmt: skip
    segment = Segment(spec(window, max_delay_s=10), scope="s")
    records = [
        record(0, "a", 0, i=0),
        record(1, "a", 8, i=1),  # a second session: 8 >= 0 + 5
        record(2, "a", 4, i=2),  # bridges [0,5) and [8,13): one session [0,13)
        record(3, "a", 2, i=3),
        record(4, "b", 40, i=4),  # wm 30: a's session closed at 13
    ]
    fired, _late, _state = feed(segment, records)
    assert len(fired) == 1
    session = fired[0]
    assert (_s(session["start"]), _s(session["end"]), session["count"]) == (0, 13, 4)
    # Collected in event-time order, up to the limit; the rest counted.
    assert [e["i"] for e in session["events"]] == [0, 3, 2]
    assert session["dropped"] == 1


def test_a_record_failing_after_the_window_leaves_no_trace_in_it() -> None:
    window = {"id": "w", "type": "window.tumbling", "config": {"size_s": 10, "key": "{{ k }}"}}
    mem = {
        "id": "m", "type": "memory",
        "config": {"op": "append", "key": "{{ missing_field }}"},
    }  # fmt: skip
    memory_spec = {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            window,
            mem,
        ],
        "edges": [["in", "w"], ["in", "m"]],
    }
    segment = Segment(memory_spec, scope="s")
    state = PartitionState("t.in:0", None, {}, {})
    with pytest.raises(SegmentError, match="missing_field"):
        segment.run(record(0, "a", 1), state)
    assert state.entries == {} and state.watermark_ms is None


def test_memory_appends_reads_bounds_and_expires_by_event_time() -> None:
    memory_spec = {
        "nodes": [
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            {"id": "remember", "type": "memory", "config": {
                "op": "append", "store": "chat", "key": "{{ k }}", "field": "text",
                "max_items": 2, "ttl_s": 60}},
            {"id": "rows", "type": "sink.table", "config": {"table": "memory"}},
        ],
        "edges": [["in", "remember"], ["remember", "rows"]],
    }  # fmt: skip
    segment = Segment(memory_spec, scope="s")
    state = PartitionState("t.in:0", None, {}, {})
    seen = []
    for i, (key, at) in enumerate([("a", 0), ("a", 1), ("b", 2), ("a", 3), ("a", 100)]):
        outcome = segment.run(record(i, key, at, text=f"m{i}"), state)
        seen.append(outcome.rows[0][1]["memory"])
    assert seen == [["m0"], ["m0", "m1"], ["m2"], ["m1", "m3"], ["m4"]]
    assert set(state.entries["store:chat"]) == {"a", "b"}
    segment.fire(state, 0)  # the watermark (100 s) is past b's expiry (62 s)
    assert set(state.entries["store:chat"]) == {"a"}


def test_early_results_are_marked_and_the_final_one_still_fires_once() -> None:
    window = {
        "id": "w", "type": "window.tumbling",
        "config": {"size_s": 10, "early_every_s": 5, "aggregate": {"op": "max", "field": "n"}},
    }  # fmt: skip
    segment = Segment(spec(window), scope="s")
    state = PartitionState("t.in:0", None, {}, {})
    segment.run(record(0, "a", 1, n=3), state)
    early, _ = segment.fire(state, now_ms=10_000)
    assert [(o.record.payload["early"], o.record.payload["max"]) for o in early] == [(True, 3)]
    # Nothing new since: no early result.
    assert segment.fire(state, now_ms=15_000) == ([], [])
    segment.run(record(1, "a", 2, n=7), state)
    assert segment.fire(state, now_ms=12_000 + 2_000) == ([], [])  # under 5 s since the last
    again, _ = segment.fire(state, now_ms=15_000)
    assert [o.record.payload["max"] for o in again] == [7]
    assert again[0].record.origin != early[0].record.origin  # each its own effect keys
    segment.run(record(2, "b", 30, n=0), state)
    final, _ = segment.fire(state, now_ms=16_000)
    # a's window closes (final, once); b's new one gets its first early result.
    assert sorted(
        (o.record.payload["key"], o.record.payload["early"], o.record.payload["count"])
        for o in final
    ) == [("a", False, 2), ("b", True, 1)]


def test_a_window_result_a_later_node_fails_on_becomes_a_dead_letter() -> None:
    window = {"id": "w", "type": "window.tumbling", "config": {"size_s": 10}}
    broken = {
        "id": "shape", "type": "transform.template",
        "config": {"template": "{{ nothing_here }}", "output": "x"},
    }  # fmt: skip
    segment = Segment(spec(window, after=[broken]), scope="s")
    state = PartitionState("t.in:0", None, {}, {})
    segment.run(record(0, "a", 1), state)
    segment.run(record(1, "a", 30), state)
    fired, failed = segment.fire(state, 0)
    assert fired == [] and len(failed) == 1
    assert "nothing_here" in failed[0].error and failed[0].payload["count"] == 1


@pytest.mark.parametrize(
    ("source_node", "node", "problem"),
    [
        (
            {"id": "in", "type": "source.webhook"},
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 10}},
            "runs in stream deployments that start with source.kafka",
        ),
        (
            {"id": "in", "type": "source.manual"},
            {"id": "m", "type": "memory", "config": {"op": "read"}},
            "runs in stream deployments that start with source.kafka",
        ),
        (
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            {"id": "w", "type": "window.hopping", "config": {"size_s": 5, "step_s": 10}},
            "must not be larger than size_s",
        ),
        (
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            {"id": "w", "type": "window.session",
             "config": {"gap_s": 5, "aggregate": {"op": "avg"}}},
            "aggregate.field: is required for avg",
        ),
        (
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 0}},
            "size_s",
        ),
        (
            {"id": "in", "type": "source.kafka", "config": {"topics": ["t.in"]}},
            {"id": "w", "type": "window.tumbling", "config": {"size_s": 5, "key": "{{ x"}},
            "key",
        ),
    ],
)  # fmt: skip
def test_bad_window_and_memory_nodes_are_refused_on_save(
    source_node: dict, node: dict, problem: str
) -> None:
    with pytest.raises(SpecInvalid) as refused:
        check_spec({"nodes": [source_node, node], "edges": [["in", node["id"]]]})
    assert problem in str(refused.value)


def test_a_record_that_only_feeds_state_is_absorbed() -> None:
    window = {"id": "w", "type": "window.tumbling", "config": {"size_s": 10}}
    segment = Segment(spec(window), scope="s")
    state = PartitionState("t.in:0", None, {}, {})
    assert segment.run(record(0, "a", 20), state).absorbed
    # Late: it goes on to the late port's table, so its event is kept for the row's lineage.
    late = segment.run(record(1, "a", 1), state)
    assert not late.absorbed and late.rows
    fired, _ = segment.fire(state, 0)
    assert fired == []  # nothing closed: [20, 30) is still open
