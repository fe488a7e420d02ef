"""The windows benchmark's floor: a hand-written confluent-kafka loop keeping the same
tumbling count and session windows in dicts, with no durability.

    python -m bench.windows_floor --bootstrap HOST:PORT --group G --source T
        --outputs TUMBLE SESSION LATE_TUMBLE LATE_SESSION
        --size-s S --gap-s G --lateness-s L --max-delay-s D --expect N

Per Kafka partition, in offset order: a watermark (the largest event time less the max
delay), tumbling windows by (key, start) and sessions by key. A record too late for a window
goes to that window's late topic as it came; a window the watermark has passed (end plus the
lateness) goes out as the same JSON the platform emits, at the end of the consumed batch. No
database, no checkpoint, no effect keys; offsets auto-committed by the client. Prints `ready`
once its partitions are assigned, then `done <epoch ms>` once it has taken `--expect` records
and the producer has delivered everything it sent, and exits.
"""

import argparse
import heapq
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

# (kind, key, start ms, end ms, count)
Closed = tuple[str, str, int, int, int]


class PartitionWindows:
    """One partition's watermark, tumbling windows and sessions (times in epoch ms)."""

    def __init__(self, size_ms: int, gap_ms: int, lateness_ms: int, delay_ms: int) -> None:
        self.size, self.gap, self.lateness, self.delay = size_ms, gap_ms, lateness_ms, delay_ms
        self.watermark: int | None = None
        self.tumbling: dict[tuple[str, int], int] = {}
        self.tumbling_ends: list[tuple[int, str, int]] = []  # heap of (end, key, start)
        self.sessions: dict[str, list[list[int]]] = {}  # key -> [[start, end, count], ...]
        # Heap of (end, key, start); an entry whose session merged since is skipped.
        self.session_ends: list[tuple[int, str, int]] = []

    def take(self, key: str, t: int) -> tuple[bool, bool]:
        """Adds one record; returns whether it is late for the tumbling and session window."""
        wm = self.watermark
        start = t - t % self.size
        late_tumbling = wm is not None and start + self.size + self.lateness <= wm
        if not late_tumbling:
            count = self.tumbling.get((key, start))
            if count is None:
                heapq.heappush(self.tumbling_ends, (start + self.size, key, start))
            self.tumbling[(key, start)] = (count or 0) + 1
        late_session = wm is not None and t + self.gap + self.lateness <= wm
        if not late_session:
            self._join_session(key, t, wm)
        if wm is None or t - self.delay > wm:
            self.watermark = t - self.delay
        return late_tumbling, late_session

    def _join_session(self, key: str, t: int, wm: int | None) -> None:
        start, end, count = t, t + self.gap, 1
        kept = []
        for session in self.sessions.get(key, ()):
            is_open = wm is None or session[1] + self.lateness > wm
            if is_open and session[0] < t + self.gap and t < session[1]:
                start, end = min(start, session[0]), max(end, session[1])
                count += session[2]
            else:
                kept.append(session)
        kept.append([start, end, count])
        self.sessions[key] = kept
        heapq.heappush(self.session_ends, (end, key, start))

    def closed(self) -> Iterator[Closed]:
        """Takes out every window the watermark has passed."""
        wm = self.watermark
        if wm is None:
            return
        while self.tumbling_ends and self.tumbling_ends[0][0] + self.lateness <= wm:
            end, key, start = heapq.heappop(self.tumbling_ends)
            yield "tumble", key, start, end, self.tumbling.pop((key, start))
        while self.session_ends and self.session_ends[0][0] + self.lateness <= wm:
            end, key, start = heapq.heappop(self.session_ends)
            sessions = self.sessions.get(key, [])
            for i, session in enumerate(sessions):
                if session[0] == start and session[1] == end:
                    del sessions[i]
                    yield "session", key, start, end, session[2]
                    break
            if not sessions:
                self.sessions.pop(key, None)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--bootstrap", "--group", "--source"):
        parser.add_argument(name, required=True)
    parser.add_argument("--outputs", nargs=4, required=True)
    for name in ("--size-s", "--gap-s", "--lateness-s", "--max-delay-s"):
        parser.add_argument(name, type=float, required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "linger.ms": 5,
            "queue.buffering.max.messages": 500_000,
        }
    )

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        # From the start, without asking the group for offsets it has never committed.
        c.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in partitions])
        print("ready", flush=True)

    consumer.subscribe([args.source], on_assign=on_assign)
    ms = [round(x * 1000) for x in (args.size_s, args.gap_s, args.lateness_s, args.max_delay_s)]
    run(consumer, producer, args.outputs, ms, args.expect)
    producer.flush(120)
    print(f"done {time.time() * 1000:.1f}", flush=True)
    consumer.close()
    return 0


def run(
    consumer: Consumer, producer: Producer, outputs: list[str], ms: list[int], expect: int
) -> None:
    tumble_topic, session_topic, late_tumble_topic, late_session_topic = outputs
    window_topic = {"tumble": tumble_topic, "session": session_topic}
    partitions: dict[int, PartitionWindows] = {}

    def produce(topic: str, value: bytes, key: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                return
            except BufferError:
                producer.poll(0.05)

    taken = 0
    while taken < expect:
        touched = set()
        for message in consumer.consume(num_messages=1000, timeout=0.1):
            if message.error() is not None:
                continue
            taken += 1
            partition, key, value = message.partition() or 0, message.key() or b"", message.value()
            assert value is not None  # the bench sends no tombstones
            windows = partitions.get(partition)
            if windows is None:
                windows = partitions[partition] = PartitionWindows(*ms)
            late_tumbling, late_session = windows.take(key.decode(), int(json.loads(value)["ts"]))
            if late_tumbling:
                produce(late_tumble_topic, value, key)
            if late_session:
                produce(late_session_topic, value, key)
            touched.add(partition)
        for partition in touched:
            for kind, key_text, start, end, count in partitions[partition].closed():
                payload = {
                    "key": key_text, "start": iso(start), "end": iso(end),
                    "count": count, "early": False,
                }  # fmt: skip
                produce(window_topic[kind], json.dumps(payload).encode(), key_text.encode())
        producer.poll(0)


if __name__ == "__main__":
    sys.exit(main())
