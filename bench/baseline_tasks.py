"""The baseline: a bare Celery task that hands itself on N times through the broker, the
cost a durable step must compete with (DESIGN "A step's life", step 4)."""

import time

import redis
from celery import shared_task
from django.conf import settings


@shared_task(name="bench.hop", ignore_result=True, acks_late=True)
def hop(remaining: int, key: str) -> None:
    if remaining > 0:
        hop.apply_async(args=(remaining - 1, key), queue="cpu")
        return
    redis.Redis.from_url(settings.REDIS_URL).set(key, repr(time.time()))


@shared_task(name="bench.fan_out", ignore_result=True, acks_late=True)
def fan_out(items: int, key: str) -> None:
    """One task sends `items` tasks, as a fan-out step sends its items' messages."""
    for _ in range(items):
        fan_item.apply_async(args=(key,), queue="cpu")


@shared_task(name="bench.fan_item", ignore_result=True, acks_late=True)
def fan_item(key: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.incr(key)
    client.set(f"{key}:at", repr(time.time()))


@shared_task(name="bench.noop", ignore_result=True, acks_late=True)
def noop(key: str | None = None) -> None:
    """A link of a bare Celery chain; the last link (given a key) records when it ended:
    a counter, and its time in a list whose largest entry is the last completion."""
    if key is None:
        return
    at = repr(time.time())
    with redis.Redis.from_url(settings.REDIS_URL).pipeline() as pipe:
        pipe.incr(key)
        pipe.rpush(f"{key}:at", at)
        pipe.execute()
