"""Feed retention against real PostgreSQL and Redis: the sweeper's pass deletes the frames
of runs finished longer ago than their tenant's retention, and only those, a bounded
number of batches at a time; from then on a run's feed, over WebSocket and SSE, is one
`pruned` frame with its final outputs, for its own tenant only."""

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.live import feed, retention
from apps.live.models import PrunedFeed, RunFrame
from apps.live.publisher import FEED
from apps.live.retention import prune_expired_frames
from apps.live.summary import pruned_summary
from apps.runs.models import Event, Run, RunStatus
from apps.runs.replay import replay_dead_steps
from apps.runs.services import cancel_run, start_run
from apps.tenants.context import tenant_context
from apps.tenants.models import Tenant
from apps.tenants.services import update_settings
from tests.conftest import World
from tests.harness.platform import Platform
from tests.live.feedkit import ONE_STEP, Follower, bearer, forget_redis_tail, publish_tokens
from tests.live.test_sse import EventStream
from tests.runs.engine.helpers import drain

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = [f"w{i} " for i in range(20)]


@pytest.fixture(scope="module")
def web(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    platform = Platform("retention")
    try:
        yield platform.start_web()
    finally:
        platform.stop()


def auth(value: str) -> list[Any]:
    return [(b"authorization", value.encode())]


def started(world: World, tenant: Tenant, slug: str, spec: dict[str, Any] = ONE_STEP) -> Run:
    owner = world.owner if tenant == world.acme else world.outsider
    graph = world.graph(slug, spec, tenant=tenant)
    with tenant_context(tenant):
        return start_run(version=graph.live_version(), payload={"x": slug}, actor=owner)


def succeeded(world: World, tenant: Tenant, slug: str, tokens: int = 3) -> Run:
    """A run that streamed `tokens` frames of text, then ran to the end (its step's output
    is the template's text), every frame archived."""
    run = started(world, tenant, slug)
    publish_tokens(run, WORDS[:tokens])
    drain(run)
    assert FEED.flush()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    return run


def cancelled(world: World, slug: str, tokens: int) -> Run:
    """A run of `tokens` token frames and the cancellation's run frame."""
    run = started(world, world.acme, slug)
    publish_tokens(run, WORDS[:tokens])
    with tenant_context(world.acme):
        cancel_run(run, actor=world.owner)
    assert FEED.flush()
    return run


def finished_days_ago(run: Run, days: float, now: datetime) -> None:
    """The clock the run finished by: `days` before `now`."""
    Run.unscoped_all_tenants.filter(pk=run.pk).update(finished_at=now - timedelta(days=days))


def frames(run: Run) -> int:
    return RunFrame.unscoped_all_tenants.filter(run=run).count()


def last_seq(run: Run) -> int:
    return max(RunFrame.unscoped_all_tenants.filter(run=run).values_list("seq", flat=True))


def outputs_of(run: Run) -> list[dict[str, Any]]:
    events = Event.unscoped_all_tenants.filter(run=run, node_id="t").order_by("created_at")
    return [{"node": "t", "payload": e.payload} for e in events]


# -- pruning ---------------------------------------------------------------------------------


def test_only_runs_past_their_own_tenants_retention_are_pruned(world: World) -> None:
    update_settings(tenant=world.globex, values={"feed_retention_days": 7}, actor="test")
    now = timezone.now()
    runs = {
        "acme old": succeeded(world, world.acme, "a-old"),  # acme keeps 30 days
        "acme young": succeeded(world, world.acme, "a-young"),
        "globex old": succeeded(world, world.globex, "g-old"),  # globex keeps 7
        "globex young": succeeded(world, world.globex, "g-young"),
    }
    for name, days in [("acme old", 31), ("acme young", 29), ("globex old", 8)]:
        finished_days_ago(runs[name], days, now)
    finished_days_ago(runs["globex young"], 6, now)
    active = started(world, world.acme, "active")
    publish_tokens(active, WORDS[:3])
    Run.unscoped_all_tenants.filter(pk=active.pk).update(created_at=now - timedelta(days=90))
    before = {name: (frames(run), last_seq(run)) for name, run in runs.items()}
    active_frames = frames(active)

    deleted = prune_expired_frames(now=now)

    assert deleted == before["acme old"][0] + before["globex old"][0]
    assert {name: frames(run) for name, run in runs.items()} == {
        "acme old": 0,
        "acme young": before["acme young"][0],
        "globex old": 0,
        "globex young": before["globex young"][0],
    }
    assert frames(active) == active_frames
    pruned = PrunedFeed.unscoped_all_tenants.values_list("run_id", "tenant_id", "last_seq")
    assert set(pruned) == {
        (runs["acme old"].id, world.acme.id, before["acme old"][1]),
        (runs["globex old"].id, world.globex.id, before["globex old"][1]),
    }
    assert prune_expired_frames(now=now) == 0
    # Two days on, the young ones are past their retention too: the pass picks up after
    # the runs it walked, and the active run is still never touched.
    later = prune_expired_frames(now=now + timedelta(days=2))
    assert later == before["acme young"][0] + before["globex young"][0]
    assert PrunedFeed.unscoped_all_tenants.count() == 4
    assert frames(active) == active_frames


def test_frames_go_in_batches_and_a_call_stops_after_max_batches(world: World) -> None:
    run = cancelled(world, "ten", tokens=9)
    assert frames(run) == 10
    now = timezone.now() + timedelta(days=31)
    deleted, statements = [], []
    for _ in range(3):
        with CaptureQueriesContext(connection) as queries:
            deleted.append(prune_expired_frames(now=now, batch=3, max_batches=2))
        sqls = [q["sql"] for q in queries]
        statements.append(sum(sql.startswith("DELETE") for sql in sqls))
        assert not any('"body"' in sql for sql in sqls)  # frames never come into Python
        # PrunedFeed is there from the first call on: readers ignore the frames left.
        assert PrunedFeed.unscoped_all_tenants.get(run=run).last_seq == 10
    assert deleted == [6, 4, 0]
    assert statements == [2, 2, 0]  # 3 + 3, then 3 + 1 (fewer than a batch: the run is done)
    assert frames(run) == 0


def test_the_sweeper_prunes_once_a_minute_while_nothing_is_left(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH", 3)
    monkeypatch.setattr(retention, "MAX_BATCHES", 2)
    client = feed.feed_redis()
    client.delete(retention.PASS_KEY)
    try:
        first = cancelled(world, "first", tokens=9)
        finished_days_ago(first, 31, timezone.now())
        # Cut off by its bound, a pass leaves the way open: the next sweep goes on.
        assert retention.prune_when_due() == 6
        assert retention.prune_when_due() == 4
        # That one finished its work: the next minute's sweeps skip.
        second = cancelled(world, "second", tokens=2)
        finished_days_ago(second, 31, timezone.now())
        assert retention.prune_when_due() == 0
        assert 0 < client.ttl(retention.PASS_KEY) <= retention.IDLE_S
        assert frames(second) == 3
        client.delete(retention.PASS_KEY)  # the minute is over
        assert retention.prune_when_due() == 3
    finally:
        client.delete(retention.PASS_KEY)


# -- what an old run's feed says -------------------------------------------------------------


def pruned_run(world: World, *, leave_some_frames: bool = False) -> tuple[Run, int]:
    """A run of acme's finished 31 days ago and pruned, its Redis tail gone; with
    `leave_some_frames`, the pass stopped before deleting them all."""
    run = succeeded(world, world.acme, "old", tokens=8)
    seq = last_seq(run)
    finished_days_ago(run, 31, timezone.now())
    prune_expired_frames(batch=3 if leave_some_frames else 5000, max_batches=1)
    assert (frames(run) > 0) == leave_some_frames
    forget_redis_tail(run.id)
    return run, seq


@pytest.mark.parametrize("leave_some_frames", [False, True], ids=["all-deleted", "half-way"])
def test_an_old_runs_feed_is_one_pruned_frame_with_its_final_outputs(
    world: World, leave_some_frames: bool, caplog: pytest.LogCaptureFixture
) -> None:
    run, seq = pruned_run(world, leave_some_frames=leave_some_frames)
    key = bearer(world.acme)
    outputs = outputs_of(run)
    assert outputs and outputs[0]["payload"]  # the template step's output

    async def scenario() -> None:
        for after in (0, 3, seq - 1):
            follower = Follower(run.id, after=after, headers=auth(key))
            hello = await follower.connect()
            assert hello["status"] == "succeeded"
            message = await follower.receive()
            assert message["type"] == "frames"
            assert await follower.nothing_more()
            [frame] = follower.frames
            assert frame["seq"] == seq and frame["type"] == "pruned"
            assert frame["status"] == "succeeded" and frame["error"] == ""
            assert frame["outputs"] == outputs and frame["outputs_truncated"] is False
            assert frame["retention_days"] == 30
            assert frame["detail"].startswith("This run finished more than 30 days ago;")
            assert "Its final outputs follow." in frame["detail"]
            await follower.disconnect()
        for after in (seq, seq + 5):  # the follower has had it: nothing more to say
            follower = Follower(run.id, after=after, headers=auth(key))
            await follower.connect()
            assert await follower.nothing_more()
            assert follower.frames == []
            await follower.disconnect()

    async_to_sync(scenario)()
    assert "are lost" not in caplog.text  # the pruned frames are no hole to warn about


def test_another_tenants_key_finds_no_pruned_run(world: World, web: str) -> None:
    run, _ = pruned_run(world)
    theirs = bearer(world.globex)

    async def scenario() -> None:
        follower = Follower(run.id, headers=auth(theirs))
        await follower.client.connect(5)
        message = await follower.receive()
        assert message["type"] == "error" and message["code"] == "not_found"
        assert await follower.closed_with() == 4404
        assert follower.frames == []

    async_to_sync(scenario)()
    stream = EventStream(web, f"/api/runs/{run.id}/events", {"Authorization": theirs})
    try:
        assert stream.response.status == 404
        assert str(run.id) not in stream.response.read().decode()
    finally:
        stream.close()


def test_sse_gives_the_pruned_frame_as_its_own_event_then_no_content(
    world: World, web: str
) -> None:
    run, seq = pruned_run(world)
    key = bearer(world.acme)
    stream = EventStream(web, f"/api/runs/{run.id}/events", {"Authorization": key})
    try:
        assert stream.response.status == 200
        [_, event] = stream.events(2)  # the retry hint, then the summary
        assert (event["id"], event["event"]) == (str(seq), "pruned")
        frame = json.loads(event["data"])
        assert frame["outputs"] == outputs_of(run) and frame["status"] == "succeeded"
        # The summary is the feed's end: the server closes the stream (a read past its
        # end would time out instead).
        assert stream.response.read() == b""
    finally:
        stream.close()
    again = EventStream(
        web, f"/api/runs/{run.id}/events", {"Authorization": key, "Last-Event-ID": str(seq)}
    )
    assert again.response.status == 204  # seen it: EventSource stops reconnecting
    again.close()


def test_a_run_replayed_after_pruning_is_followed_by_its_frames_until_pruned_anew(
    world: World,
) -> None:
    # The call is refused (loopback, not on acme's allowlist) and dies: the run fails.
    spec = {
        "nodes": [
            *ONE_STEP["nodes"],
            {
                "id": "call",
                "type": "tool.http",
                "config": {"url": "http://127.0.0.1:9/hook"},
                "retry": {"max_attempts": 1},
            },
        ],
        "edges": [*ONE_STEP["edges"], ["t", "call"]],
    }
    run = started(world, world.acme, "replayed", spec)
    drain(run)
    assert FEED.flush()
    first_life = last_seq(run)
    finished_days_ago(run, 31, timezone.now())
    assert prune_expired_frames() > 0
    [(seq, text)] = pruned_summary(run.id, 0) or []
    assert seq == first_life and json.loads(text)["status"] == "failed"

    with tenant_context(world.acme):
        assert replay_dead_steps(run, actor=world.owner) == 1
    assert pruned_summary(run.id, 0) is None  # running again: followed by its frames
    drain(run)
    assert FEED.flush()
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert pruned_summary(run.id, 0) is None  # finished after it was pruned: still frames
    second_life = last_seq(run)
    assert second_life > first_life

    finished_days_ago(run, 31, timezone.now())
    # Its second life's frames, numbered on from the first's.
    assert prune_expired_frames() == second_life - first_life
    [(seq, _)] = pruned_summary(run.id, 0) or []
    assert seq == second_life  # the summary comes after the second life's frames


def test_a_pruned_runs_numbers_are_not_given_out_again_when_its_counter_expired(
    world: World,
) -> None:
    run, seq = pruned_run(world)
    feed.feed_redis().delete(feed.counter_key(run.id))  # quiet for a week: the counter expired
    FEED.frame(run.tenant_id, run.id, {"type": "run", "status": "succeeded"})
    assert FEED.flush()
    assert int(feed.feed_redis().get(feed.counter_key(run.id))) == seq + 1
