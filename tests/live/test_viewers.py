"""Viewer tracking: the last viewer of an `on_disconnect: cancel` run leaving starts its
grace period; a return inside it (a reload) keeps the run; at expiry the sweeper's pass
cancels it. Real WebSocket connections (through the ASGI application) and Redis."""

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from apps.live import viewers
from apps.live.feed import feed_redis
from apps.runs.models import Run, RunStatus
from tests.conftest import World
from tests.live.feedkit import ONE_STEP, Follower, bearer, queued_run

pytestmark = pytest.mark.django_db(transaction=True)

GRACE_S = 0.6


def spec(on_disconnect: str) -> dict[str, Any]:
    policies = {"on_disconnect": on_disconnect, "disconnect_grace_s": GRACE_S}
    return {**ONE_STEP, "policies": policies}


def visit(run: Run, key: str, *, times: int = 1) -> None:
    """Opens the run's feed `times` times in a row, each closed before the next opens."""

    async def scenario() -> None:
        for _ in range(times):
            follower = Follower(run.id, headers=[(b"authorization", key.encode())])
            await follower.connect()
            await follower.disconnect()

    async_to_sync(scenario)()


def status(run: Run) -> str:
    return Run.unscoped_all_tenants.values_list("status", flat=True).get(id=run.id)


def test_the_last_viewer_leaving_cancels_a_cancel_run_after_the_grace_period(
    world: World,
) -> None:
    run = queued_run(world, spec("cancel"))
    visit(run, bearer(world.acme))
    assert viewers.cancel_abandoned_runs() == 0  # inside the grace period
    assert status(run) == RunStatus.QUEUED
    time.sleep(GRACE_S)
    assert viewers.cancel_abandoned_runs() == 1
    cancelled = Run.unscoped_all_tenants.get(id=run.id)
    assert cancelled.status == RunStatus.CANCELLED
    assert "no viewer for" in cancelled.error
    assert viewers.cancel_abandoned_runs() == 0  # forgotten once handled


def test_a_viewer_back_inside_the_grace_period_keeps_the_run(world: World) -> None:
    run = queued_run(world, spec("cancel"))
    key = bearer(world.acme)

    async def reload_and_stay() -> None:
        first = Follower(run.id, headers=[(b"authorization", key.encode())])
        await first.connect()
        await first.disconnect()
        second = Follower(run.id, headers=[(b"authorization", key.encode())])
        await second.connect()  # the reloaded page
        await asyncio.sleep(GRACE_S * 2)
        assert await sync_to_async(viewers.cancel_abandoned_runs)() == 0
        await second.disconnect()

    async_to_sync(reload_and_stay)()
    assert status(run) == RunStatus.QUEUED


def test_a_detach_run_outlives_its_viewers(world: World) -> None:
    run = queued_run(world, spec("detach"))
    visit(run, bearer(world.acme), times=2)
    time.sleep(GRACE_S)
    assert viewers.cancel_abandoned_runs() == 0
    assert status(run) == RunStatus.QUEUED


def test_viewers_of_a_web_process_that_died_count_as_gone_once_stale(world: World) -> None:
    """No disconnect ever came: entries stop being refreshed and go stale."""
    run = queued_run(world, spec("cancel"))
    client = feed_redis()
    last_seen = time.time() - viewers.STALE_AFTER_S - GRACE_S
    client.hset(viewers.viewers_key(run.id), "specific.dead!1", last_seen)
    client.sadd(viewers.WATCHED, str(run.id))
    fresh = queued_run(world, spec("cancel"), slug="g2")
    client.hset(viewers.viewers_key(fresh.id), "specific.alive!1", time.time())
    client.sadd(viewers.WATCHED, str(fresh.id))
    assert viewers.cancel_abandoned_runs() == 1
    assert status(run) == RunStatus.CANCELLED
    assert status(fresh) == RunStatus.QUEUED


def test_gone_since_is_the_latest_departure() -> None:
    now = 1000.0
    stale = str(now - viewers.STALE_AFTER_S - 5).encode()
    assert viewers.gone_since({b"a": str(now - 1).encode()}, None, now) is None
    assert viewers.gone_since({b"a": stale}, b"990.0", now) == 995.0
    assert viewers.gone_since({}, b"990.0", now) == 990.0


def test_viewers_of_a_run_they_cannot_cancel_are_not_tracked(world: World) -> None:
    """Bookkeeping only where it matters: following a `detach` run writes nothing."""
    detached = queued_run(world, spec("detach"))
    counted = queued_run(world, spec("cancel"), slug="g2")
    key = bearer(world.acme)
    client = feed_redis()

    async def watch_both() -> None:
        followers = [
            Follower(run.id, headers=[(b"authorization", key.encode())])
            for run in (detached, counted)
        ]
        for follower in followers:
            await follower.connect()
        assert not client.exists(viewers.viewers_key(detached.id))
        assert len(client.hgetall(viewers.viewers_key(counted.id))) == 1
        for follower in followers:
            await follower.disconnect()

    async_to_sync(watch_both)()
    assert not client.exists(viewers.viewers_key(detached.id), viewers.left_key(detached.id))
    assert client.hgetall(viewers.viewers_key(counted.id)) == {}
    assert client.exists(viewers.left_key(counted.id))


def test_one_task_per_process_refreshes_every_counted_viewer(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(viewers, "VIEWER_REFRESH_S", 0.2)
    runs = [queued_run(world, spec("cancel"), slug=f"g{n}") for n in range(3)]
    key = bearer(world.acme)
    client = feed_redis()

    def last_seen() -> list[float]:
        return [
            float(v) for run in runs for v in client.hgetall(viewers.viewers_key(run.id)).values()
        ]

    async def watch() -> None:
        followers = [Follower(run.id, headers=[(b"authorization", key.encode())]) for run in runs]
        for follower in followers:
            await follower.connect()
        first = last_seen()
        assert len(first) == 3
        deadline = time.monotonic() + 5
        while not all(b > a for a, b in zip(first, last_seen(), strict=True)):
            assert time.monotonic() < deadline, "not refreshed within 5 s"
            await asyncio.sleep(0.05)
        for follower in followers:
            await follower.disconnect()

    async_to_sync(watch)()
