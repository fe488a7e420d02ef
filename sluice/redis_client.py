"""One Redis client per process, for everything that is not the Channels layer: the control
channel, flow control, budgets' meters, admission and webhook markers."""

import os

import redis
from django.conf import settings

_clients: dict[int, redis.Redis] = {}


def redis_client() -> redis.Redis:
    pid = os.getpid()  # a forked child must not share its parent's sockets
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(settings.REDIS_URL)
    return _clients[pid]
