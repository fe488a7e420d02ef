"""`manage.py kafka_worker`: the Kafka worker process (apps.streams.consumer). `make run`
starts one; start more on more machines to share a deployment's partitions."""

import gc
import logging
import os
import signal
import socket
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand

from apps.streams.consumer import KafkaWorker
from workers import kafka


class Command(BaseCommand):
    help = "Consume stream deployments' Kafka topics and run their stream segments."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--name",
            help="this worker's name for good, unique among the running workers: restarted"
            " under it, the worker takes its partitions back at once (static membership)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        kafka.bootstrap_servers()  # fail at start, naming the setting, when Kafka is off
        name = options["name"]
        worker = KafkaWorker(
            name or f"kafka@{socket.gethostname()}.{os.getpid()}", static=bool(name)
        )

        def stop(signum: int, _frame: FrameType | None) -> None:
            worker.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        tune_garbage_collector()
        worker.run()


# Collections that start after this many new container objects. A micro-batch makes tens of
# thousands (records, payloads, events), all gone once it commits; at Python's default of
# 700 the collector ran dozens of times a batch (50,000 -> 200,000: about +5% in process).
GC_THRESHOLD = 200_000


def tune_garbage_collector() -> None:
    """Everything alive at start (Django, the apps, the operators) stays alive: frozen out
    of the collector's scans, whose full passes otherwise walked it all again and again.
    Together: bench windows' worker +25% records/s in process (bench/windows.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 100)
