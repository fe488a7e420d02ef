"""The Kafka benchmark's floor: a hand-written confluent-kafka loop with no durability.

    python -m bench.kafka_floor --bootstrap HOST:PORT --group G --source T --sink T

Consumes the source topic, renders the same template with the same sandboxed Jinja,
makes the same switch decision and produces the same JSON to the sink topic. No database,
no checkpoint, no dead letters, no effect keys; offsets auto-committed by the client. Prints
`ready` once its partitions are assigned, and runs until SIGTERM.
"""

import argparse
import json
import signal
import sys
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from workers.operators.templating import render

stopping = False


def stop(_signum: int, _frame: FrameType | None) -> None:
    global stopping
    stopping = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--template", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
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
            "queue.buffering.max.messages": 200_000,
        }
    )

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        c.assign(partitions)
        print("ready", flush=True)

    consumer.subscribe([args.source], on_assign=on_assign)
    while not stopping:
        for message in consumer.consume(num_messages=1000, timeout=0.1):
            if message.error() is not None:
                continue
            payload: dict[str, Any] = json.loads(message.value() or b"{}")
            size = render(args.template, {**payload, "input": payload})
            if size not in ("big", "small"):  # the switch: no case, no output
                continue
            value = json.dumps({**payload, "size": size}, separators=(",", ":")).encode()
            while True:
                try:
                    producer.produce(args.sink, value=value, key=message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
    producer.flush(30)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
