"""Who is watching a run, so a run whose policy is `on_disconnect: cancel` stops once
nobody has watched it for its grace period (policies.disconnect_grace_s, default
SLUICE_VIEWER_GRACE_S), and a page reload inside that period changes nothing.

Only viewers that count are kept: those of an active `cancel` run. Following any other run
costs no bookkeeping at all. Each counted connection is an entry in the run's Redis hash
(connection id -> last seen), removed when it closes; the time the last one left is kept
beside it. One task per web process refreshes all of that process's entries every
VIEWER_REFRESH_S in one pipelined round trip, so thousands of viewers wake nothing per
connection. A web process that dies without closing its connections leaves entries that go
stale, which count as left STALE_AFTER_S after they were last seen. The sweeper (beat)
calls `cancel_abandoned_runs` every pass: timers live in Redis, not in the web process that
saw the disconnect."""

import asyncio
import logging
import time
from typing import Any
from uuid import UUID

from django.conf import settings

from apps.live import feed
from apps.runs.models import ACTIVE_RUN_STATUSES, Run
from apps.runs.services import cancel_abandoned
from apps.tenants.context import tenant_context

logger = logging.getLogger(__name__)

VIEWER_REFRESH_S = 5.0
STALE_AFTER_S = 3 * VIEWER_REFRESH_S
KEY_TTL_S = 86400
# Runs with on_disconnect: cancel that have had a viewer: the sweeper's to-do list.
WATCHED = "sluice:viewers:watched"


def viewers_key(run_id: object) -> str:
    return f"sluice:viewers:{{{run_id}}}"


def left_key(run_id: object) -> str:
    return f"sluice:viewers:{{{run_id}}}:left"


class _Counted:
    """This event loop's counted viewers, run -> connection ids, and their refresher."""

    def __init__(self) -> None:
        self.runs: dict[UUID, set[str]] = {}
        self.refresher: asyncio.Task[None] | None = None

    def add(self, run_id: UUID, connection: str) -> None:
        self.runs.setdefault(run_id, set()).add(connection)
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.create_task(self._refresh(), name="sluice-viewers")

    def discard(self, run_id: UUID, connection: str) -> bool:
        connections = self.runs.get(run_id)
        if connections is None or connection not in connections:
            return False
        connections.discard(connection)
        if not connections:
            del self.runs[run_id]
        return True

    async def _refresh(self) -> None:
        while self.runs:
            await asyncio.sleep(VIEWER_REFRESH_S)
            try:
                await self._refresh_once()
            except Exception:
                logger.exception("live: could not refresh %d runs' viewers", len(self.runs))

    async def _refresh_once(self) -> None:
        if not self.runs:
            return
        now = time.time()
        pipe = feed.async_feed_redis().pipeline(transaction=False)
        for run_id, connections in list(self.runs.items()):
            pipe.hset(viewers_key(run_id), mapping=dict.fromkeys(connections, now))
        await pipe.execute()


_this_loops = feed.PerLoop(_Counted).get


async def joined(run_id: UUID, connection: str, *, counts: bool) -> None:
    """A connection follows the run; `counts` when its leaving may cancel the run."""
    if not counts:
        return
    client = feed.async_feed_redis()
    pipe = client.pipeline(transaction=False)
    pipe.hset(viewers_key(run_id), connection, time.time())
    pipe.expire(viewers_key(run_id), KEY_TTL_S)
    pipe.delete(left_key(run_id))
    pipe.sadd(WATCHED, str(run_id))
    await pipe.execute()
    _this_loops().add(run_id, connection)


async def left(run_id: UUID, connection: str) -> None:
    if not _this_loops().discard(run_id, connection):
        return  # it never counted
    client = feed.async_feed_redis()
    pipe = client.pipeline(transaction=False)
    pipe.hdel(viewers_key(run_id), connection)
    pipe.set(left_key(run_id), time.time(), ex=KEY_TTL_S)
    await pipe.execute()


def gone_since(entries: dict[Any, Any], left_at: Any, now: float) -> float | None:
    """When the run's last viewer left, or None while someone still watches."""
    seen = [float(v) for v in entries.values()]
    if any(now - t < STALE_AFTER_S for t in seen):
        return None
    candidates = [t + STALE_AFTER_S for t in seen]
    if left_at is not None:
        candidates.append(float(left_at))
    return max(candidates)


def cancel_abandoned_runs() -> int:
    client: Any = feed.feed_redis()
    watched = {m.decode() for m in client.smembers(WATCHED)}
    if not watched:
        return 0
    runs = {
        str(run.id): run
        for run in Run.unscoped_all_tenants.select_related("tenant").filter(id__in=watched)
    }
    cancelled = 0
    now = time.time()
    for run_id in watched:
        run = runs.get(run_id)
        if run is None or run.status not in ACTIVE_RUN_STATUSES or run.on_disconnect != "cancel":
            _forget(client, run_id)
            continue
        entries, left_at = client.hgetall(viewers_key(run_id)), client.get(left_key(run_id))
        if not entries and left_at is None:
            # Its viewers' web process died before saying so: the clock starts now.
            client.set(left_key(run_id), now, nx=True, ex=KEY_TTL_S)
            continue
        since = gone_since(entries, left_at, now)
        grace = (
            run.disconnect_grace_s
            if run.disconnect_grace_s is not None
            else settings.SLUICE_VIEWER_GRACE_S
        )
        if since is None or now - since < grace:
            continue
        with tenant_context(run.tenant):
            cancelled += cancel_abandoned(run, viewers_gone_s=now - since)
        _forget(client, run_id)
    return cancelled


def _forget(client: Any, run_id: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.srem(WATCHED, run_id)
    pipe.delete(viewers_key(run_id), left_key(run_id))
    pipe.execute()
