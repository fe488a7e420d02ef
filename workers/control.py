"""The control channel: how a stop decided anywhere reaches the engine generating for it.

A run cancel, an expiry, a crossed budget or "the last viewer left" is published on one
Redis pub/sub channel. Every worker process that generates listens (ControlListener) and
aborts the matching engine requests at once, within one decode step. Pub/sub delivers at
most once, so a Watchdog also polls the database for the runs it is generating for and
checks leases: a lost message costs a poll interval, never a zombie.
"""

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction

from sluice.redis_client import redis_client
from workers.inference.host import HOST, EngineHost, StopSignal

logger = logging.getLogger(__name__)

CHANNEL = "sluice:control"
# The fallback's pace: a stop whose message was lost still lands within this.
WATCHDOG_INTERVAL_S = 0.5

# What the watchdog does each interval: the engine's database check of this process's
# generations (apps.runs.engine.watchdog); returns how many it stopped.
Watch = Callable[[EngineHost], int]


def publish_stop(
    kind: str,
    *,
    runs: Collection[Any] = (),
    steps: Collection[Any] = (),
    tenant: int | None = None,
    at: float | None = None,
    detail: str = "",
) -> None:
    message = {
        "kind": kind,
        "at": time.time() if at is None else at,
        "runs": [str(r) for r in runs],
        "steps": [str(s) for s in steps],
        "tenant": tenant,
        "detail": detail,
    }
    try:
        redis_client().publish(CHANNEL, json.dumps(message))
    except redis.RedisError:
        # The watchdogs' database poll still stops the generations, a poll interval later.
        logger.warning("control channel unavailable; %s stop left to the watchdogs", kind)


def publish_stop_on_commit(kind: str, *, runs: Collection[Any], detail: str = "") -> None:
    """After the stop is committed, so a worker never acts on a decision rolled back. The
    timestamp is the decision's, taken now."""
    at = time.time()
    transaction.on_commit(lambda: publish_stop(kind, runs=runs, at=at, detail=detail))


def handle(host: EngineHost, raw: bytes | str) -> int:
    """Applies one control message to this process's generations; returns how many stopped."""
    try:
        message = json.loads(raw)
        signal = StopSignal(str(message["kind"]), float(message["at"]), message.get("detail", ""))
        runs = _ids(message.get("runs"))
        steps = _ids(message.get("steps"))
        tenant = message.get("tenant")
        if tenant is not None and not isinstance(tenant, int):
            raise TypeError("tenant must be an id")
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring a malformed control message: %.200r", raw)
        return 0
    return host.stop_matching(signal, runs=runs, steps=steps, tenant=tenant)


def _ids(value: Any) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("runs and steps must be lists of ids")
    return set(value)


class ControlListener:
    """Subscribes once per process, from the first generation on, and keeps reconnecting."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._pid = 0
        self.subscribed = threading.Event()

    def ensure_running(self, watch: Watch) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.subscribed.clear()
            threading.Thread(target=self._listen, name="sluice-control", daemon=True).start()
            threading.Thread(
                target=self._watch, args=(watch,), name="sluice-watchdog", daemon=True
            ).start()
        # A stop published before the subscription took would be missed: wait briefly; the
        # watchdog covers a slower start.
        self.subscribed.wait(timeout=2.0)

    def _listen(self) -> None:
        while True:
            try:
                pubsub = redis.Redis.from_url(settings.REDIS_URL).pubsub(
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(CHANNEL)
                self.subscribed.set()
                for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        handle(self.host, message["data"])
                    except Exception:  # one bad message must not end the listener
                        logger.exception("control message failed: %.200r", message["data"])
            except redis.RedisError:
                # Said once per outage; the watchdog keeps stopping generations meanwhile.
                if self.subscribed.is_set():
                    logger.warning("control channel lost; resubscribing every second")
                self.subscribed.clear()
                time.sleep(1.0)

    def _watch(self, watch: Watch) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            try:
                watch(self.host)
            except Exception:
                logger.exception("control watchdog failed; will try again")
                connection.close()


LISTENER = ControlListener(HOST)
