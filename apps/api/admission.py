"""Admission control: work is refused at the door, with a useful `Retry-After`, rather than
queued without bound.

- Steps waiting for a worker, per tenant (`max_queued_steps`): a submission that would
  push the count past the limit gets 429. `Retry-After` is how long the tenant's current
  drain rate (steps finished over the last half minute) needs to make room.
- Events per second, per tenant (`max_events_per_s`), and requests per minute, per API key
  (`api_requests_per_min`): token buckets in Redis, shared by every web process, refilled
  continuously, each holding a few seconds' worth so short bursts pass.

Limits come from the tenant, else the platform defaults in settings (SLUICE_MAX_*)."""

import math
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from apps.api.problems import Overloaded
from apps.runs.models import CLAIMABLE_STEP_STATUSES, Step
from apps.tenants.models import ApiKey, Tenant
from sluice.redis_client import redis_client

# How far back the drain rate looks.
DRAIN_WINDOW_S = 30
# Retry-After when nothing drains (no worker running, say): look again in a minute.
IDLE_RETRY_AFTER_S = 60
MAX_RETRY_AFTER_S = 3600
# Seconds of the rate a bucket holds, so a burst that short passes.
BURST_S = 2.0

# Takes `n` tokens from the bucket KEYS[1] (rate ARGV[1] per second, capacity ARGV[2]) at
# time ARGV[4]; returns {1, 0} when taken, else {0, seconds until enough have refilled}.
_TAKE = """
local rate, capacity, n, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4])
local saved = redis.call('HMGET', KEYS[1], 't', 'v')
local t, tokens = tonumber(saved[1]) or now, tonumber(saved[2]) or capacity
tokens = math.min(capacity, tokens + math.max(0, now - t) * rate)
local ok = 0
if tokens >= n then
    tokens = tokens - n
    ok = 1
end
redis.call('HSET', KEYS[1], 't', now, 'v', tokens)
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
if ok == 1 then return {1, '0'} end
return {0, tostring((n - tokens) / rate)}
"""


@dataclass(frozen=True)
class Bucket:
    name: str
    per_second: float

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_second * BURST_S)

    def take(self, n: int) -> float | None:
        """None when `n` tokens were taken; else the seconds until they would be there."""
        ok, wait = redis_client().eval(
            _TAKE, 1, self.name, self.per_second, self.capacity, n, time.time()
        )
        return None if int(ok) else float(wait)


def queued_steps_limit(tenant: Tenant) -> int:
    return tenant.max_queued_steps or settings.SLUICE_MAX_QUEUED_STEPS


def events_per_s_limit(tenant: Tenant) -> int:
    return tenant.max_events_per_s or settings.SLUICE_MAX_EVENTS_PER_S


def requests_per_min_limit(tenant: Tenant) -> int:
    return tenant.api_requests_per_min or settings.SLUICE_API_REQUESTS_PER_MIN


def admit(tenant: Tenant, *, steps: int, events: int) -> None:
    """Raises Overloaded when `steps` more waiting steps or `events` more events would take
    the tenant past a limit. Call inside the tenant's context, before writing anything."""
    _admit_events(tenant, events)
    _admit_steps(tenant, steps)


def _admit_events(tenant: Tenant, events: int) -> None:
    limit = events_per_s_limit(tenant)
    bucket = Bucket(f"sluice:admit:events:{tenant.pk}", limit)
    if events > bucket.capacity:
        raise Overloaded(
            f"{events} events in one request is more than the {limit} events/s this tenant"
            f" may send (bursts up to {int(bucket.capacity)}); split it into smaller requests.",
            retry_after_s=math.ceil(events / limit),
        )
    wait = bucket.take(events)
    if wait is not None:
        raise Overloaded(
            f"This tenant may send {limit} events per second; slow down or ask for a higher limit.",
            retry_after_s=_whole_seconds(wait),
        )


def _admit_steps(tenant: Tenant, steps: int) -> None:
    limit = queued_steps_limit(tenant)
    waiting = Step.objects.filter(status__in=CLAIMABLE_STEP_STATUSES).count()
    if waiting + steps <= limit:
        return
    since = timezone.now() - timedelta(seconds=DRAIN_WINDOW_S)
    drained_per_s = Step.objects.filter(finished_at__gte=since).count() / DRAIN_WINDOW_S
    excess = waiting + steps - limit
    retry_after = excess / drained_per_s if drained_per_s else IDLE_RETRY_AFTER_S
    raise Overloaded(
        f"{waiting} steps are waiting for workers and this would add {steps}; the limit is"
        f" {limit}. Steps are finishing at {drained_per_s:.1f}/s, so there should be room"
        " after Retry-After seconds.",
        retry_after_s=_whole_seconds(retry_after),
    )


def throttle_key(key: ApiKey) -> float | None:
    """None when the key may make one more request now; else the seconds to wait."""
    per_min = requests_per_min_limit(key.tenant)
    return Bucket(f"sluice:rate:key:{key.pk}", per_min / 60).take(1)


def _whole_seconds(seconds: float) -> int:
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))
